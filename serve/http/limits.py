"""BodyPolicy: the ASGI middleware every request body passes before a route sees it.

- A body larger than MAX_BODY_BYTES is refused with 413 `request_too_large`: at once when its
  Content-Length says so (nothing is read), else as soon as the stream passes the limit (the rest is
  never read).
- A YAML body (`application/yaml`) on a route of YAML_ROUTES is read by the one document reader
  (serve.documents, as the CLI reads files) and passed on as JSON; YAML that is not a mapping is 400
  `invalid_yaml`.
- A JSON body is checked by the one text policy (serve.http.forms.check_text): a control character
  anywhere in it (a prompt, a title, a label key) is 400 `invalid_value` naming the field.
A client that goes away mid-body is logged at INFO: it is the client's doing, not a server error.
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.documents import YAML_MEDIA_TYPES, DocumentError, load_mapping
from serve.http.errors import ApiError, error_response
from serve.http.forms import check_text

logger = logging.getLogger("ray.serve")

MAX_BODY_BYTES = 4 << 20  # the largest storyboard (100 shots of full fields) is under 2 MiB
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# routes that take a hand-written document as YAML too (a storyboard file dropped on the page)
YAML_ROUTES = frozenset({("POST", "/v1/storyboards")})


class ClientDisconnected(Exception):
    """The client closed the connection before its body arrived."""


class BodyPolicy:
    def __init__(self, app: ASGIApp, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(scope, receive, send, self._too_large(int(declared)))
            return
        try:
            body = await self._read(receive)
        except ClientDisconnected:
            logger.info(
                "client went away before sending its whole body: %s %s", scope["method"], scope["path"]
            )
            return
        except ApiError as error:
            await self._refuse(scope, receive, send, error)
            return
        media_type = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if body and media_type in YAML_MEDIA_TYPES and (scope["method"], scope["path"]) in YAML_ROUTES:
            try:
                body = yaml_as_json(body)
            except ApiError as error:
                await self._refuse(scope, receive, send, error)
                return
            scope = {**scope, "headers": _json_headers(scope["headers"], len(body))}
            media_type = "application/json"
        if body and media_type.endswith("json"):
            try:
                check_text(json.loads(body), "")
            except ApiError as error:
                await self._refuse(scope, receive, send, error)
                return
            except (ValueError, RecursionError):
                pass  # not JSON: the route answers 400 invalid_json in its own words
        await self.app(scope, _replay(body), send)

    async def _read(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large(None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, declared: int | None) -> ApiError:
        size = f"{declared:,} bytes" if declared is not None else "more than that"
        return ApiError(
            413, "request_too_large", f"the request body has {size}; at most {self.max_body_bytes:,} bytes"
        )

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
        response = error_response(
            error.status, error.code, error.message, error.param, {"Connection": "close"}
        )
        await response(scope, receive, send)


def yaml_as_json(body: bytes) -> bytes:
    """A YAML request document as the JSON the route reads (400 `invalid_yaml` when it is not one)."""
    try:
        document = load_mapping(body.decode("utf-8"), "yaml")
    except UnicodeDecodeError as error:
        raise ApiError(400, "invalid_yaml", f"the YAML body is not UTF-8 ({error.reason})") from None
    except DocumentError as error:
        raise ApiError(400, "invalid_yaml", f"the body is {error}") from None
    return json.dumps(document, ensure_ascii=False).encode()


def _json_headers(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    kept = [(key, value) for key, value in headers if key.lower() not in (b"content-type", b"content-length")]
    return [*kept, (b"content-type", b"application/json"), (b"content-length", str(length).encode())]


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive
