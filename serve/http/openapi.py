"""The published OpenAPI document, made to say exactly what the server accepts.

FastAPI's generated schema states each field's type; the server checks more. What JSON Schema can state
is added here and checked by tests/test_api_schema.py (schemathesis' conformance checks):
- every request string refuses control characters (the one text policy, serve.http.forms.check_text);
- sizes are `WxH` in multiples of 16 from 32 to 1920, `seconds` a number of seconds 0.25–10 as text or a
  number, `steps` 1–100, seeds 0 – 2**53-1, `model` one of the served model's names in any case;
- the cross-field rules: a prompt or a shot, `seconds` or `duration`, `size` or `resolution`, `aspect`
  with a preset only, a shot's fields named all in English or all in Chinese, one of them not blank, no
  `cache` with `quality: draft` (a draft runs every step);
- a multipart create's structured fields (`shot`, `labels`, `cache`, `loras`) are declared JSON parts
  holding the whole value (routes.videos.CREATE_BODY's `encoding`), as serve.http.forms reads them: a
  list sent a part per item is read the same way unless an item is itself a list, which no valid one is;
- header and query parameters are absent or a value, never null;
- a storyboard may be sent as YAML too (`application/yaml`, the CLI's board file format).
What no static schema can state (this deployment's size envelope, its callback policy, the project's
label policy, its adapters and tiers, the tier a video without `quality` defaults to, the compiled
prompt's length, a board's shots × variants) answers 400 with one of the codes of
serve.http.errors.RULES_BEYOND_SCHEMA, listed on every 400 of the document.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from pipeline.prompt import FIELD_LABELS, MAX_FIELD_CHARS
from pipeline.spec import MAX_DURATION_S, MAX_SEED, MAX_SIDE, MAX_STEPS, MIN_DURATION_S, MIN_SIDE
from serve.http.forms import CONTROL_CHARACTERS
from serve.http.limits import body_limit
from serve.http.schemas import SERVED_MODEL_ALIASES, VideoCreate

# any text without the control characters check_text refuses
TEXT_PATTERN = "^" + CONTROL_CHARACTERS.pattern.replace("[", "[^", 1) + "*$"
NON_BLANK_PATTERN = r"\S"
_SIDES = "|".join(str(side) for side in range(MIN_SIDE, MAX_SIDE + 1, 16))
SIZE_PATTERN = f"^(?:{_SIDES})x(?:{_SIDES})$"  # what `size` accepts (the envelope may narrow it)
RESOLUTION_PATTERN = f"^(?:480[pP]|720[pP]|(?:{_SIDES})[xX](?:{_SIDES}))$"
WXH_PATTERN = "^[0-9]+[xX][0-9]+$"
# SECONDS_TEXT's plain numbers from 0.25 to 10 (tests/test_api_schema.py checks it against both)
SECONDS_TEXT_PATTERN = r"^(?:10(?:\.0+)?|[1-9](?:\.[0-9]+)?|0\.(?:2[5-9]|[3-9])[0-9]*)$"


def caseless(text: str) -> str:
    """A regular expression matching `text` in any letter case (JSON Schema patterns take no flags)."""
    return "".join(f"[{char.lower()}{char.upper()}]" if char.isalpha() else _escape(char) for char in text)


def _escape(char: str) -> str:
    return "\\" + char if char in r".^$*+?()[]{}|\/" else char


MODEL_PATTERN = "^(?:" + "|".join(caseless(name) for name in sorted(SERVED_MODEL_ALIASES)) + ")$"


def present(name: str) -> dict[str, Any]:
    """`name` is given and not null."""
    return {"required": [name], "properties": {name: {"not": {"type": "null"}}}}


def not_both(first: str, second: str) -> dict[str, Any]:
    return {"not": {"allOf": [present(first), present(second)]}}


PROMPT_OR_SHOT: dict[str, Any] = {
    "anyOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string", "pattern": NON_BLANK_PATTERN}}},
        present("shot"),
    ]
}
SETTINGS_RULES: list[dict[str, Any]] = [
    not_both("seconds", "duration"),
    not_both("size", "resolution"),
    {"not": {"allOf": [present("size"), present("aspect")]}},
    {
        "not": {
            "allOf": [
                present("aspect"),
                {"required": ["resolution"], "properties": {"resolution": {"pattern": WXH_PATTERN}}},
            ]
        }
    },
    # pipeline.spec.DRAFT_CACHE_PROBLEM; a tier left to its default is checked at admission
    {
        "not": {
            "allOf": [
                {"required": ["quality"], "properties": {"quality": {"const": "draft"}}},
                present("cache"),
            ]
        }
    },
]
# field -> its exact schema, in the components that have it
FIELD_SCHEMAS: dict[str, dict[str, Any]] = {
    "size": {"anyOf": [{"type": "string", "pattern": SIZE_PATTERN}, {"type": "null"}]},
    "resolution": {"anyOf": [{"type": "string", "pattern": RESOLUTION_PATTERN}, {"type": "null"}]},
    "seconds": {
        "anyOf": [
            {"type": "string", "pattern": SECONDS_TEXT_PATTERN},
            {"type": "number", "minimum": MIN_DURATION_S, "maximum": MAX_DURATION_S},
            {"type": "null"},
        ]
    },
    "duration": {
        "anyOf": [{"type": "number", "minimum": MIN_DURATION_S, "maximum": MAX_DURATION_S}, {"type": "null"}]
    },
    "steps": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_STEPS}, {"type": "null"}]},
    "seed": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": MAX_SEED}, {"type": "null"}]},
    "input_reference": {
        "anyOf": [
            # OpenAI's ImageInputReferenceParam with exactly one of its two fields
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["image_url"],
                "properties": {"image_url": {"type": "string", "description": "A base64 data URL."}},
            },
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["file_id"],
                "properties": {"file_id": {"type": "string", "description": "A video id: its last frame."}},
            },
            {"enum": ["", None]},
        ]
    },
}
SETTINGS_COMPONENTS = ("VideoCreate", "StoryboardShot", "GenerationSettings")
BOARD_DEFAULTS_COMPONENT = "StoryboardCreate"  # the same fields as every shot's defaults (no prompt)


def shot_schema(component: dict[str, Any]) -> None:
    """ShotSpec: its fields named all in English or all in Chinese, each at most MAX_FIELD_CHARS as sent,
    at least one of them not blank."""
    english = component["properties"]
    component.pop("properties")
    component.pop("additionalProperties", None)

    def named(names: dict[str, str]) -> dict[str, Any]:  # English name -> the name used
        text = {"anyOf": [{"type": "string", "maxLength": MAX_FIELD_CHARS}, {"type": "null"}]}
        return {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                used: {**text, "description": english[name].get("description", "")}
                for name, used in names.items()
            },
            "anyOf": [
                {"required": [used], "properties": {used: {"type": "string", "pattern": NON_BLANK_PATTERN}}}
                for used in names.values()
            ],
        }

    component["anyOf"] = [named({name: name for name in FIELD_LABELS}), named(FIELD_LABELS)]


def refuse_control_characters(schema: Any) -> None:
    """Every string of `schema` (a request component) gets the text policy's pattern."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and isinstance(schema.get("additionalProperties"), dict):
            schema.setdefault("propertyNames", {}).setdefault("type", "string")  # a dict's keys are text too
        if schema.get("type") == "string" and "enum" not in schema and "const" not in schema:
            if "pattern" not in schema:
                schema["pattern"] = TEXT_PATTERN
            elif schema["pattern"] != TEXT_PATTERN:
                schema.setdefault("allOf", []).append({"pattern": TEXT_PATTERN})
        for value in schema.values():
            refuse_control_characters(value)
    elif isinstance(schema, list):
        for value in schema:
            refuse_control_characters(value)


