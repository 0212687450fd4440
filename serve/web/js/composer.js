// Shot composer: shots as structured fields with a live preview of the prompt exactly as the server
// compiles it (POST /v1/prompts/compile: one compile function, none in this file), common settings, and
// takes per shot or a grid over one field. A YAML/JSON board file can be dropped instead.

import { api, describe } from "./api.js";
import { field, h, show } from "./dom.js";
import { t } from "./i18n.js";

const SHOT_FIELDS = ["character", "action", "environment", "camera", "style"]; // labels and examples: i18n.js
const GRID_FIELDS = ["camera", "action", "character", "environment", "style", "look"];
const PANEL_TYPES = ["image/png", "image/jpeg", "image/webp"]; // what the server reads (serve/http/images.py)
const PANEL_BYTES = 8 * 1024 * 1024;

export function renderComposer(view) {
  // the looks a shot may name: none, film and the project's LUTs
  const looks = h("datalist", { id: "looks" }, h("option", { value: "none" }), h("option", { value: "film" }));
  api("/v1/looks").then((list) => looks.replaceChildren(...list.data.map((look) => h("option", { value: look.name, label: look.kind === "lut" ? t("compose.lutLook", { name: look.name }) : look.name })))).catch(() => {});
  const shots = h("ol", { class: "shots" });
  const formError = h("p", { class: "error", role: "alert", id: "compose-error" });
  const common = {
    title: h("input", { type: "text", name: "title", maxlength: 200 }),
    negative_prompt: h("textarea", { name: "negative_prompt", rows: 2 }),
    resolution: h("input", { type: "text", name: "resolution", list: "resolutions", placeholder: "480p", pattern: "^(480p|720p|[0-9]+x[0-9]+)$" }),
    aspect: h("select", { name: "aspect" }, h("option", { value: "", text: t("compose.landscape") }), h("option", { value: "9:16", text: t("compose.portrait") })),
    seconds: h("input", { type: "number", name: "seconds", min: 0.25, max: 10, step: 0.25, placeholder: "5" }),
    quality: h(
      "select",
      { name: "quality" },
      h("option", { value: "", text: t("compose.projectDefault") }),
      h("option", { value: "draft", text: t("compose.draftOption") }),
      h("option", { value: "final", text: t("compose.finalOption") }),
    ),
    steps: h("input", { type: "number", name: "steps", min: 1, max: 100, step: 1, placeholder: t("compose.tiersRecipe") }),
    look: h("input", { type: "text", name: "look", list: "looks", placeholder: t("compose.noLook") }),
    seed: h("input", { type: "number", name: "seed", min: 0, step: 1, placeholder: t("compose.random") }),
    takes: h("input", { type: "number", name: "takes", min: 1, max: 16, step: 1, value: 1 }),
    vary: h("select", { name: "vary" }, h("option", { value: "", text: t("compose.nothing") }), ...GRID_FIELDS.map((name) => h("option", { value: name, text: name === "look" ? t("compose.look") : t(`compose.field.${name}`) }))),
    values: h("textarea", { name: "values", rows: 3, placeholder: t("compose.perLine") }),
  };
  const addShot = () => shots.append(shotEditor(shots.children.length));
  addShot();
  const submit = h("button", { type: "submit", text: t("compose.create") });
  const form = h(
    "form",
    {
      class: "composer",
      "aria-labelledby": "compose-title",
      novalidate: true,
      onsubmit: async (event) => {
        event.preventDefault();
        await send(form, formError, submit, () => ({ body: boardBody(shots, common) }));
      },
    },
    h("h1", { id: "compose-title", text: t("nav.compose") }),
    field(t("compose.title"), common.title, { param: "title" }),
    h("h2", { text: t("board.shots") }),
    shots,
    h("button", { type: "button", class: "quiet", text: t("compose.addShot"), onclick: addShot }),
    h(
      "fieldset",
      {},
      h("legend", { text: t("compose.everyShot") }),
      h("div", { class: "grid" },
        field(t("compose.resolution"), common.resolution, { param: "resolution", hint: t("compose.sizeHint") }),
        field(t("compose.aspect"), common.aspect, { param: "aspect" }),
        field(t("compose.duration"), common.seconds, { param: "seconds" }),
        field(t("compose.quality"), common.quality, { param: "quality" }),
        field(t("compose.steps"), common.steps, { param: "steps", hint: t("compose.stepsHint") }),
        field(t("compose.look"), common.look, { param: "look", hint: t("compose.lookHint") }),
        field(t("compose.seed"), common.seed, { param: "seed" }),
      ),
      field(t("compose.negative"), common.negative_prompt, { param: "negative_prompt" }),
    ),
    h(
      "fieldset",
      {},
      h("legend", { text: t("compose.takes") }),
      h("div", { class: "grid" },
        field(t("compose.seeds"), common.takes, { param: "variants.seeds" }),
        field(t("compose.vary"), common.vary, { param: "variants.grid" }),
        field(t("compose.values"), common.values, { param: "variants.grid.values" }),
      ),
    ),
    h("datalist", { id: "resolutions" }, h("option", { value: "480p" }), h("option", { value: "720p" })),
    looks,
    formError,
    submit,
  );
  show(view, form, dropZone(formError));
}

