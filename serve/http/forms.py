"""Reading a create request's body: JSON, a multipart form (what the openai package sends) or a
urlencoded form, with bracketed keys (`shot[camera]`) nested the way the openai package writes them."""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request

from serve.http.errors import ApiError


@dataclass(frozen=True, slots=True)
class UploadedFile:
    """A multipart part that carried a file (a filename in its Content-Disposition): its bytes, for the one
    field that takes a file (`input_reference`); the schema refuses one anywhere else."""

    filename: str
    content_type: str
    data: bytes

    def __repr__(self) -> str:  # never the bytes, in a log or an error message
        return f"UploadedFile({self.filename!r}, {self.content_type!r}, {len(self.data)} bytes)"


async def read_fields(request: Request) -> dict[str, Any]:
    """The create request's fields, from JSON, a multipart form (the openai package) or a urlencoded form.

    Form keys in bracket notation nest as the openai package writes them: `shot[camera]`, `labels[take]`."""
    body = await request.body()  # its size is bounded by the body policy (serve.http.limits.BODY_LIMITS)
    content_type = request.headers.get("content-type", "application/json")
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        fields = typed_form_fields(json_object_parts(unflatten(multipart_items(content_type, body))))
    elif media_type == "application/x-www-form-urlencoded":
        try:
            items = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
        except (UnicodeDecodeError, ValueError) as error:
            raise ApiError(400, "invalid_form", f"the form body cannot be read: {error}") from None
        fields = typed_form_fields(unflatten(items))
    elif media_type == "application/json" or media_type.endswith("+json"):
        if not body.strip():
            raise ApiError(400, "invalid_json", "the request body is empty; send a JSON object")
        try:
            fields = json.loads(body)
        except (ValueError, RecursionError) as error:
            raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {error}") from None
        if not isinstance(fields, dict):
            raise ApiError(
                400, "invalid_json", f"the request body must be a JSON object, not {type(fields).__name__}"
            )
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send application/json or multipart/form-data, not {media_type!r}",
        )
    check_text(fields, "")
    return fields


# A form sends every value as text; these create fields are numbers or booleans (JSON must send them as such).
FORM_INTEGERS = ("steps", "seed", "fps")
FORM_NUMBERS = ("duration",)
FORM_OBJECTS = ("shot", "labels", "cache", "keyframes")
FORM_CACHE_INTEGERS = ("max_skip", "warmup_steps")  # `cache[max_skip]` etc. in a form
# list fields of JSON objects: one part holding the list (the document's declared encoding), or one
# object part per item (the field repeated)
FORM_JSON_LISTS = ("loras",)
FORM_FREE_TEXT = ("prompt", "negative_prompt")
FORM_BOOLEANS = {"true": True, "false": False}
# Control characters no stored text may hold (tab, newline and carriage return are text): C0, DEL, C1.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def json_object_parts(fields: dict[str, Any]) -> dict[str, Any]:
    """A multipart part holds JSON where text cannot say it (OpenAPI's encoding of multipart/form-data):
    an object field (`shot`, `labels`) may be one part of JSON, as well as bracketed parts (`shot[camera]`,
    the openai package's way); and `null` is null in every field but the free-text ones."""
    decoded = dict(fields)
    for name, value in fields.items():
        if value == "null" and name not in FORM_FREE_TEXT:
            decoded[name] = None
        elif name in FORM_OBJECTS and isinstance(value, str):
            with contextlib.suppress(ValueError, RecursionError):  # else the schema refuses the text
                decoded[name] = json.loads(value)
        elif name in FORM_JSON_LISTS:
            decoded[name] = _json_list(value)
    return decoded


def _json_list(value: Any) -> Any:
    """A list field's parts as one list: `[{...}, {...}]` in one part (the OpenAPI document declares this
    encoding: serve.http.routes.videos.CREATE_BODY), or `{...}` per repeated part. A lone part holding a
    JSON list is the whole list, so a client must not send one part per item when an item is a list
    (no valid item is)."""
    parts = value if isinstance(value, list) else [value]
    items: list[Any] = []
    for part in parts:
        try:
            decoded = json.loads(part) if isinstance(part, str) else part
        except (ValueError, RecursionError):
            return value  # not JSON: the schema refuses the text
        if isinstance(decoded, list) and not isinstance(value, list):
            return decoded
        items.append(decoded)
    return items


