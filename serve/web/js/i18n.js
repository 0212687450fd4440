// The page's words, in English and Chinese: the page follows the browser's language (zh-* -> Chinese,
// anything else -> English). Every string a screen shows goes through t(key, values); both catalogues hold
// the same keys (tests/test_studio_i18n.py checks it), so a Chinese page has no English left in it.

const CATALOGUE = {
  en: {
    "nav.home": "Home",
    "nav.compose": "New storyboard",
    "nav.signOut": "Sign out",
    "nav.main": "Main",
    "nav.skip": "Skip to content",
    "signin.title": "Sign in to Previz",
    "signin.key": "API key",
    "signin.hint": "Your project's key (pvz_…). It stays in this tab only.",
    "signin.submit": "Sign in",
    "board.title": "Storyboard",
    "board.shots": "Shots",
    "board.summary": "{shots} shots · {takes} takes · {state}",
    "board.summaryProgress": "{shots} shots · {takes} takes · {state} · {progress} %",
    "board.shot": "Shot {n}",
    "board.takesOf": "Takes of {shot}",
    "board.promptShown": "Prompt sent to the model",
    "board.state.queued": "waiting to start",
    "board.state.in_progress": "rendering",
    "board.state.completed": "all takes done",
    "board.state.failed": "finished, some takes failed",
    "state.queued": "Waiting",
    "state.in_progress": "Rendering",
    "state.completed": "Done",
    "state.failed": "Failed",
    "state.cancelled": "Cancelled",
    "stage.encoding": "Reading the prompt",
    "stage.denoising_high": "Composing the shot",
    "stage.denoising_low": "Refining the details",
    "stage.decoding": "Developing the frames",
    "stage.upscaling": "Upscaling",
    "stage.finishing": "Finishing the clip",
    "wait.queued": "Waiting in the studio queue · {n} ahead",
    "wait.queuedFirst": "Next in the studio queue",
    "wait.denoising_high": "Waiting for the composing pass · {n} ahead",
    "wait.denoising_low": "Waiting for the detail pass · {n} ahead",
    "wait.decoding": "Waiting for the decoder · {n} ahead",
    "wait.upscaling": "Waiting for the upscaler · {n} ahead",
    "eta.left": "about {time} left",
    "time.seconds": "{s} s",
    "time.minutes": "{m} min {s} s",
    "take.name": "{shot} take {n}",
    "take.finalFrom": "final from take {n}",
    "take.seed": "seed {seed}",
    "take.mark": "AI-generated draft",
    "take.tier.draft": "Draft tier · quick preview",
    "take.tier.final": "Final tier · full quality",
    "take.progress": "Progress of {take}",
    "take.failed": "Failed: {message}",
    "take.remix": "Remix",
    "take.cancel": "Cancel",
    "take.select": "Select take",
    "take.selected": "Selected take",
    "take.promote": "Promote",
    "take.promoted": "Promoted",
    "take.download": "Download mp4",
    "take.player": "{take}, video",
    "remix.prompt": "Prompt of the remix",
    "remix.make": "Make the remix",
    "remix.close": "Close",
    "toolbar.promote": "Promote selected takes",
    "toolbar.cut": "Render first cut",
    "toolbar.promoteWhy": "Select a completed draft take in a shot to promote it.",
    "toolbar.cutRunning": "The first cut waits for {names}: select a completed take, or let its takes finish.",
    "toolbar.cutMissing": "Every shot needs a completed take: {names} has none yet.",
    "toolbar.promoted": "{n} final takes queued.",
    "cut.region": "First cut",
    "cut.rendering": "Rendering the first cut of the selected takes…",
    "cut.heading": "First cut · {n} clips · {seconds} s at {fps} fps",
    "cut.takes": "Takes in this cut",
    "cut.player": "The first cut",
    "cut.mp4": "Download mp4",
    "cut.otio": "Download OTIO package",
    "cut.edl": "Download EDL package",
    "cut.fcpxml": "Download FCP XML package",
  },
  zh: {
    "nav.home": "首页",
    "nav.compose": "新建故事板",
    "nav.signOut": "退出登录",
    "nav.main": "主导航",
    "nav.skip": "跳到正文",
    "signin.title": "登录 Previz",
    "signin.key": "API 密钥",
    "signin.hint": "你的项目密钥（pvz_…），只保存在这个标签页里。",
    "signin.submit": "登录",
    "board.title": "故事板",
    "board.shots": "镜头",
    "board.summary": "{shots} 个镜头 · {takes} 条 · {state}",
    "board.summaryProgress": "{shots} 个镜头 · {takes} 条 · {state} · {progress}%",
    "board.shot": "镜头 {n}",
    "board.takesOf": "{shot} 的各条",
    "board.promptShown": "发送给模型的提示词",
    "board.state.queued": "等待开始",
    "board.state.in_progress": "渲染中",
    "board.state.completed": "全部完成",
    "board.state.failed": "已结束，部分失败",
    "state.queued": "等待中",
    "state.in_progress": "渲染中",
    "state.completed": "完成",
    "state.failed": "失败",
    "state.cancelled": "已取消",
    "stage.encoding": "解析提示词",
    "stage.denoising_high": "生成构图",
    "stage.denoising_low": "细化细节",
    "stage.decoding": "解码画面",
    "stage.upscaling": "提升分辨率",
    "stage.finishing": "成片处理",
    "wait.queued": "在工作室队列中等待 · 前面还有 {n} 个",
    "wait.queuedFirst": "工作室队列中的下一个",
    "wait.denoising_high": "等待构图生成 · 前面还有 {n} 个",
    "wait.denoising_low": "等待细节生成 · 前面还有 {n} 个",
    "wait.decoding": "等待解码器 · 前面还有 {n} 个",
    "wait.upscaling": "等待提升分辨率 · 前面还有 {n} 个",
    "eta.left": "约剩 {time}",
    "time.seconds": "{s} 秒",
    "time.minutes": "{m} 分 {s} 秒",
    "take.name": "{shot} 第 {n} 条",
    "take.finalFrom": "由第 {n} 条定稿",
    "take.seed": "种子 {seed}",
    "take.mark": "AI 生成草稿",
    "take.tier.draft": "草稿档 · 快速预览",
    "take.tier.final": "定稿档 · 完整质量",
    "take.progress": "{take} 的进度",
    "take.failed": "失败：{message}",
    "take.remix": "重新生成",
    "take.cancel": "取消",
    "take.select": "选用此条",
    "take.selected": "已选用",
    "take.promote": "定稿渲染",
    "take.promoted": "已定稿",
    "take.download": "下载 mp4",
    "take.player": "{take} 视频",
    "remix.prompt": "新的提示词",
    "remix.make": "生成",
    "remix.close": "关闭",
    "toolbar.promote": "将选用的条目定稿",
    "toolbar.cut": "渲染初剪",
    "toolbar.promoteWhy": "先在镜头中选用一条已完成的草稿，才能定稿。",
    "toolbar.cutRunning": "初剪在等待 {names}：选用一条已完成的条目，或等它的条目渲染完。",
    "toolbar.cutMissing": "每个镜头都需要一条已完成的条目：{names} 还没有。",
    "toolbar.promoted": "已排队 {n} 条定稿。",
    "cut.region": "初剪",
    "cut.rendering": "正在用选用的条目渲染初剪…",
    "cut.heading": "初剪 · {n} 个镜头 · {seconds} 秒 · 每秒 {fps} 帧",
    "cut.takes": "初剪所用的条目",
    "cut.player": "初剪视频",
    "cut.mp4": "下载 mp4",
    "cut.otio": "下载 OTIO 包",
    "cut.edl": "下载 EDL 包",
    "cut.fcpxml": "下载 FCP XML 包",
  },
};

