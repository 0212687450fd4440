// Shot composer: shots as structured fields with a live preview of the prompt exactly as the server
// compiles it (POST /v1/prompts/compile: one compile function, none in this file), common settings, and
// takes per shot or a grid over one field. A YAML/JSON board file can be dropped instead.

import { api, describe } from "./api.js";
import { field, h, show } from "./dom.js";

const SHOT_FIELDS = [
  ["character", "人物", "Character", "a man in a black trench coat"],
  ["action", "动作", "Action", "leaps from a tower, flips twice, lands"],
  ["environment", "环境", "Environment", "a burning refinery at night"],
  ["camera", "镜头", "Camera", "low-angle slow motion tracking shot"],
  ["style", "风格", "Style", "gritty action film, anamorphic"],
];
const GRID_FIELDS = ["camera", "action", "character", "environment", "style", "look"];

export function renderComposer(view) {
  // the looks a shot may name: none, film and the project's LUTs
  const looks = h("datalist", { id: "looks" }, h("option", { value: "none" }), h("option", { value: "film" }));
  api("/v1/looks").then((list) => looks.replaceChildren(...list.data.map((look) => h("option", { value: look.name, label: look.kind === "lut" ? `${look.name} (project LUT)` : look.name })))).catch(() => {});
  const shots = h("ol", { class: "shots" });
  const formError = h("p", { class: "error", role: "alert", id: "compose-error" });
  const common = {
    title: h("input", { type: "text", name: "title", maxlength: 200 }),
    negative_prompt: h("textarea", { name: "negative_prompt", rows: 2 }),
    resolution: h("input", { type: "text", name: "resolution", list: "resolutions", placeholder: "480p", pattern: "^(480p|720p|[0-9]+x[0-9]+)$" }),
    aspect: h("select", { name: "aspect" }, h("option", { value: "", text: "16:9 (landscape)" }), h("option", { value: "9:16", text: "9:16 (portrait)" })),
    seconds: h("input", { type: "number", name: "seconds", min: 0.25, max: 10, step: 0.25, placeholder: "5" }),
    quality: h(
      "select",
      { name: "quality" },
      h("option", { value: "", text: "project default" }),
      h("option", { value: "draft", text: "draft: 4 distilled steps, quick takes" }),
      h("option", { value: "final", text: "final: the full 40-step recipe" }),
    ),
    steps: h("input", { type: "number", name: "steps", min: 1, max: 100, step: 1, placeholder: "the tier's" }),
    look: h("input", { type: "text", name: "look", list: "looks", placeholder: "none" }),
    seed: h("input", { type: "number", name: "seed", min: 0, step: 1, placeholder: "random" }),
    takes: h("input", { type: "number", name: "takes", min: 1, max: 16, step: 1, value: 1 }),
    vary: h("select", { name: "vary" }, h("option", { value: "", text: "nothing" }), ...GRID_FIELDS.map((name) => h("option", { value: name, text: name }))),
    values: h("textarea", { name: "values", rows: 3, placeholder: "one value per line" }),
  };
  const addShot = () => shots.append(shotEditor(shots.children.length));
  addShot();
  const submit = h("button", { type: "submit", text: "Create storyboard" });
  const form = h(
    "form",
    {
      class: "composer",
      "aria-labelledby": "compose-title",
      novalidate: true,
      onsubmit: async (event) => {
        event.preventDefault();
        await send(form, formError, submit, () => ({ body: boardBody(shots, common) }));
      },
    },
    h("h1", { id: "compose-title", text: "New storyboard" }),
    field("Title", common.title, { param: "title" }),
    h("h2", { text: "Shots" }),
    shots,
    h("button", { type: "button", class: "quiet", text: "Add a shot", onclick: addShot }),
    h(
      "fieldset",
      {},
      h("legend", { text: "Every shot" }),
      h("div", { class: "grid" },
        field("Resolution", common.resolution, { param: "resolution", hint: "480p, 720p or WxH" }),
        field("Aspect", common.aspect, { param: "aspect" }),
        field("Duration (s)", common.seconds, { param: "seconds" }),
        field("Quality", common.quality, { param: "quality" }),
        field("Steps", common.steps, { param: "steps", hint: "leave empty for the tier's recipe" }),
        field("Look", common.look, { param: "look", hint: "none, film or a project LUT" }),
        field("Seed", common.seed, { param: "seed" }),
      ),
      field("Negative prompt", common.negative_prompt, { param: "negative_prompt" }),
    ),
    h(
      "fieldset",
      {},
      h("legend", { text: "Takes" }),
      h("div", { class: "grid" },
        field("Takes per shot (seeds)", common.takes, { param: "variants.seeds" }),
        field("Also vary", common.vary, { param: "variants.grid" }),
        field("Values to try", common.values, { param: "variants.grid.values" }),
      ),
    ),
    h("datalist", { id: "resolutions" }, h("option", { value: "480p" }), h("option", { value: "720p" })),
    looks,
    formError,
    submit,
  );
  show(view, form, dropZone(formError));
}

