// Storyboard contact sheet: shots as rows (name and a short description; the compiled prompt on demand),
// takes as cards named by their stored take number. Each take says where it is in words (its wait, counted
// where the work waits, or its stage) with an ETA that includes the wait, then shows its poster and a
// player with controls on hover/focus; per take: remix, cancel, select, promote, download, and its review
// (a status and notes, each note by the key's name, optionally at a frame). The board line is computed
// from the takes as they are shown. Every take carries the AI-generated draft mark.

import { api, apiBlob, describe, describeFailure } from "./api.js";
import { h, show, toast } from "./dom.js";
import { followVideo } from "./events.js";
import { duration, t, whereItIs } from "./i18n.js";
import { linksOf, player } from "./media.js";

const FINISHED = new Set(["completed", "failed", "cancelled"]);
const REVIEWS = ["pending", "approved", "rejected", "needs-changes"];

export async function renderBoard(view, boardId, signal) {
  const rows = h("div", { class: "sheet", role: "list", "aria-label": t("board.shots") });
  const heading = h("h1", { text: t("board.title") });
  const summary = h("p", { class: "meta summary", "aria-live": "polite" });
  const toolbar = h("div", { class: "actions toolbar" });
  const reason = h("p", { class: "hint reason", id: "toolbar-reason", "aria-live": "polite" });
  const cutBox = h("section", { class: "cut", "aria-label": t("cut.region") });
  show(view, heading, summary, toolbar, reason, cutBox, rows);
  let latest = null; // the board as last loaded
  let shownCut = null; // the id of the cut on screen
  const cards = new Map(); // video id -> take card (kept across refreshes: its stream and player stay)
  const paintSummary = () => {
    if (!latest) return;
    const states = [...cards.values()].filter((card) => card.isConnected).map((card) => card.state());
    const progress = states.length ? Math.round(states.reduce((sum, state) => sum + state.progress, 0) / states.length) : 0;
    const state = boardState(states.map((item) => item.status));
    const values = { shots: latest.shots.length, takes: states.length, state: t(`board.state.${state}`), progress };
    summary.textContent = state === "completed" ? t("board.summary", values) : t("board.summaryProgress", values);
    paintToolbar();
  };
  const panels = new Map(); // video id -> the panel image shown beside its shot's takes
  const panelOf = (shot, label) => {
    const paneled = shot.videos.find((video) => video.keyframe === "image");
    if (!paneled) return null;
    if (!panels.has(paneled.video_id)) {
      const image = h("img", { class: "shot-panel", alt: t("board.panel", { shot: label }), hidden: true });
      api(`/v1/videos/${encodeURIComponent(paneled.video_id)}/keyframes`, { signal })
        .then((links) => { if (links.first) { image.src = links.first; image.hidden = false; } })
        .catch(() => {});
      panels.set(paneled.video_id, image);
    }
    return panels.get(paneled.video_id);
  };
  const load = async () => {
    const board = await api(`/v1/storyboards/${encodeURIComponent(boardId)}`);
    heading.textContent = board.title || board.id;
    latest = board;
    rows.replaceChildren(
      ...board.order.map((index) => {
        const shot = board.shots[index];
        const label = shotLabel(shot);
        const takes = shot.videos.map((take) => {
          let card = cards.get(take.video_id);
          if (!card) {
            card = takeCard(board, shot, take, signal, load, paintSummary);
            cards.set(take.video_id, card);
          }
          card.update(take);
          card.setSelected(shot.selected_video_id === take.video_id);
          return card;
        });
        const source = shot.continues != null ? board.shots[shot.continues] : null;
        return h(
          "section",
          { class: "shot-row", role: "listitem", "aria-label": label },
          h(
            "h2",
            {},
            h("span", { class: "shot-name", text: label }),
            " ",
            h("span", { class: "description", text: shortDescription(shot.prompt) }),
            source ? h("span", { class: "chain", text: ` · ${t("board.continues", { shot: shotLabel(source) })}` }) : null,
          ),
          panelOf(shot, label),
          h("details", { class: "compiled" }, h("summary", { text: t("board.promptShown") }), h("p", { class: "prompt", text: shot.prompt })),
          h("div", { class: "takes", role: "list", "aria-label": t("board.takesOf", { shot: label }) }, ...takes),
        );
      }),
    );
    paintSummary();
    if (board.cut_url && !cutBox.dataset.busy) {
      const cut = await api(board.cut_url);
      if (!FINISHED.has(cut.status)) followCut(cut); // a cut asked for elsewhere (another tab, the CLI)
      else if (cut.id !== shownCut && cut.status === "completed") {
        shownCut = cut.id;
        cutBox.replaceChildren(...cutView(boardId, cut, board));
      }
    } else if (!board.cut_url && shownCut && !cutBox.dataset.busy) {
      shownCut = null;
      cutBox.replaceChildren();
    }
    return board;
  };
  // the board's own actions, enabled only when they can act; the reason is shown when not
  const promoteButton = h("button", { type: "button", class: "quiet", text: t("toolbar.promote"), "aria-describedby": "toolbar-reason" });
  const cutButton = h("button", { type: "button", text: t("toolbar.cut"), "aria-describedby": "toolbar-reason" });
  const promotable = () =>
    latest.shots.flatMap((shot) =>
      shot.videos.filter((video) => video.video_id === shot.selected_video_id && video.quality === "draft" && !video.promoted_to && cards.get(video.video_id)?.state().status === "completed"),
    );
  // The cut is decided once each shot has its take: its selected take, completed; or, with none selected,
  // its first completed take once none of its takes is still rendering (an earlier one could still win).
  const paintToolbar = () => {
    const statusOf = (video) => cards.get(video.video_id)?.state().status ?? video.status;
    const undecided = [];
    const missing = [];
    for (const shot of latest.shots) {
      const selected = shot.videos.find((video) => video.video_id === shot.selected_video_id);
      if (selected) {
        if (statusOf(selected) !== "completed") (FINISHED.has(statusOf(selected)) ? missing : undecided).push(shot);
      } else if (shot.videos.some((video) => !FINISHED.has(statusOf(video)))) undecided.push(shot);
      else if (!shot.videos.some((video) => statusOf(video) === "completed")) missing.push(shot);
    }
    const reasons = [];
    if (missing.length) reasons.push(t("toolbar.cutMissing", { names: missing.map(shotLabel).join(", ") }));
    else if (undecided.length) reasons.push(t("toolbar.cutRunning", { names: undecided.map(shotLabel).join(", ") }));
    cutButton.disabled = Boolean(missing.length || undecided.length || cutBox.dataset.busy);
    promoteButton.disabled = promotable().length === 0;
    if (promoteButton.disabled) reasons.push(t("toolbar.promoteWhy"));
    reason.textContent = reasons.join(" ");
    if (!toolbar.children.length) toolbar.replaceChildren(promoteButton, cutButton);
  };
  promoteButton.addEventListener("click", async () => {
    try {
      const ids = promotable().map((video) => video.video_id);
      const promoted = await api(`/v1/storyboards/${encodeURIComponent(boardId)}/promote`, { method: "POST", body: { video_ids: ids } });
      toast(t("toolbar.promoted", { n: promoted.data.length }));
      await load();
    } catch (error) {
      toast(describe(error));
    }
  });
  // The cut is a job of the cluster: the POST answers at once (202) and the cut is followed until it is done.
  const followCut = async (cut) => {
    cutBox.dataset.busy = "true";
    cutButton.disabled = true;
    const bar = h("progress", { max: 100, value: cut.progress, "aria-label": t("cut.progress") });
    const line = h("p", { role: "status", "aria-live": "polite" });
    const cancel = h("button", { type: "button", class: "quiet", text: t("cut.cancel") });
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        await api(`/v1/storyboards/${encodeURIComponent(boardId)}/cut/cancel`, { method: "POST" });
      } catch (error) {
        toast(describe(error));
      }
    });
    cutBox.replaceChildren(line, bar, h("div", { class: "actions" }, cancel));
    try {
      while (!signal.aborted) {
        const eta = cut.eta_seconds != null ? t("cut.eta", { eta: duration(cut.eta_seconds) }) : "";
        line.textContent = cut.status === "queued" ? t("cut.queued") : t("cut.renderingProgress", { progress: cut.progress, eta });
        bar.value = cut.progress;
        if (FINISHED.has(cut.status)) break;
        await new Promise((resolve) => setTimeout(resolve, 1000));
        cut = await api(`/v1/storyboards/${encodeURIComponent(boardId)}/cut`);
      }
      if (cut.status === "completed") {
        shownCut = cut.id;
        cutBox.replaceChildren(...cutView(boardId, cut, latest));
      } else if (!signal.aborted) {
        const why = cut.error ? describeFailure(cut.error) : t(`cut.${cut.status}`);
        cutBox.replaceChildren(h("p", { class: "error", role: "alert", text: why }));
      }
    } catch (error) {
      cutBox.replaceChildren(h("p", { class: "error", role: "alert", text: describe(error) }));
    } finally {
      delete cutBox.dataset.busy;
      paintToolbar();
    }
  };
  cutButton.addEventListener("click", async () => {
    cutButton.disabled = true;
    try {
      const cut = await api(`/v1/storyboards/${encodeURIComponent(boardId)}/cut`, { method: "POST", body: {} });
      await followCut(cut);
    } catch (error) {
      cutBox.replaceChildren(h("p", { class: "error", role: "alert", text: describe(error) }));
      paintToolbar();
    }
  });
  try {
    await load();
  } catch (error) {
    if (!signal.aborted) show(view, h("h1", { text: t("board.title") }), h("p", { class: "error", role: "alert", text: describe(error) }));
    return;
  }
  // takes added by a remix elsewhere (another tab, the CLI) appear within a few seconds
  (async () => {
    while (!signal.aborted) {
      await new Promise((resolve) => setTimeout(resolve, 4000));
      if (!signal.aborted) await load().catch(() => {});
    }
  })();
}