function shotEditor(index) {
  const prefix = `shots.${index}`;
  const name = h("input", { type: "text", name: "name", maxlength: 64, placeholder: `${index + 1}A` });
  const prompt = h("textarea", { name: "prompt", rows: 2 });
  // multi-line: a Chinese description runs long, and a single line hides most of it
  const inputs = Object.fromEntries(SHOT_FIELDS.map((key) => [key, h("textarea", { name: key, rows: 2, placeholder: t(`compose.example.${key}`) })]));
  // this shot's own settings; empty: the board's (the "Every shot" fields)
  const own = {
    resolution: h("input", { type: "text", name: "resolution", list: "resolutions", placeholder: t("compose.boards"), pattern: "^(480p|720p|[0-9]+x[0-9]+)$" }),
    seconds: h("input", { type: "number", name: "seconds", min: 0.25, max: 10, step: 0.25, placeholder: t("compose.boards") }),
    quality: h("select", { name: "quality" }, h("option", { value: "", text: t("compose.boards") }), h("option", { value: "draft", text: t("compose.draft") }), h("option", { value: "final", text: t("compose.final") })),
    look: h("input", { type: "text", name: "look", list: "looks", placeholder: t("compose.boards") }),
    seed: h("input", { type: "number", name: "seed", min: 0, step: 1, placeholder: t("compose.boards") }),
  };
  const preview = h("output", { class: "preview", "aria-live": "polite", text: "" });
  const panel = panelPicker(index, prefix);
  const chained = h("input", { type: "checkbox", name: "continue" });
  const item = h(
    "li",
    { class: "card shot", dataset: { index } },
    h("h3", { text: t("board.shot", { n: index + 1 }) }),
    field(t("compose.shotName"), name, { param: `${prefix}.name` }),
    h("div", { class: "grid" }, ...SHOT_FIELDS.map((key) => field(t(`compose.field.${key}`), inputs[key], { param: `${prefix}.shot.${key}` }))),
    field(t("compose.freePrompt"), prompt, { param: `${prefix}.prompt` }),
    panel.element,
    field(t("compose.continue"), chained, { param: `${prefix}.continue`, hint: t("compose.continueHint") }),
    h(
      "details",
      { class: "own-settings" },
      h("summary", { text: t("compose.ownSettings") }),
      h("div", { class: "grid" },
        field(t("compose.ownSize"), own.resolution, { param: `${prefix}.resolution`, hint: t("compose.sizeHint") }),
        field(t("compose.ownLength"), own.seconds, { param: `${prefix}.seconds` }),
        field(t("compose.ownQuality"), own.quality, { param: `${prefix}.quality` }),
        field(t("compose.ownLook"), own.look, { param: `${prefix}.look` }),
        field(t("compose.ownSeed"), own.seed, { param: `${prefix}.seed` }),
      ),
    ),
    h("p", { class: "preview-line" }, h("span", { class: "hint", text: `${t("board.promptShown")}: ` }), preview),
  );
  item.shotValue = () => {
    const shot = {};
    for (const key of SHOT_FIELDS) if (inputs[key].value.trim()) shot[key] = inputs[key].value;
    const value = {};
    if (name.value.trim()) value.name = name.value.trim();
    if (prompt.value.trim()) value.prompt = prompt.value;
    if (Object.keys(shot).length) value.shot = shot;
    for (const [key, control] of Object.entries(own)) {
      const text = control.value.trim();
      if (text) value[key] = key === "seconds" || key === "seed" ? Number(text) : text;
    }
    if (panel.value()) value.keyframes = { first: panel.value() };
    if (chained.checked && item.previousElementSibling) value.continue = "previous";
    return value;
  };
  // the first shot has nothing to continue; a continued shot starts from its predecessor, not a panel
  item.addEventListener("change", () => {
    chained.disabled = !item.previousElementSibling;
    panel.setDisabled(chained.checked && !chained.disabled);
  });
  queueMicrotask(() => { chained.disabled = !item.previousElementSibling; });
  let timer;
  let asked = 0;
  const refresh = () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const { prompt: text, shot } = item.shotValue();
      const ask = ++asked;
      if (!text && !shot) { preview.textContent = ""; return; }
      try {
        const compiled = await api("/v1/prompts/compile", { method: "POST", body: { prompt: text, shot } });
        if (ask === asked) preview.textContent = compiled.prompt;
      } catch (error) {
        if (ask === asked) preview.textContent = `(${describe(error)})`;
      }
    }, 200);
  };
  item.addEventListener("input", refresh);
  return item;
}