function shotEditor(index) {
  const prefix = `shots.${index}`;
  const name = h("input", { type: "text", name: "name", maxlength: 64, placeholder: `${index + 1}A` });
  const prompt = h("textarea", { name: "prompt", rows: 2 });
  // multi-line: a Chinese description runs long, and a single line hides most of it
  const inputs = Object.fromEntries(SHOT_FIELDS.map(([key, , , example]) => [key, h("textarea", { name: key, rows: 2, placeholder: example })]));
  // this shot's own settings; empty: the board's (the "Every shot" fields)
  const own = {
    resolution: h("input", { type: "text", name: "resolution", list: "resolutions", placeholder: "the board's", pattern: "^(480p|720p|[0-9]+x[0-9]+)$" }),
    seconds: h("input", { type: "number", name: "seconds", min: 0.25, max: 10, step: 0.25, placeholder: "the board's" }),
    quality: h("select", { name: "quality" }, h("option", { value: "", text: "the board's" }), h("option", { value: "draft", text: "draft" }), h("option", { value: "final", text: "final" })),
    look: h("input", { type: "text", name: "look", list: "looks", placeholder: "the board's" }),
    seed: h("input", { type: "number", name: "seed", min: 0, step: 1, placeholder: "the board's" }),
  };
  const preview = h("output", { class: "preview", "aria-live": "polite", text: "" });
  const item = h(
    "li",
    { class: "card shot", dataset: { index } },
    h("h3", { text: `Shot ${index + 1}` }),
    field("Shot name", name, { param: `${prefix}.name` }),
    h("div", { class: "grid" }, ...SHOT_FIELDS.map(([key, label, english]) => field(`${english} · ${label}`, inputs[key], { param: `${prefix}.shot.${key}` }))),
    field("Free prompt", prompt, { param: `${prefix}.prompt` }),
    h(
      "details",
      { class: "own-settings" },
      h("summary", { text: "Settings of this shot" }),
      h("div", { class: "grid" },
        field("Size of this shot", own.resolution, { param: `${prefix}.resolution`, hint: "480p, 720p or WxH" }),
        field("Length of this shot (s)", own.seconds, { param: `${prefix}.seconds` }),
        field("Draft or final (this shot)", own.quality, { param: `${prefix}.quality` }),
        field("Look of this shot", own.look, { param: `${prefix}.look` }),
        field("Seed of this shot", own.seed, { param: `${prefix}.seed` }),
      ),
    ),
    h("p", { class: "preview-line" }, h("span", { class: "hint", text: "Prompt sent to the model: " }), preview),
  );
  item.shotValue = () => {
    const shot = {};
    for (const [key] of SHOT_FIELDS) if (inputs[key].value.trim()) shot[key] = inputs[key].value;
    const value = {};
    if (name.value.trim()) value.name = name.value.trim();
    if (prompt.value.trim()) value.prompt = prompt.value;
    if (Object.keys(shot).length) value.shot = shot;
    for (const [key, control] of Object.entries(own)) {
      const text = control.value.trim();
      if (text) value[key] = key === "seconds" || key === "seed" ? Number(text) : text;
    }
    return value;
  };
  let timer;
  let asked = 0;
  const refresh = () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      const { prompt: text, shot } = item.shotValue();
      const ask = ++asked;
      if (!text && !shot) { preview.textContent = ""; return; }
      try {
        const compiled = await api("/v1/prompts/compile", { method: "POST", body: { prompt: text, shot } });
        if (ask === asked) preview.textContent = compiled.prompt;
      } catch (error) {
        if (ask === asked) preview.textContent = `(${describe(error)})`;
      }
    }, 200);
  };
  item.addEventListener("input", refresh);
  return item;
}