// queued while none started, completed once all are, failed once all finished and some did not complete
function boardState(states) {
  if (!states.length || states.every((state) => state === "queued")) return "queued";
  if (states.every((state) => state === "completed")) return "completed";
  if (states.every((state) => FINISHED.has(state))) return "failed";
  return "in_progress";
}

function shotLabel(shot) {
  return shot.name || t("board.shot", { n: shot.index + 1 });
}

// The first clause of the compiled prompt, at most 80 characters: a row header, not the whole brief.
function shortDescription(prompt) {
  const first = (prompt || "").split(/(?<=[.!?。！？])\s*/)[0].replace(/[.。]$/, "");
  return first.length > 80 ? `${first.slice(0, 79)}…` : first;
}

function takeName(shot, take) {
  return t("take.name", { shot: shotLabel(shot), n: take.take });
}

// The same name as the CLI gives the file: 01-1A-take3.mp4 (shot order, shot name, take number).
function fileName(shot, take) {
  const name = (shot.name || "").replace(/[^\p{L}\p{N}._-]+/gu, "_").replace(/^[._]+|[._]+$/g, "") || "shot";
  return `${String(shot.index + 1).padStart(2, "0")}-${name}-take${take.take}.mp4`;
}

function cutView(boardId, cut, board) {
  const error = h("p", { class: "error", role: "alert" });
  const timeline = (format) =>
    h("button", {
      type: "button",
      class: "quiet",
      text: t(`cut.${format}`),
      onclick: async () => {
        error.textContent = "";
        try {
          const blob = await apiBlob(`/v1/storyboards/${encodeURIComponent(boardId)}/timeline?format=${format}&package=true`);
          const link = h("a", { href: URL.createObjectURL(blob), download: `${boardId}-${format}.zip` });
          link.click();
          setTimeout(() => URL.revokeObjectURL(link.href), 10000);
        } catch (problem) {
          error.textContent = describe(problem);
        }
      },
    });
  const shots = new Map((board?.shots || []).map((shot) => [shot.index, shot]));
  const used = cut.clips.map((clip) =>
    h("li", { dataset: { video: clip.video_id } }, t("take.name", { shot: shots.get(clip.shot) ? shotLabel(shots.get(clip.shot)) : clip.name, n: clip.take })),
  );
  return [
    h("h2", { text: t("cut.heading", { n: cut.clips.length, seconds: cut.seconds.toFixed(1), fps: cut.fps }) }),
    h("video", { controls: true, preload: "metadata", src: cut.content_url, "aria-label": t("cut.player") }),
    h("h3", { id: "cut-takes", text: t("cut.takes") }),
    h("ol", { class: "cut-takes", "aria-labelledby": "cut-takes" }, ...used),
    h(
      "div",
      { class: "actions" },
      h("a", { class: "button", href: cut.content_url, download: `${boardId}-cut.mp4`, text: t("cut.mp4") }),
      timeline("otio"),
      timeline("edl"),
      timeline("fcpxml"),
    ),
    error,
  ];
}