// A storyboard panel for one shot: dropped, pasted or chosen; checked here for what the server refuses
// anyway (type, size) so the words come at once, shown as a preview, and sent as a data URL.
function panelPicker(index, prefix) {
  let dataUrl = null;
  const input = h("input", { type: "file", accept: PANEL_TYPES.join(","), class: "panel-file" });
  const image = h("img", { class: "panel-preview", alt: t("compose.panelPreview", { n: index + 1 }), hidden: true });
  const problem = h("p", { class: "error", role: "alert" });
  const remove = h("button", { type: "button", class: "quiet", text: t("compose.panelRemove"), hidden: true });
  const take = (file) => {
    problem.textContent = "";
    if (!file) return;
    if (!PANEL_TYPES.includes(file.type)) { problem.textContent = t("compose.panelNotImage", { name: file.name || "?" }); return; }
    if (file.size > PANEL_BYTES) { problem.textContent = t("compose.panelTooLarge", { name: file.name || "?" }); return; }
    const reader = new FileReader();
    reader.addEventListener("load", () => {
      dataUrl = reader.result;
      image.src = dataUrl;
      image.hidden = false;
      remove.hidden = false;
      zone.dispatchEvent(new Event("input", { bubbles: true }));
    });
    reader.readAsDataURL(file);
  };
  input.addEventListener("change", () => take(input.files[0]));
  remove.addEventListener("click", () => {
    dataUrl = null;
    input.value = "";
    image.removeAttribute("src");
    image.hidden = true;
    remove.hidden = true;
  });
  const zone = h(
    "div",
    {
      class: "panel drop",
      tabindex: 0,
      ondragover: (event) => { event.preventDefault(); zone.classList.add("over"); },
      ondragleave: () => zone.classList.remove("over"),
      ondrop: (event) => {
        event.preventDefault();
        event.stopPropagation();
        zone.classList.remove("over");
        take(event.dataTransfer.files[0]);
      },
      onpaste: (event) => {
        const file = [...(event.clipboardData?.files || [])][0];
        if (file) { event.preventDefault(); take(file); }
      },
    },
    field(t("compose.panel"), input, { param: `${prefix}.keyframes.first`, hint: t("compose.panelHint") }),
    image,
    remove,
    problem,
  );
  return {
    element: zone,
    value: () => (input.disabled ? null : dataUrl),
    setDisabled: (disabled) => { input.disabled = disabled; zone.classList.toggle("disabled", disabled); },
  };
}