def typed_form_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The form's text values of numeric and boolean fields as numbers and booleans, where they read as
    such (ASCII digits only); anything else stays text, for the schema to refuse with its own message."""
    typed = dict(fields)
    for name in FORM_INTEGERS:
        value = typed.get(name)
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
            typed[name] = int(value)
    for name in FORM_NUMBERS:
        value = typed.get(name)
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", value.strip()):
            typed[name] = float(value)
    cache = typed.get("cache")
    if isinstance(cache, dict):
        cache = typed["cache"] = dict(cache)
        for name, value in cache.items():
            if not isinstance(value, str):
                continue
            if name in FORM_CACHE_INTEGERS and re.fullmatch(r"-?[0-9]+", value.strip()):
                cache[name] = int(value)
            elif name == "threshold" and re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", value.strip()):
                cache[name] = float(value)
    if isinstance(typed.get("label"), str) and typed["label"].strip().lower() in FORM_BOOLEANS:
        typed["label"] = FORM_BOOLEANS[typed["label"].strip().lower()]
    return typed


def check_text(value: Any, where: str) -> None:
    """Reject text no database should store: control characters (NUL among them; PostgreSQL refuses it)
    and unpaired surrogates. Every JSON body passes here (serve.http.limits), and every create form."""
    if isinstance(value, str):
        control = CONTROL_CHARACTERS.search(value)
        if control is not None:
            name = where or "body"
            raise ApiError(
                400,
                "invalid_value",
                f"`{name}` contains the control character U+{ord(control.group()):04X} at position "
                f"{control.start()}; text may hold printable characters, tabs and line breaks",
                where or None,
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(
                400, "invalid_value", f"`{where or 'body'}` is not valid Unicode", where or None
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, where)
            check_text(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_text(item, f"{where}.{index}")


def multipart_items(content_type: str, body: bytes) -> list[tuple[str, Any]]:
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    message = BytesParser(policy=policy.HTTP).parsebytes(header + body)
    if not message.is_multipart():
        raise ApiError(400, "invalid_form", "the multipart body cannot be read (check its boundary)")
    items: list[tuple[str, Any]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "invalid_form", "a multipart part has no field name")
        if part.get_filename() is not None:
            data = part.get_payload(decode=True) or b""
            items.append((name, UploadedFile(part.get_filename(), part.get_content_type(), data)))
            continue
        payload = part.get_payload(decode=True) or b""
        try:
            items.append((name, payload.decode("utf-8")))
        except UnicodeDecodeError:
            raise ApiError(400, "invalid_form", f"form field {name!r} is not UTF-8 text", name) from None
    return items


def unflatten(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """`[("shot[camera]", "dolly"), ("seeds[]", "1"), ("seeds[]", "2")]` -> {"shot": {"camera": ...}, ...}."""
    fields: dict[str, Any] = {}
    for key, value in items:
        match = re.fullmatch(r"([^\[\]]+)((?:\[[^\[\]]*\])*)", key)
        if match is None:
            raise ApiError(400, "invalid_form", f"form field name {key!r} is malformed", key)
        path = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        target: Any = fields
        for part, following in zip(path, [*path[1:], None], strict=True):
            valid = part != "" if isinstance(target, dict) else part == "" and following is None
            if not valid:
                raise ApiError(400, "invalid_form", f"form field name {key!r} is not supported", key)
            if following is None:
                if isinstance(target, list):
                    target.append(value)
                elif part in target and target is fields and part in FORM_JSON_LISTS:
                    previous = target[part]
                    target[part] = [*previous, value] if isinstance(previous, list) else [previous, value]
                elif part in target:
                    raise ApiError(400, "invalid_form", f"form field {key!r} is given twice", key)
                else:
                    target[part] = value
                break
            child = target.setdefault(part, [] if following == "" else {})
            if not isinstance(child, list if following == "" else dict):
                raise ApiError(400, "invalid_form", f"form field {key!r} conflicts with another field", key)
            target = child
    return fields
