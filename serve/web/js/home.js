// Project home: storyboards and recent videos; admins also see projects, keys and quotas.

import { api, describe } from "./api.js";
import { h, show, toast } from "./dom.js";
import { t } from "./i18n.js";
import { linksOf, player, stageName } from "./media.js";

export async function renderHome(view, who, signal) {
  const boards = h("ul", { class: "boards", "aria-label": t("home.boards") });
  const videos = h("ul", { class: "videos", "aria-label": t("home.videos") });
  const admin = who.is_admin ? h("section", { class: "admin", "aria-labelledby": "admin-title" }) : null;
  show(
    view,
    h("h1", { text: t("home.project", { name: who.project }) }),
    h("p", {}, h("a", { class: "button", href: "#/compose", text: t("nav.compose") })),
    h("section", { "aria-labelledby": "boards-title" }, h("h2", { id: "boards-title", text: t("home.boards") }), boards),
    h("section", { "aria-labelledby": "videos-title" }, h("h2", { id: "videos-title", text: t("home.videos") }), videos),
    admin,
  );
  const refresh = async () => {
    try {
      const [boardPage, videoPage] = await Promise.all([api("/v1/storyboards?limit=12"), api("/v1/videos?limit=12")]);
      boards.replaceChildren(...(boardPage.data.length ? boardPage.data.map(boardItem) : [h("li", { class: "empty", text: t("home.noBoards") })]));
      videos.replaceChildren(...(videoPage.data.length ? videoPage.data.map(videoItem) : [h("li", { class: "empty", text: t("home.noVideos") })]));
      return [...boardPage.data, ...videoPage.data].some((item) => !["completed", "failed", "cancelled"].includes(item.status));
    } catch (error) {
      toast(describe(error));
      return false;
    }
  };
  if (admin) renderAdmin(admin, who);
  const loop = async () => {
    while (!signal.aborted && (await refresh())) await new Promise((resolve) => setTimeout(resolve, 3000));
  };
  await refresh();
  loop();
}

function boardItem(board) {
  return h(
    "li",
    { class: "card" },
    h("a", { href: `#/boards/${board.id}` }, board.title || board.id),
    h("p", { class: "meta", text: t("board.summaryProgress", { shots: board.shots.length, takes: board.num_videos, state: t(`board.state.${board.status}`), progress: board.progress }) }),
    h("progress", { max: 100, value: board.progress, "aria-label": t("home.boardProgress", { title: board.title || board.id }) }),
  );
}

function videoItem(video) {
  // any completed clip of the project plays and downloads here, wherever it was made (page, SDK, CLI)
  const poster = h("div", { class: "poster" });
  const download = h("p", { class: "actions" });
  if (video.status === "completed") {
    linksOf(video.id).then((links) => {
      poster.replaceChildren(player(links, t("home.clip", { id: video.id })));
      download.replaceChildren(h("a", { class: "button quiet", href: links.video, download: `${video.id}.mp4`, text: t("take.download") }));
    }).catch(() => {});
  }
  return h(
    "li",
    { class: "card" },
    poster,
    h("p", { class: "prompt", text: video.prompt }),
    h("p", { class: "meta", text: t("home.meta", { where: stageName(video.stage, video.status, video), progress: video.progress, size: video.size, seconds: video.seconds }) }),
    download,
    video.storyboard_id ? h("a", { href: `#/boards/${video.storyboard_id}`, text: t("home.openBoard") }) : null,
  );
}

async function renderAdmin(section, who) {
  section.replaceChildren(h("h2", { id: "admin-title", text: t("admin.title") }));
  try {
    const projects = await api("/v1/admin/projects");
    const list = h("ul", { class: "projects" });
    for (const project of projects.data) list.append(await projectItem(project, who));
    section.append(h("h3", { text: t("admin.projects") }), list);
  } catch (error) {
    section.append(h("p", { class: "error", role: "alert", text: describe(error) }));
  }
}

async function projectItem(project, who) {
  const settings = project.settings;
  const quotas = h(
    "p",
    { class: "meta" },
    quotaLine(settings),
  );
  const keys = h("ul", { class: "keys", "aria-label": t("admin.keysOf", { project: project.name }) });
  const created = h("p", { class: "secret", role: "status" });
  const loadKeys = async () => {
    const page = await api(`/v1/admin/projects/${encodeURIComponent(project.name)}/keys`);
    keys.replaceChildren(
      ...page.data.map((key) =>
        h(
          "li",
          {},
          `${key.id} · ${key.role}${key.name ? ` · ${key.name}` : ""}${key.revoked_at ? ` · ${t("admin.revoked")}` : ""} `,
          key.revoked_at || key.id === who.key_id
            ? null
            : h("button", {
                type: "button",
                class: "quiet",
                text: t("admin.revoke"),
                "aria-label": t("admin.revokeKey", { id: key.id }),
                onclick: async () => {
                  try {
                    await api(`/v1/admin/keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
                    await loadKeys();
                  } catch (error) {
                    toast(describe(error));
                  }
                },
              }),
        ),
      ),
    );
  };
  const role = h("select", { "aria-label": t("admin.roleOf", { project: project.name }) }, h("option", { text: "member" }), h("option", { text: "admin" }));
  const create = h("button", {
    type: "button",
    text: t("admin.createKey"),
    onclick: async () => {
      try {
        const key = await api(`/v1/admin/projects/${encodeURIComponent(project.name)}/keys`, { method: "POST", body: { role: role.value } });
        created.textContent = t("admin.newKey", { role: key.role, key: key.key });
        await loadKeys();
      } catch (error) {
        toast(describe(error));
      }
    },
  });
  const item = h("li", { class: "card" }, h("h4", { text: project.name }), quotas, keys, h("p", {}, role, " ", create), created);
  if (who.is_studio_admin) item.append(quotaForm(project, quotas));
  await loadKeys().catch((error) => toast(describe(error)));
  return item;
}

function quotaForm(project, quotas) {
  const queued = h("input", { type: "number", min: 1, step: 1, value: project.settings.max_queued_jobs ?? "", "aria-label": t("admin.mostQueued", { project: project.name }) });
  const gpu = h("input", { type: "number", min: 1, step: "any", value: project.settings.gpu_seconds_per_day ?? "", "aria-label": t("admin.gpuOf", { project: project.name }) });
  return h(
    "form",
    {
      class: "inline",
      onsubmit: async (event) => {
        event.preventDefault();
        const number = (input) => (input.value === "" ? null : Number(input.value));
        try {
          const changed = await api(`/v1/admin/projects/${encodeURIComponent(project.name)}`, {
            method: "PATCH",
            body: { max_queued_jobs: number(queued), gpu_seconds_per_day: number(gpu) },
          });
          quotas.textContent = quotaLine(changed.settings);
          toast(t("admin.saved", { project: project.name }));
        } catch (error) {
          toast(describe(error));
        }
      },
    },
    queued,
    " ",
    gpu,
    " ",
    h("button", { type: "submit", text: t("admin.saveQuotas") }),
  );
}

function quotaLine(settings) {
  const limit = (value) => value ?? t("admin.noLimit");
  return t("admin.quotas", { queued: limit(settings.max_queued_jobs), gpu: limit(settings.gpu_seconds_per_day), label: settings.burn_label ? t("admin.yes") : t("admin.no") });
}