function boardBody(shots, common) {
  const every = {};
  const text = (key) => common[key].value.trim();
  if (text("negative_prompt")) every.negative_prompt = common.negative_prompt.value;
  if (text("resolution")) every.resolution = text("resolution");
  if (common.aspect.value) every.aspect = common.aspect.value;
  if (text("seconds")) every.seconds = Number(text("seconds"));
  if (common.quality.value) every.quality = common.quality.value;
  if (text("steps")) every.steps = Number(text("steps"));
  if (text("look")) every.look = text("look");
  // the board's settings go at the board's level (each shot takes what it does not give itself), so a
  // refusal names the field that was given; a seed has no board-level field: each shot without one gets it
  const seed = text("seed") ? Number(text("seed")) : undefined;
  const body = { ...every, shots: [...shots.children].map((item) => ({ seed, ...item.shotValue() })) };
  if (text("title")) body.title = text("title");
  const variants = { seeds: Number(text("takes") || 1) };
  const values = common.values.value.split("\n").map((line) => line.trim()).filter(Boolean);
  if (common.vary.value && values.length) variants.grid = { [common.vary.value]: values };
  body.variants = variants;
  return body;
}

// Create the board; a refusal is shown next to the field it names (or above the button) and nothing is lost.
async function send(form, formError, submit, request) {
  for (const control of form.querySelectorAll("[aria-invalid]")) {
    control.removeAttribute("aria-invalid");
    const box = document.getElementById(`${control.id}-error`);
    if (box) { box.hidden = true; box.textContent = ""; }
  }
  formError.textContent = "";
  submit.disabled = true;
  try {
    const board = await api("/v1/storyboards", { method: "POST", ...request() });
    location.hash = `#/boards/${board.id}`;
  } catch (error) {
    const controls = error.param ? controlsFor(form, error.param) : [];
    if (controls.length) {
      const box = document.getElementById(`${controls[0].id}-error`);
      box.textContent = describe(error);
      box.hidden = false;
      for (const control of controls) control.setAttribute("aria-invalid", "true");
      controls[0].focus();
    } else {
      formError.textContent = describe(error);
    }
  } finally {
    submit.disabled = false;
  }
}

// The controls a refusal's `param` names: the shot's own field when it was given, else the board's; a
// refused shot (`shots.N.shot`: the content policy names the shot, not a field) marks its filled fields.
function controlsFor(form, param) {
  const shot = param.match(/^shots\.(\d+)\.shot$/);
  if (shot) {
    const fields = [...form.querySelectorAll(`[data-param^="shots.${shot[1]}.shot."]`)];
    const filled = fields.filter((control) => control.value.trim());
    return filled.length ? filled : fields.slice(0, 1);
  }
  const own = form.querySelector(`[data-param="${CSS.escape(param)}"]`);
  if (own && (own.value.trim() || !/^shots\.\d+\./.test(param))) return [own];
  const candidates = [param.replace(/^shots\.\d+\./, ""), param.replace(/\.\d+$/, ""), param.split(".").slice(0, 2).join(".")];
  for (const name of candidates) {
    const control = form.querySelector(`[data-param="${CSS.escape(name)}"]`);
    if (control) return [control];
  }
  return own ? [own] : [];
}

function dropZone(formError) {
  const input = h("input", { type: "file", accept: ".yaml,.yml,.json", id: "board-file" });
  const status = h("p", { class: "error", role: "alert" });
  const upload = async (file) => {
    status.textContent = "";
    const text = await file.text();
    try {
      const request = file.name.toLowerCase().endsWith(".json") ? { body: JSON.parse(text) } : { yaml: text };
      const board = await api("/v1/storyboards", { method: "POST", ...request });
      location.hash = `#/boards/${board.id}`;
    } catch (error) {
      status.textContent = `${file.name}: ${error instanceof SyntaxError ? `not valid JSON (${error.message})` : describe(error)}`;
    }
  };
  input.addEventListener("change", () => input.files[0] && upload(input.files[0]));
  const zone = h(
    "section",
    {
      class: "drop card",
      "aria-labelledby": "drop-title",
      ondragover: (event) => { event.preventDefault(); zone.classList.add("over"); },
      ondragleave: () => zone.classList.remove("over"),
      ondrop: (event) => {
        event.preventDefault();
        zone.classList.remove("over");
        const file = event.dataTransfer.files[0];
        if (file) upload(file);
      },
    },
    h("h2", { id: "drop-title", text: "Or drop a storyboard file" }),
    h("p", { class: "hint", text: "YAML or JSON, the same file as `previz submit --storyboard`." }),
    field("Storyboard file", input),
    status,
  );
  return zone;
}