def request_components(schema: dict[str, Any]) -> set[str]:
    """The names of the components that request bodies use, directly or through other components."""
    components = schema["components"]["schemas"]
    found: set[str] = set()
    pending = [
        content["schema"]
        for path in schema["paths"].values()
        for operation in path.values()
        for content in operation.get("requestBody", {}).get("content", {}).values()
    ]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                if name not in found:
                    found.add(name)
                    pending.append(components[name])
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return found


def parameters_are_never_null(schema: dict[str, Any]) -> None:
    for path in schema["paths"].values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                branches = parameter.get("schema", {}).get("anyOf")
                if branches and {"type": "null"} in branches:
                    rest = [branch for branch in branches if branch != {"type": "null"}]
                    parameter["schema"].pop("anyOf")
                    parameter["schema"].update(rest[0] if len(rest) == 1 else {"anyOf": rest})


def build(app: FastAPI, description: str | None) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title, version=app.version, summary=app.summary, description=description, routes=app.routes
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    # the create body is read by hand (JSON or form), so its schema is added here
    generated = VideoCreate.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in generated.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components["VideoCreate"] = generated
    for name in (*SETTINGS_COMPONENTS, BOARD_DEFAULTS_COMPONENT):
        if name in components:
            component = components[name]
            for field, field_schema in FIELD_SCHEMAS.items():
                if field in component["properties"]:
                    described = {
                        key: component["properties"][field].get(key) for key in ("title", "description")
                    }
                    component["properties"][field] = {
                        **copy.deepcopy(field_schema),  # each its own: the text policy adds to it in place
                        **{k: v for k, v in described.items() if v},
                    }
            component["allOf"] = [
                *([PROMPT_OR_SHOT] if name != BOARD_DEFAULTS_COMPONENT else []),
                *SETTINGS_RULES,
            ]
    if "model" in components["VideoCreate"]["properties"]:
        components["VideoCreate"]["properties"]["model"]["pattern"] = MODEL_PATTERN
    if "VideoPromote" in components:
        size = components["VideoPromote"]["properties"]["size"]
        components["VideoPromote"]["properties"]["size"] = {
            **copy.deepcopy(FIELD_SCHEMAS["size"]),
            **{key: size[key] for key in ("title", "description") if key in size},
        }
    if "StoryboardCreate" in components:
        components["StoryboardCreate"]["properties"]["model"]["pattern"] = MODEL_PATTERN
    if "PromptCompile" in components:
        components["PromptCompile"]["allOf"] = [PROMPT_OR_SHOT]
    board_body = schema["paths"]["/v1/storyboards"]["post"]["requestBody"]["content"]
    board_body["application/yaml"] = board_body["application/json"]  # serve/http/limits.py YAML_ROUTES
    shot_schema(components["ShotSpec"])
    for name in request_components(schema) | {"VideoCreate"}:
        refuse_control_characters(components[name])
    parameters_are_never_null(schema)
    state_body_limits(schema)
    return schema


def state_body_limits(schema: dict[str, Any]) -> None:
    """Each request body's size limit (serve.http.limits.body_limit) as `x-max-body-bytes` on each of its
    media types, and in words in its description."""
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            body = operation.get("requestBody") if isinstance(operation, dict) else None
            if body is None:
                continue
            limits = {media: body_limit(method.upper(), path, media) for media in body.get("content", {})}
            for media, max_bytes in limits.items():
                body["content"][media]["x-max-body-bytes"] = max_bytes
            words = ", ".join(f"{max_bytes:,} bytes as {media}" for media, max_bytes in limits.items())
            said = body.get("description")
            body["description"] = (f"{said} " if said else "") + f"At most {words} (413 otherwise)."
