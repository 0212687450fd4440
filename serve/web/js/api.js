// The one way the page talks to the API: the key from sessionStorage as the Bearer header, errors as ApiError.

import { has, LANG, t } from "./i18n.js";

const KEY = "previz.apiKey";

export class ApiError extends Error {
  constructor(status, body, headers) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || "http_error";
    this.param = error.param || null;
    this.category = error.category || null;
    this.retryAfter = Number(headers.get("retry-after")) || null;
  }
}

export const session = {
  key: () => sessionStorage.getItem(KEY),
  signIn: (key) => sessionStorage.setItem(KEY, key),
  signOut: () => sessionStorage.removeItem(KEY),
};

export async function api(path, { method = "GET", body, yaml, key = session.key(), signal } = {}) {
  const headers = { Accept: "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  let payload;
  if (yaml !== undefined) {
    headers["Content-Type"] = "application/yaml";
    payload = yaml;
  } else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body: payload, signal });
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw new ApiError(response.status, data, response.headers);
  return data;
}

// An API error in words a director can act on, in the page's language: in English the server's own sentence
// (it names the field and the value), in any other language the catalogue's words for its code; a content
// refusal names its category once, a full queue says when to try again, and nothing is a raw token.
export function describe(error) {
  if (!(error instanceof ApiError)) return t("error.unreachable");
  if (error.code === "content_blocked") return t("error.blocked", { category: categoryName(error.category) });
  if (error.status === 429) {
    const words = has(`error.${error.code}`) ? t(`error.${error.code}`) : t("error.queue_full");
    return error.retryAfter ? `${words} ${t("error.retryIn", { s: error.retryAfter })}` : words;
  }
  if (LANG === "en" && error.message && !error.message.startsWith("HTTP ")) return error.message;
  return has(`error.${error.code}`) ? t(`error.${error.code}`) : t("error.other");
}

// Why a take failed (its video's `error`), in the same way: the server's sentence in English, else by code.
export function describeFailure(failure) {
  if (LANG === "en" && failure?.message) return failure.message;
  const code = failure?.code || "other";
  return has(`failure.${code}`) ? t(`failure.${code}`) : t("failure.other");
}

function categoryName(category) {
  return has(`category.${category}`) ? t(`category.${category}`) : t("category.other");
}

// A file the API serves to a key holder (a timeline, a package), as a Blob for a download link.
export async function apiBlob(path, { key = session.key() } = {}) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${key}` } });
  if (!response.ok) {
    const text = await response.text();
    throw new ApiError(response.status, text ? JSON.parse(text) : null, response.headers);
  }
  return response.blob();
}