function takeCard(board, shot, take, signal, reload, changed) {
  const name = takeName(shot, take);
  const status = h("p", { class: "status", "aria-live": "polite" });
  const bar = h("progress", { max: 100, value: take.progress, "aria-label": t("take.progress", { take: name }) });
  const media = h("div", { class: "media" }, bar);
  const actions = h("div", { class: "actions" });
  const remixBox = h("div", { class: "remix" });
  const select = h("button", { type: "button", class: "quiet", "aria-pressed": "false", text: t("take.select") });
  const title = h("h3", { class: "take-name" }, name, take.promoted_from_take ? ` · ${t("take.finalFrom", { n: take.promoted_from_take })}` : "");
  const card = h(
    "article",
    { class: "take card", role: "listitem", dataset: { video: take.video_id, take: take.take }, "aria-label": name },
    title,
    h("p", { class: "marks" }, h("span", { class: "mark", text: t("take.mark") }), " ", h("span", { class: `tier ${take.quality}`, text: t(`take.tier.${take.quality}`) })),
    media,
    h("p", { class: "meta", text: [t("take.seed", { seed: take.seed }), ...Object.entries(take.grid).map(([k, v]) => `${k}: ${v}`)].join(" · ") }),
    status,
    actions,
    reviewBox(take),
    remixBox,
  );
  let state = stateOf(take);
  let live = false; // its stream has spoken: from then on the stream, not the board's view, moves it
  const following = new AbortController(); // its stream, stopped with the page or once it finished
  signal.addEventListener("abort", () => following.abort(), { once: true });
  let download = null; // the mp4's signed link, once the take completed
  const paint = () => {
    bar.value = state.progress;
    const where = whereItIs(state);
    const waiting = state.status === "queued" || Boolean(state.waiting_for);
    const counted = state.queue_position !== null && state.queue_position !== undefined; // a place, not a hold
    const eta = state.eta !== null && state.eta !== undefined
      ? ` · ${t("eta.left", { time: duration(state.eta) })}`
      : waiting && counted ? ` · ${t("eta.unmeasured")}` : ""; // a counted wait with no measured time says so
    status.textContent = state.status === "failed" && take.error
      ? t("take.failed", { message: describeFailure(take.error) })
      : FINISHED.has(state.status) ? where : waiting ? `${where}${eta}` : `${where} · ${state.progress} %${eta}`;
    card.dataset.status = state.status;
    card.dataset.waiting = state.waiting_for || (state.status === "queued" ? "queue" : "");
    const buttons = [
      h("button", { type: "button", class: "quiet", text: t("take.remix"), onclick: () => openRemix() }),
      FINISHED.has(state.status) ? null : h("button", { type: "button", class: "quiet", text: t("take.cancel"), onclick: cancel }),
      state.status === "completed" ? select : null,
      take.quality === "draft" && state.status === "completed"
        ? h("button", { type: "button", class: "quiet", text: take.promoted_to ? t("take.promoted") : t("take.promote"), disabled: Boolean(take.promoted_to), onclick: promote })
        : null,
      download,
    ];
    actions.replaceChildren(...buttons.filter(Boolean));
    changed();
  };
  const showPlayer = async () => {
    try {
      const links = await linksOf(take.video_id);
      const video = player(links, t("take.player", { take: name }));
      media.replaceChildren(video);
      download = h("a", { class: "button quiet", href: links.video, download: fileName(shot, take), text: t("take.download") });
      paint();
    } catch (error) {
      status.textContent = describe(error);
    }
  };
  // the final-tier take of this draft: same seed, prompt and size; it joins the row as a new take
  const promote = async () => {
    try {
      const final = await api(`/v1/videos/${encodeURIComponent(take.video_id)}/promote`, { method: "POST", body: {} });
      take.promoted_to = final.id;
      paint();
      await reload();
    } catch (error) {
      toast(describe(error));
    }
  };
  const cancel = async () => {
    try {
      await api(`/v1/videos/${encodeURIComponent(take.video_id)}`, { method: "DELETE" });
    } catch (error) {
      toast(describe(error));
    }
  };
  const openRemix = () => {
    const prompt = h("textarea", { rows: 3, "aria-label": t("remix.prompt"), value: shot.prompt });
    const error = h("p", { class: "error", role: "alert" });
    remixBox.replaceChildren(
      h(
        "form",
        {
          class: "inline",
          onsubmit: async (event) => {
            event.preventDefault();
            try {
              await api(`/v1/videos/${encodeURIComponent(take.video_id)}/remix`, { method: "POST", body: { prompt: prompt.value } });
              remixBox.replaceChildren();
              await reload();
            } catch (problem) {
              error.textContent = describe(problem);
            }
          },
        },
        prompt,
        h("button", { type: "submit", text: t("remix.make") }),
        h("button", { type: "button", class: "quiet", text: t("remix.close"), onclick: () => remixBox.replaceChildren() }),
        error,
      ),
    );
    prompt.focus();
  };
  select.addEventListener("click", async () => {
    try {
      await api(`/v1/storyboards/${encodeURIComponent(board.id)}`, { method: "PATCH", body: { takes: { [shot.index]: take.video_id } } });
      await reload();
    } catch (error) {
      toast(describe(error));
    }
  });
  card.setSelected = (selected) => {
    select.setAttribute("aria-pressed", String(selected));
    select.textContent = selected ? t("take.selected") : t("take.select");
    card.classList.toggle("selected", selected);
  };
  card.state = () => state;
  card.setReview = (review) => {
    take.review = review;
    card.dataset.review = review;
    const choice = card.querySelector("select.review");
    if (choice) choice.value = review;
  };
  card.dataset.review = take.review || "pending";
  // told twice (the stream and the board's view) it ends once; a `status` event may say "completed" first
  let ended = FINISHED.has(take.status);
  const finished = (video) => {
    if (ended) return;
    ended = true;
    state = { ...stateOf(video), eta: null, waiting_for: null, queue_position: null };
    take.error = video.error;
    following.abort();
    paint();
    if (video.status === "completed") showPlayer();
  };
  // the board's view of the take (every refresh): its promotion, and its state until its stream speaks
  card.update = (fresh) => {
    if (fresh.review !== take.review) card.setReview(fresh.review);
    if (fresh.promoted_to !== take.promoted_to) {
      take.promoted_to = fresh.promoted_to;
      paint();
    }
    if (FINISHED.has(fresh.status)) finished(fresh);
    else if (!live && !FINISHED.has(state.status)) {
      state = stateOf(fresh);
      paint();
    }
  };
  paint();
  if (state.status === "completed") showPlayer();
  else if (!FINISHED.has(state.status)) {
    followVideo(take.video_id, (kind, data) => {
      if (kind === "status" && data.status === "completed") {
        finished(data); // a status event may say it completed before `done` does: the player shows either way
      } else if (kind === "status") {
        live = true;
        state = stateOf(data);
        paint();
      } else if (kind === "done") {
        finished(data);
        reload().catch(() => {}); // the board's own state moves with it
      }
    }, following.signal);
  }
  return card;
}

