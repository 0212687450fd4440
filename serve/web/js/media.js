// Signed links to a completed video's mp4 and poster (media elements cannot send the API key).

import { api } from "./api.js";

const links = new Map(); // video id -> {video, thumbnail, expires_at}

export async function linksOf(videoId) {
  const known = links.get(videoId);
  if (known && known.expires_at - 60 > Date.now() / 1000) return known;
  const fresh = await api(`/v1/videos/${encodeURIComponent(videoId)}/links`);
  links.set(videoId, fresh);
  return fresh;
}

export const STAGES = {
  queued: "Queued",
  encoding: "Encoding prompt",
  denoising_high: "Denoising (high noise)",
  denoising_low: "Denoising (low noise)",
  decoding: "Decoding",
  upscaling: "Upscaling",
  finishing: "Finishing",
  completed: "Done",
  failed: "Failed",
  cancelled: "Cancelled",
};

export function stageName(stage, status) {
  return STAGES[(stage || "").toLowerCase()] || STAGES[status] || status;
}
