"""BodyPolicy: the ASGI middleware every request body passes before a route sees it.

In this order, so that no body makes the Ingress do more than linear work in its bytes, and none is
read for a caller without a key:
1. A body on an API route (`/v1/…`, but the signed `/v1/artifacts` links) is authenticated first: no
   usable key is 401 (`missing_api_key`, `invalid_api_key`, `revoked_api_key`) before a byte of the body
   is read. The caller found is handed to the route (serve.http.deps.authenticated_caller), not looked
   up twice.
2. Its size is bounded per route and media type (`BODY_LIMITS`, published in the OpenAPI document as
   `x-max-body-bytes`): over it is 413 `request_too_large`, at once when Content-Length says so (nothing
   is read), else as soon as the stream passes the limit (the rest is never read).
3. A body that stops arriving is 408 `body_timeout`: no byte for `idle_timeout_s`, or not complete
   within `total_timeout_s`, and the connection is closed.
4. A document body is read once, in a worker thread, within serve.documents.DEFAULT_LIMITS: JSON that
   cannot be read is 400 `invalid_json` on every route; a YAML body (`application/yaml`, on the routes of
   YAML_ROUTES) is read by the one document reader, as the CLI reads files, and passed on as JSON (400
   `invalid_yaml`); nesting deeper than the limit is 400 `document_too_deep`; a document that expands
   past the limit (YAML aliases) is 413 `document_too_large`.
5. Every string in a JSON body is checked by the one text policy (serve.http.forms.check_text): a
   control character anywhere (a prompt, a title, a label key) is 400 `invalid_value` naming the field.
A client that goes away mid-body is logged at INFO: it is the client's doing, not a server error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.documents import (
    DEFAULT_LIMITS,
    YAML_MEDIA_TYPES,
    DocumentError,
    DocumentTooDeep,
    DocumentTooLarge,
    check_json_value,
    load_mapping,
)
from serve.http.deps import CALLER_STATE_KEY, caller_of_header, state_of
from serve.http.errors import ApiError, error_response
from serve.http.forms import check_text

logger = logging.getLogger("ray.serve")

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
DEFAULT_BODY_BYTES = 256 << 10  # a remix, a promote, a board's edit, an admin change: a few KB each
BODY_IDLE_TIMEOUT_S = 15.0  # no byte of the body for this long: the client stalled
BODY_TOTAL_TIMEOUT_S = 120.0  # a create with two keyframes (24 MiB) at 1.7 Mbit/s
JSON_MEDIA = "application/json"
FORM_MEDIA = ("multipart/form-data", "application/x-www-form-urlencoded")


@dataclass(frozen=True, slots=True)
class BodyLimit:
    """The most bytes one route takes in a body, per media type (others: the JSON limit)."""

    method: str
    path: str  # the route's path as the OpenAPI document spells it
    max_bytes: dict[str, int]  # media type -> most bytes

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and _path_pattern(self.path).fullmatch(path) is not None

    def for_media_type(self, media_type: str) -> int:
        return self.max_bytes.get(media_type, self.max_bytes[JSON_MEDIA])


# a create is a few KB, plus its keyframes: two images of 8 MiB (serve.http.images) as base64 data URLs
CREATE_BYTES = 24 << 20
DOCUMENT_BYTES = 4 << 20  # the largest storyboard (100 shots of full fields) is under 2 MiB; a 33³ LUT ~1 MB
BOARD_JSON_BYTES = 64 << 20  # a JSON storyboard may carry its panels as data URLs (about 20 of 2 MiB)
BODY_LIMITS = (
    BodyLimit("POST", "/v1/videos", {JSON_MEDIA: CREATE_BYTES, **dict.fromkeys(FORM_MEDIA, CREATE_BYTES)}),
    BodyLimit(
        "POST",
        "/v1/storyboards",
        {JSON_MEDIA: BOARD_JSON_BYTES, **dict.fromkeys(YAML_MEDIA_TYPES, DOCUMENT_BYTES)},
    ),
    BodyLimit("PUT", "/v1/admin/projects/{name}/luts/{look}", {JSON_MEDIA: DOCUMENT_BYTES}),
    # an edited timeline of a 100-shot board with its notes, well under 4 MiB (its AAF: 1.4 MB)
    BodyLimit(
        "PUT",
        "/v1/storyboards/{storyboard_id}/timeline",
        {
            JSON_MEDIA: DOCUMENT_BYTES,
            **dict.fromkeys(("text/plain", "application/xml", "application/octet-stream"), DOCUMENT_BYTES),
        },
    ),
)
MAX_BODY_BYTES = max(size for limit in BODY_LIMITS for size in limit.max_bytes.values())
# routes that take a hand-written document as YAML too (a storyboard file dropped on the page)
YAML_ROUTES = frozenset({("POST", "/v1/storyboards")})
THREAD_ABOVE_BYTES = 64 << 10  # a larger document is read in a worker thread, not on the event loop


def body_limit(method: str, path: str, media_type: str) -> int:
    """The most bytes a `method` request to `path` may send as `media_type`."""
    for limit in BODY_LIMITS:
        if limit.matches(method, path):
            return limit.for_media_type(media_type)
    return DEFAULT_BODY_BYTES


def _path_pattern(path: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(path)))


class ClientDisconnected(Exception):
    """The client closed the connection before its body arrived."""


class BodyPolicy:
    def __init__(
        self,
        app: ASGIApp,
        idle_timeout_s: float = BODY_IDLE_TIMEOUT_S,
        total_timeout_s: float = BODY_TOTAL_TIMEOUT_S,
    ) -> None:
        self.app = app
        self.idle_timeout_s = idle_timeout_s
        self.total_timeout_s = total_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        media_type = headers.get("content-type", JSON_MEDIA).split(";")[0].strip().lower()
        max_bytes = body_limit(scope["method"], scope["path"], media_type)
        try:
            if needs_key(scope["path"]):
                scope = await self._authenticated(scope, headers.get("authorization"))
            declared = headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise _too_large(int(declared), max_bytes)
            body = await self._read(receive, max_bytes)
            if body and media_type in YAML_MEDIA_TYPES and (scope["method"], scope["path"]) in YAML_ROUTES:
                body = await _off_loop(yaml_as_json, body)
                scope = {**scope, "headers": _json_headers(scope["headers"], len(body))}
                media_type = JSON_MEDIA
            if body and (media_type == JSON_MEDIA or media_type.endswith("+json")):
                await _off_loop(check_json_body, body)
        except ClientDisconnected:
            logger.info(
                "client went away before sending its whole body: %s %s", scope["method"], scope["path"]
            )
            return
        except ApiError as error:
            await self._refuse(scope, receive, send, error)
            return
        await self.app(scope, _replay(body), send)

    async def _authenticated(self, scope: Scope, authorization: str | None) -> Scope:
        caller = await caller_of_header(state_of(scope.get("app", self.app)), authorization)
        return {**scope, "state": {**scope.get("state", {}), CALLER_STATE_KEY: caller}}

    async def _read(self, receive: Receive, max_bytes: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.total_timeout_s
        while True:
            wait_s = min(self.idle_timeout_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait_s, 0.0))
            except TimeoutError:
                raise ApiError(
                    408,
                    "body_timeout",
                    f"the request body stopped arriving after {size:,} bytes; send the whole body within "
                    f"{self.total_timeout_s:g} s, with no pause over {self.idle_timeout_s:g} s",
                ) from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(None, max_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
        headers = {**(error.headers or {}), "Connection": "close"}
        response = error_response(error.status, error.code, error.message, error.param, headers)
        await response(scope, receive, send)


def needs_key(path: str) -> bool:
    """Whether a request to `path` must carry an API key (every API route but the signed artifact links)."""
    return path.startswith("/v1/") and not path.startswith("/v1/artifacts/")


def _too_large(declared: int | None, max_bytes: int) -> ApiError:
    size = f"{declared:,} bytes" if declared is not None else "more than that"
    return ApiError(413, "request_too_large", f"the request body has {size}; at most {max_bytes:,} bytes")


async def _off_loop(check: Any, body: bytes) -> Any:
    return await asyncio.to_thread(check, body) if len(body) > THREAD_ABOVE_BYTES else check(body)


def yaml_as_json(body: bytes) -> bytes:
    """A YAML request document as the JSON the route reads (400 `invalid_yaml` when it is not one)."""
    try:
        document = load_mapping(body.decode("utf-8"), "yaml")
    except UnicodeDecodeError as error:
        raise ApiError(400, "invalid_yaml", f"the YAML body is not UTF-8 ({error.reason})") from None
    except DocumentError as error:
        raise _document_error(error, "invalid_yaml") from None
    return json.dumps(document, ensure_ascii=False).encode()


def check_json_body(body: bytes) -> None:
    """A JSON body's text policy and nesting depth (400 `invalid_json` when it cannot be read)."""
    try:
        value = json.loads(body)
    except UnicodeDecodeError as error:
        raise ApiError(400, "invalid_json", f"the request body is not UTF-8 ({error.reason})") from None
    except RecursionError:
        too_deep = DocumentTooDeep(f"nested deeper than {DEFAULT_LIMITS.max_depth} levels")
        raise _document_error(too_deep, "invalid_json") from None
    except ValueError as error:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {error}") from None
    try:
        check_json_value(value)
    except DocumentError as error:
        raise _document_error(error, "invalid_json") from None
    check_text(value, "")


def _document_error(error: DocumentError, unreadable_code: str) -> ApiError:
    if isinstance(error, DocumentTooLarge):
        return ApiError(413, "document_too_large", f"the request body is too large once read: {error}")
    if isinstance(error, DocumentTooDeep):
        return ApiError(400, "document_too_deep", f"the request body is {error}")
    return ApiError(400, unreadable_code, f"the body is {error}")


def _json_headers(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    kept = [(key, value) for key, value in headers if key.lower() not in (b"content-type", b"content-length")]
    return [*kept, (b"content-type", JSON_MEDIA.encode()), (b"content-length", str(length).encode())]


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive
