// The studio page: a hash router over four screens. The key lives in sessionStorage only.

import { api, session } from "./api.js";
import { renderBoard } from "./board.js";
import { renderComposer } from "./composer.js";
import { renderHome } from "./home.js";
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
    renderSignIn(view, () => { who = null; location.hash = "#/"; route(); });
    return;
  }
  try {
    who = who || (await api("/v1/session"));
  } catch (error) {
    session.signOut();
    who = null;
    setNav(null);
    renderSignIn(view, () => route(), error);
    return;
  }
  setNav(who);
  const board = hash.match(/^\/boards\/([\w-]+)$/);
  if (board) await renderBoard(view, board[1], signal);
  else if (hash === "/compose") renderComposer(view, who);
  else await renderHome(view, who, signal);
  view.focus();
}

function setNav(who) {
  document.getElementById("nav").hidden = who === null;
  document.getElementById("who").textContent = who ? `${who.project} · ${who.role}` : "";
}

document.getElementById("sign-out").addEventListener("click", () => {
  session.signOut();
  who = null;
  location.hash = "#/";
  route();
});
window.addEventListener("hashchange", route);
route();
