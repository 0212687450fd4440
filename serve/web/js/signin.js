import { api, describe, session } from "./api.js";
import { field, h, show } from "./dom.js";
import { t } from "./i18n.js";

export function renderSignIn(view, signedIn, previousError) {
  const key = h("input", { type: "password", name: "key", autocomplete: "off", required: true, spellcheck: "false" });
  const error = h("p", { class: "error", id: "sign-in-error", role: "alert", text: previousError ? describe(previousError) : "" });
  const submit = h("button", { type: "submit", text: t("signin.submit") });
  const form = h(
    "form",
    {
      class: "card narrow",
      "aria-labelledby": "sign-in-title",
      novalidate: true, // an empty key gets the API's refusal in the page's words, not the browser's bubble
      onsubmit: async (event) => {
        event.preventDefault();
        submit.disabled = true;
        error.textContent = "";
        try {
          await api("/v1/session", { key: key.value.trim() });
          session.signIn(key.value.trim());
          signedIn();
        } catch (problem) {
          error.textContent = describe(problem);
          key.focus();
        } finally {
          submit.disabled = false;
        }
      },
    },
    h("h1", { id: "sign-in-title", text: t("signin.title") }),
    field(t("signin.key"), key, { hint: t("signin.hint") }),
    error,
    submit,
  );
  show(view, form);
  key.focus();
}
