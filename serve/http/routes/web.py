"""`/studio/`: the studio web page, static ES modules from serve/web/ served by the Ingress itself.

Same origin as the API, nothing fetched from elsewhere. Every file goes out with a Content-Security-Policy
that runs only this origin's scripts and styles; clips and posters may come from the artifact store's
origin (S3 presigned links), which media elements load without an API key."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from serve.http.deps import state_of
from serve.http.errors import ApiError
from serve.storage import StorageSettings

WEB_ROOT = Path(__file__).resolve().parents[2] / "web"
AWS_S3_ORIGINS = ("https://*.amazonaws.com",)

router = APIRouter(include_in_schema=False)


def artifact_origins(storage: StorageSettings) -> tuple[str, ...]:
    """The origins other than this one that clips and posters are linked from."""
    if storage.kind == "s3":
        return (_origin(storage.s3_endpoint_url),) if storage.s3_endpoint_url else AWS_S3_ORIGINS
    return (_origin(storage.public_base_url),) if storage.public_base_url else ()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def content_security_policy(storage: StorageSettings | None) -> str:
    media = " ".join(["'self'", "blob:", *(artifact_origins(storage) if storage is not None else ())])
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            f"img-src {media} data:",
            f"media-src {media}",
            "connect-src 'self'",
            "form-action 'none'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        ]
    )


def security_headers(app: object = None) -> list[tuple[bytes, bytes]]:
    """The page's headers; its media origins come from the storage settings of `app`'s state (none while
    the Ingress starts)."""
    try:
        storage = state_of(app).args.storage
    except ApiError:
        storage = None
    policy = content_security_policy(storage)
    return [
        (b"content-security-policy", policy.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"cache-control", b"no-cache"),  # revalidate: a new release's modules reach open pages at once
    ]


class StudioFiles:
    """serve/web/ as static files (index.html at the folder), each with the page's security headers."""

    def __init__(self) -> None:
        self.files = StaticFiles(directory=WEB_ROOT, html=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = security_headers(scope.get("app"))
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        await self.files(scope, receive, send_with_headers)


@router.get("/")
async def root(request: Request) -> Response:
    """A browser gets the page; an API client a pointer to the API."""
    if "text/html" in request.headers.get("accept", ""):
        return RedirectResponse("/studio/", status_code=303)
    return JSONResponse(
        {"service": "previz", "studio": "/studio/", "docs": "/docs", "openapi": "/openapi.json", "api": "/v1"}
    )


@router.get("/studio")
async def studio() -> RedirectResponse:
    return RedirectResponse("/studio/", status_code=308)
