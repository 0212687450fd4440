// Signed links to a completed video's mp4 and poster (media elements cannot send the API key).

import { api } from "./api.js";
import { h } from "./dom.js";
import { whereItIs } from "./i18n.js";

const links = new Map(); // video id -> {video, thumbnail, expires_at}

export async function linksOf(videoId) {
  const known = links.get(videoId);
  if (known && known.expires_at - 60 > Date.now() / 1000) return known;
  const fresh = await api(`/v1/videos/${encodeURIComponent(videoId)}/links`);
  links.set(videoId, fresh);
  return fresh;
}

// A video's state in words (its wait, else its stage), in the page's language.
export function stageName(stage, status, video = {}) {
  return whereItIs({ status, stage, waiting_for: video.waiting_for, queue_position: video.queue_position });
}

// A poster that plays: the controls show only while the pointer or the keyboard focus is on it, so they
// never cover a small poster otherwise.
export function player(links, label) {
  const video = h("video", { preload: "metadata", src: links.video, poster: links.thumbnail || undefined, "aria-label": label, tabindex: 0 });
  video.addEventListener("mouseenter", () => video.setAttribute("controls", ""));
  video.addEventListener("focus", () => video.setAttribute("controls", ""));
  video.addEventListener("mouseleave", () => document.activeElement !== video && video.removeAttribute("controls"));
  video.addEventListener("blur", () => !video.matches(":hover") && video.removeAttribute("controls"));
  return video;
}
