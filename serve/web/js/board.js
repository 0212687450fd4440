// Storyboard contact sheet: shots as rows, takes as columns. Each take shows live progress and ETA from
// its server-sent events, then its poster and an inline player; per take: remix, cancel, download and
// "selected take". Every take carries the AI-generated draft mark.

import { api, apiBlob, describe } from "./api.js";
import { count, duration, h, show, toast } from "./dom.js";
import { followVideo } from "./events.js";
import { linksOf, stageName } from "./media.js";

const FINISHED = new Set(["completed", "failed", "cancelled"]);

export async function renderBoard(view, boardId, signal) {
  const rows = h("div", { class: "sheet", role: "list", "aria-label": "Shots" });
  const heading = h("h1", { text: "Storyboard" });
  const summary = h("p", { class: "meta", "aria-live": "polite" });
  const toolbar = h("div", { class: "actions toolbar" });
  const cutBox = h("section", { class: "cut", "aria-label": "First cut" });
  show(view, heading, summary, toolbar, cutBox, rows);
  let latest = null; // the board as last loaded
  const cards = new Map(); // video id -> take card (kept across refreshes: its stream and player stay)
  const load = async () => {
    const board = await api(`/v1/storyboards/${encodeURIComponent(boardId)}`);
    heading.textContent = board.title || board.id;
    summary.textContent = `${count(board.shots.length, "shot")} · ${count(board.num_videos, "take")} · ${board.status} · ${board.progress} %`;
    latest = board;
    paintToolbar();
    rows.replaceChildren(
      ...board.order.map((index) => {
        const shot = board.shots[index];
        const takes = shot.videos.map((take) => {
          let card = cards.get(take.video_id);
          if (!card) {
            card = takeCard(board, shot, take, signal, load);
            cards.set(take.video_id, card);
          }
          card.setSelected(shot.selected_video_id === take.video_id);
          return card;
        });
        return h(
          "section",
          { class: "shot-row", role: "listitem", "aria-label": `Shot ${shot.name || index + 1}` },
          h("h2", {}, shot.name ? `${shot.name} · ` : `Shot ${index + 1} · `, h("span", { class: "prompt", text: shot.prompt })),
          h("div", { class: "takes", role: "list", "aria-label": `Takes of shot ${shot.name || index + 1}` }, ...takes),
        );
      }),
    );
    return board;
  };
  // the board's own actions: promote the selected drafts at once, render the first cut of the selected takes
  const promoteButton = h("button", { type: "button", class: "quiet", text: "Promote selected takes" });
  const cutButton = h("button", { type: "button", text: "Render first cut", title: "The selected takes, else each shot's first completed take, in order" });
  const selectedTakes = () =>
    latest.shots.flatMap((shot) => shot.videos.filter((video) => video.video_id === shot.selected_video_id));
  const paintToolbar = () => {
    const selected = selectedTakes();
    promoteButton.disabled = !selected.some((video) => video.quality === "draft" && !video.promoted_to && video.status === "completed");
    cutButton.disabled = !latest.shots.some((shot) => shot.videos.some((video) => video.status === "completed"));
    toolbar.replaceChildren(promoteButton, cutButton);
  };
  promoteButton.addEventListener("click", async () => {
    const drafts = selectedTakes().filter((video) => video.quality === "draft" && !video.promoted_to && video.status === "completed");
    try {
      const promoted = await api(`/v1/storyboards/${encodeURIComponent(boardId)}/promote`, { method: "POST", body: { video_ids: drafts.map((video) => video.video_id) } });
      toast(`${count(promoted.data.length, "final take")} queued.`);
      await load();
    } catch (error) {
      toast(describe(error));
    }
  });
  cutButton.addEventListener("click", async () => {
    cutButton.disabled = true;
    cutBox.replaceChildren(h("p", { role: "status", text: "Rendering the first cut of the selected takes…" }));
    try {
      const cut = await api(`/v1/storyboards/${encodeURIComponent(boardId)}/cut`, { method: "POST", body: {} });
      cutBox.replaceChildren(...cutView(boardId, cut));
    } catch (error) {
      cutBox.replaceChildren(h("p", { class: "error", role: "alert", text: describe(error) }));
    } finally {
      cutButton.disabled = false;
    }
  });
  try {
    await load();
  } catch (error) {
    if (!signal.aborted) show(view, h("h1", { text: "Storyboard" }), h("p", { class: "error", role: "alert", text: describe(error) }));
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

function cutView(boardId, cut) {
  const error = h("p", { class: "error", role: "alert" });
  const timeline = (format, label) =>
    h("button", {
      type: "button",
      class: "quiet",
      text: label,
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
  return [
    h("h2", { text: `First cut · ${cut.clips.length} clips · ${cut.seconds.toFixed(1)} s at ${cut.fps} fps` }),
    h("video", { controls: true, preload: "metadata", src: cut.content_url, "aria-label": "The first cut" }),
    h("div", { class: "actions" }, timeline("otio", "Download OTIO package"), timeline("edl", "Download EDL package"), timeline("fcpxml", "Download FCP XML package")),
    error,
  ];
}

function takeCard(board, shot, take, signal, reload) {
  const status = h("p", { class: "status", "aria-live": "polite" });
  const bar = h("progress", { max: 100, value: take.progress, "aria-label": `Progress of take ${take.video_id}` });
  const media = h("div", { class: "media" }, bar);
  const actions = h("div", { class: "actions" });
  const remixBox = h("div", { class: "remix" });
  const select = h("button", { type: "button", class: "quiet", "aria-pressed": "false", text: "Select take" });
  const card = h(
    "article",
    { class: "take card", role: "listitem", dataset: { video: take.video_id }, "aria-label": `Take ${take.variant + 1}, seed ${take.seed}` },
    h("p", { class: "marks" }, h("span", { class: "mark", text: "AI-generated draft" }), " ", h("span", { class: `tier ${take.quality}`, text: take.quality })),
    media,
    h("p", { class: "meta", text: `seed ${take.seed}${Object.keys(take.grid).length ? ` · ${Object.entries(take.grid).map(([k, v]) => `${k}: ${v}`).join(", ")}` : ""}` }),
    status,
    actions,
    remixBox,
  );
  let state = { status: take.status, stage: take.stage, progress: take.progress, eta: null };
  let download = null; // the mp4's signed link, once the take completed
  const paint = () => {
    bar.value = state.progress;
    const eta = state.eta !== null && state.eta !== undefined ? ` · about ${duration(state.eta)} left` : "";
    status.textContent = state.status === "failed" && take.error
      ? `Failed: ${take.error.message}`
      : `${stageName(state.stage, state.status)} · ${state.progress} %${FINISHED.has(state.status) ? "" : eta}`;
    card.dataset.status = state.status;
    const buttons = [
      h("button", { type: "button", class: "quiet", text: "Remix", onclick: () => openRemix() }),
      FINISHED.has(state.status) ? null : h("button", { type: "button", class: "quiet", text: "Cancel", onclick: cancel }),
      state.status === "completed" ? select : null,
      take.quality === "draft" && state.status === "completed"
        ? h("button", { type: "button", class: "quiet", text: take.promoted_to ? "Promoted" : "Promote", disabled: Boolean(take.promoted_to), onclick: promote })
        : null,
      download,
    ];
    actions.replaceChildren(...buttons.filter(Boolean));
  };
  const showPlayer = async () => {
    try {
      const links = await linksOf(take.video_id);
      const video = h("video", { controls: true, preload: "metadata", src: links.video, poster: links.thumbnail || undefined, "aria-label": `Take ${take.variant + 1} of ${shot.name || "the shot"}` });
      media.replaceChildren(video);
      download = h("a", { class: "button quiet", href: links.video, download: `${take.video_id}.mp4`, text: "Download" });
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
    const prompt = h("textarea", { rows: 3, "aria-label": "Prompt of the remix", value: shot.prompt });
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
        h("button", { type: "submit", text: "Make the remix" }),
        h("button", { type: "button", class: "quiet", text: "Close", onclick: () => remixBox.replaceChildren() }),
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
    select.textContent = selected ? "Selected take" : "Select take";
    card.classList.toggle("selected", selected);
  };
  paint();
  if (state.status === "completed") showPlayer();
  else if (!FINISHED.has(state.status)) {
    followVideo(take.video_id, (kind, data) => {
      if (kind === "status") state = { ...state, status: data.status, stage: data.stage, progress: data.progress, eta: data.eta_seconds ?? null };
      else if (kind === "done") {
        state = { ...state, status: data.status, stage: data.stage, progress: data.progress, eta: null };
        take.error = data.error;
        paint();
        if (data.status === "completed") showPlayer();
        reload().catch(() => {}); // the board's own state and progress move with it
        return;
      } else return;
      paint();
    }, signal);
  }
  return card;
}
