// A video's server-sent events, read with fetch so the API key travels as a header (EventSource sends
// none, and a key never goes in a URL). Resumes with Last-Event-ID when the stream drops, until `done`.
//
// At most MAX_STREAMS streams are open at once, the others wait for one to end: a browser opens 6 HTTP/1.1
// connections per host, so a board of ten running takes with a stream each left none for the page's own
// calls (its refresh, select, promote, cut) and the last takes' streams never opened. A take waiting for a
// stream is shown from the board's view, which carries the same state (serve.http.views).

import { session } from "./api.js";

const MAX_STREAMS = 4;
let numOpen = 0;
const waiting = []; // resolvers of the follows waiting for a stream, oldest first

// true once this follow holds a stream; false when `signal` aborted while it waited
function openSlot(signal) {
  if (numOpen < MAX_STREAMS) {
    numOpen += 1;
    return Promise.resolve(true);
  }
  return new Promise((resolve) => {
    const handOver = () => {
      signal.removeEventListener("abort", giveUp);
      resolve(true);
    };
    const giveUp = () => {
      waiting.splice(waiting.indexOf(handOver), 1);
      resolve(false);
    };
    waiting.push(handOver);
    signal.addEventListener("abort", giveUp, { once: true });
  });
}

function closeSlot() {
  const next = waiting.shift();
  if (next) next(); // the stream passes to the oldest waiting follow
  else numOpen -= 1;
}

export async function followVideo(videoId, onEvent, signal) {
  if (!(await openSlot(signal))) return;
  try {
    await follow(videoId, onEvent, signal);
  } finally {
    closeSlot();
  }
}

async function follow(videoId, onEvent, signal) {
  let lastId = null;
  for (let attempt = 0; !signal.aborted; attempt += 1) {
    const headers = { Authorization: `Bearer ${session.key()}`, Accept: "text/event-stream" };
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    try {
      const response = await fetch(`/v1/videos/${encodeURIComponent(videoId)}/events`, { headers, signal });
      if (!response.ok) return;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const frame = parse(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (frame.id !== null) lastId = frame.id;
          if (frame.data !== null) onEvent(frame.event, JSON.parse(frame.data));
          if (frame.event === "done") return;
        }
      }
    } catch (error) {
      if (signal.aborted) return;
    }
    await new Promise((resolve) => setTimeout(resolve, Math.min(1000 * 2 ** attempt, 10000)));
  }
}

function parse(block) {
  const frame = { event: "message", data: null, id: null };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (name === "event") frame.event = value;
    else if (name === "data") frame.data = frame.data === null ? value : `${frame.data}\n${value}`;
    else if (name === "id") frame.id = value;
  }
  return frame;
}