function pick(languages) {
  return languages.some((language) => /^zh\b/i.test(language)) && !/^en\b/i.test(languages[0] || "") ? "zh" : "en";
}

export const LANG = typeof navigator === "undefined" ? "en" : pick(navigator.languages?.length ? navigator.languages : [navigator.language || "en"]);

export function t(key, values = {}) {
  const text = CATALOGUE[LANG][key] ?? CATALOGUE.en[key];
  if (text === undefined) throw new Error(`no words for ${key}`);
  return text.replace(/\{(\w+)\}/g, (_, name) => String(values[name] ?? ""));
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "";
  if (seconds < 60) return t("time.seconds", { s: Math.max(1, Math.round(seconds)) });
  return t("time.minutes", { m: Math.floor(seconds / 60), s: Math.round(seconds % 60) });
}

// Words for where a take is: its wait (where the work waits, with the number ahead), else its stage.
export function whereItIs({ status, stage, waiting_for: waitingFor, queue_position: ahead }) {
  if (status === "queued") return ahead ? t("wait.queued", { n: ahead }) : t("wait.queuedFirst");
  if (status !== "in_progress") return t(`state.${status}`);
  if (waitingFor && CATALOGUE.en[`wait.${waitingFor}`]) return t(`wait.${waitingFor}`, { n: ahead ?? 0 });
  const key = `stage.${(stage || "").toLowerCase()}`;
  return CATALOGUE.en[key] ? t(key) : t("state.in_progress");
}

export function applyLanguage(document) {
  document.documentElement.lang = LANG === "zh" ? "zh-CN" : "en";
  for (const element of document.querySelectorAll("[data-i18n]")) element.textContent = t(element.dataset.i18n);
  for (const element of document.querySelectorAll("[data-i18n-label]")) element.setAttribute("aria-label", t(element.dataset.i18nLabel));
}

export { CATALOGUE };