function boardBody(shots, common) {
  const every = {};
  const text = (key) => common[key].value.trim();
  if (text("negative_prompt")) every.negative_prompt = common.negative_prompt.value;
  if (text("resolution")) every.resolution = text("resolution");
  if (common.aspect.value) every.aspect = common.aspect.value;
  if (text("seconds")) every.seconds = Number(text("seconds"));
  if (common.quality.value) every.quality = common.quality.value;
  if (text("steps")) every.steps = Number(text("steps"));
  if (text("look")) every.look = text("look");
  // the board's settings go at the board's level (each shot takes what it does not give itself), so a
  // refusal names the field that was given; a seed has no board-level field: each shot without one gets it
  const seed = text("seed") ? Number(text("seed")) : undefined;
  const body = { ...every, shots: [...shots.children].map((item) => ({ seed, ...item.shotValue() })) };
  if (text("title")) body.title = text("title");
  const variants = { seeds: Number(text("takes") || 1) };
  const values = common.values.value.split("\n").map((line) => line.trim()).filter(Boolean);
  if (common.vary.value && values.length) variants.grid = { [common.vary.value]: values };
  body.variants = variants;
  return body;
}

// Create the board; a refusal is shown next to the field it names (or above the button) and nothing is lost.
async function send(form, formError, submit, request) {
  for (const control of form.querySelectorAll("[aria-invalid]")) {
    control.removeAttribute("aria-invalid");
    const box = document.getElementById(`${control.id}-error`);
    if (box) { box.hidden = true; box.textContent = ""; }
  }
  formError.textContent = "";
  submit.disabled = true;
  try {
    const board = await api("/v1/storyboards", { method: "POST", ...request() });
    location.hash = `#/boards/${board.id}`;
  } catch (error) {
    const controls = error.param ? controlsFor(form, error.param) : [];
    if (controls.length) {
      const box = document.getElementById(`${controls[0].id}-error`);
      box.textContent = describe(error);
      box.hidden = false;
      for (const control of controls) control.setAttribute("aria-invalid", "true");
      controls[0].focus();
    } else {
      formError.textContent = describe(error);
    }
  } finally {
    submit.disabled = false;
  }
}

// The controls a refusal's `param` names: the shot's own field when it was given, else the board's; a
// refused shot (`shots.N.shot`: the content policy names the shot, not a field) marks its filled fields.
function controlsFor(form, param) {
  const shot = param.match(/^shots\.(\d+)\.shot$/);
  if (shot) {
    const fields = [...form.querySelectorAll(`[data-param^="shots.${shot[1]}.shot."]`)];
    const filled = fields.filter((control) => control.value.trim());
    return filled.length ? filled : fields.slice(0, 1);
  }
  const own = form.querySelector(`[data-param="${CSS.escape(param)}"]`);
  if (own && (own.value.trim() || !/^shots\.\d+\./.test(param))) return [own];
  const candidates = [param.replace(/^shots\.\d+\./, ""), param.replace(/\.\d+$/, ""), param.split(".").slice(0, 2).join(".")];
  for (const name of candidates) {
    const control = form.querySelector(`[data-param="${CSS.escape(name)}"]`);
    if (control) return [control];
  }
  return own ? [own] : [];
}

function dropZone(formError) {
  const input = h("input", { type: "file", accept: ".yaml,.yml,.json", id: "board-file" });
  const status = h("p", { class: "error", role: "alert" });
  const upload = async (file) => {
    status.textContent = "";
    const text = await file.text();
    try {
      const request = file.name.toLowerCase().endsWith(".json") ? { body: JSON.parse(text) } : { yaml: text };
      const board = await api("/v1/storyboards", { method: "POST", ...request });
      location.hash = `#/boards/${board.id}`;
    } catch (error) {
      status.textContent = `${file.name}: ${error instanceof SyntaxError ? t("compose.notJson") : describe(error)}`;
    }
  };
  input.addEventListener("change", () => input.files[0] && upload(input.files[0]));
  const zone = h(
    "section",
    {
      class: "drop card",
      "aria-labelledby": "drop-title",
      ondragover: (event) => { event.preventDefault(); zone.classList.add("over"); },
      ondragleave: () => zone.classList.remove("over"),
      ondrop: (event) => {
        event.preventDefault();
        zone.classList.remove("over");
        const file = event.dataTransfer.files[0];
        if (file) upload(file);
      },
    },
    h("h2", { id: "drop-title", text: t("compose.drop") }),
    h("p", { class: "hint", text: t("compose.dropHint") }),
    field(t("compose.file"), input),
    status,
  );
  return zone;
}
