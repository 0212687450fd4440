// The studio page: a hash router over four screens. The key lives in sessionStorage only.

import { api, session } from "./api.js";
import { renderBoard } from "./board.js";
import { renderComposer } from "./composer.js";
import { renderHome } from "./home.js";
import { applyLanguage } from "./i18n.js";
import { renderSignIn } from "./signin.js";

const view = document.getElementById("view");
let current = new AbortController(); // aborts the screen's streams and timers when the route changes
let who = null;

async function route() {
  current.abort();
  current = new AbortController();
  const signal = current.signal;
  const hash = location.hash.replace(/^#/, "") || "/";
  if (!session.key()) {
    setNav(null);
    renderSignIn(view, () => { who = null; go("#/"); });
    return;
  }
  try {
    who = who || (await api("/v1/session", { signal }));
  } catch (error) {
    if (signal.aborted) return; // a later route took over while this one waited
    session.signOut();
    who = null;
    setNav(null);
    renderSignIn(view, () => route(), error);
    return;
  }
  if (signal.aborted) return;
  setNav(who);
  const board = hash.match(/^\/boards\/([\w-]+)$/);
  if (board) await renderBoard(view, board[1], signal);
  else if (hash === "/compose") renderComposer(view, who);
  else await renderHome(view, who, signal);
  if (!signal.aborted) view.focus();
}

// Route to `hash`, also when it is the current one (no hashchange fires then).
function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

function setNav(who) {
  document.getElementById("nav").hidden = who === null;
  document.getElementById("who").textContent = who ? `${who.project} · ${who.role}` : "";
}

document.getElementById("sign-out").addEventListener("click", () => {
  session.signOut();
  who = null;
  go("#/");
});
applyLanguage(document);
window.addEventListener("hashchange", route);
route();