// The take's review: its status (a change is PUT at once) and its notes, listed and added on demand.
function reviewBox(take) {
  const videoUrl = `/v1/videos/${encodeURIComponent(take.video_id)}`;
  const error = h("p", { class: "error", role: "alert" });
  const status = h(
    "select",
    {
      class: "review",
      "aria-label": t("review.status"),
      onchange: async () => {
        try {
          const answer = await api(`${videoUrl}/review`, { method: "PUT", body: { status: status.value } });
          take.review = answer.status;
          status.closest(".take")?.setAttribute("data-review", answer.status);
        } catch (problem) {
          status.value = take.review || "pending";
          error.textContent = describe(problem);
        }
      },
    },
    ...REVIEWS.map((value) => h("option", { value, text: t(`review.${value.replace("-", "_")}`) })),
  );
  status.value = take.review || "pending";
  const list = h("ol", { class: "notes", "aria-label": t("review.notes") });
  const text = h("input", { type: "text", maxlength: 4000, "aria-label": t("review.note") });
  const frame = h("input", { type: "number", min: 0, step: 1, class: "frame", "aria-label": t("review.frame") });
  const paintNotes = (notes) => list.replaceChildren(
    ...notes.map((note) => h("li", { text: `${note.frame === null ? "" : `${t("review.at", { frame: note.frame })} · `}${note.author}: ${note.text}` })),
  );
  const form = h(
    "form",
    {
      class: "inline note",
      hidden: true,
      onsubmit: async (event) => {
        event.preventDefault();
        try {
          const body = { text: text.value };
          if (frame.value !== "") body.frame = Number(frame.value);
          await api(`${videoUrl}/notes`, { method: "POST", body });
          text.value = "";
          frame.value = "";
          paintNotes((await api(`${videoUrl}/notes`)).data);
          error.textContent = "";
        } catch (problem) {
          error.textContent = describe(problem);
        }
      },
    },
    text,
    frame,
    h("button", { type: "submit", text: t("review.add") }),
  );
  const toggle = h("button", {
    type: "button",
    class: "quiet",
    "aria-expanded": "false",
    text: t("review.showNotes"),
    onclick: async () => {
      const open = form.hidden;
      form.hidden = !open;
      list.hidden = !open;
      toggle.setAttribute("aria-expanded", String(open));
      if (open) {
        try {
          paintNotes((await api(`${videoUrl}/notes`)).data);
        } catch (problem) {
          error.textContent = describe(problem);
        }
      }
    },
  });
  list.hidden = true;
  return h("div", { class: "review-box" }, h("p", { class: "actions" }, status, toggle), list, form, error);
}

// A take's state as the page shows it, from the board's view of it, a `status` event or the video itself.
function stateOf(video) {
  return {
    status: video.status,
    stage: video.stage,
    progress: video.progress,
    eta: video.eta_seconds ?? null,
    waiting_for: video.waiting_for ?? null,
    queue_position: video.queue_position ?? null,
  };
}
