// The one way the page talks to the API: the key from sessionStorage as the Bearer header, errors as ApiError.

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

// An API error in words a director can act on.
export function describe(error) {
  if (!(error instanceof ApiError)) return `Could not reach the server (${error.message}).`;
  if (error.code === "content_blocked") {  // said once: the category, not the server's sentence again
    return `Blocked by the content policy (${(error.category || "unknown").replaceAll("_", " ")}). Nothing was created.`;
  }
  if (error.status === 429) {
    const wait = error.retryAfter ? ` Try again in ${error.retryAfter} s.` : "";
    return `The queue is full: ${error.message}.${wait}`;
  }
  return error.message;
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
