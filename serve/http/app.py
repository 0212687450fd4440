"""The HTTP Ingress: the OpenAI-compatible Videos API plus studio extensions (storyboards, live events).

A job is accepted once its row is committed; the Scheduler is only nudged, so a job posted while the
Scheduler restarts is still picked up. Every non-2xx answer is `{"error": {"code", "message", "param"}}`;
a prompt the content policy refuses gets 422 `content_blocked` with the policy's `category` added.

    POST   /v1/videos                   create (JSON, or multipart form as the openai package sends it)
    GET    /v1/videos                   list, cursor paged (after, limit, order; project, status filters)
    GET    /v1/videos/{id}              one video (sends `openai-poll-after-ms` while it runs)
    DELETE /v1/videos/{id}              cancel a queued or running video (409 once finished)
    GET    /v1/videos/{id}/content      the mp4 (`variant=thumbnail`: a JPEG poster frame)
    POST   /v1/videos/{id}/remix        same seed and settings, new prompt
    GET    /v1/videos/{id}/events       server-sent events: stage and step progress
    GET    /v1/videos/{id}/webhooks     deliveries of its callback_url webhook and their attempts
    POST   /v1/storyboards              shots × variants, all created at once
    GET    /v1/storyboards/{id}         every shot's videos, states and links
    GET    /v1/videos/{id}/links        its signed links as JSON (for a page's <video> and <img>)
    GET    /v1/storyboards              the project's storyboards, newest first
    GET    /v1/artifacts/{key}          a signed, expiring link to a stored clip (no key needed)
    GET    /v1/session                  the key's project and role (a page's sign-in)
    POST   /v1/prompts/compile          the prompt a create would encode, from a prompt and/or a shot
    GET    /v1/looks                    the looks a video may name: none, film and the project's LUTs
    GET    /studio/                     the studio web page (serve/web/, same origin, no CDN)
    ...    /v1/admin/...                projects, their quotas and keys (admin keys)

One APIRouter per resource lives in serve/http/routes/; every create goes through serve/http/admission.py;
every job is rendered by serve/http/views.py. The Ingress deployment that serves this app is
serve/http/ingress.py.

Keys: every /v1 route but /v1/artifacts needs `Authorization: Bearer KEY` (401 `missing_api_key`,
`invalid_api_key`, `revoked_api_key`). The key names the project: a request sees only that project's
videos and storyboards (another project's ids are 404 like unknown ones), and a body or query `project`
naming another project is 403 `project_mismatch`. Quotas: 429 `queue_full`, `project_queue_full`,
`gpu_quota_exceeded`, each with Retry-After.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from serve.http import openapi
from serve.http.deps import known_query_parameters
from serve.http.errors import ERROR_RESPONSES, ApiError, error_response, invalid
from serve.http.limits import BodyPolicy
from serve.http.routes import (
    admin,
    artifacts,
    editorial,
    health,
    looks,
    luts,
    models,
    prompts,
    review,
    session,
    storyboards,
    timeline,
    videos,
    web,
)

logger = logging.getLogger("ray.serve")
HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")

# Swagger UI and ReDoc from assets inside the package: studio networks reach no CDN
app = FastAPIOffline(
    title="Previz",
    summary="Studio text-to-video drafts on Wan2.2: an OpenAI-compatible Videos API with studio extensions.",
    version="1.0",
    responses=ERROR_RESPONSES,
    dependencies=[Depends(known_query_parameters)],
)


# -- errors ----------------------------------------------------------------------------------------------


@app.exception_handler(ApiError)
async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
    return error_response(
        error.status, error.code, error.message, error.param, error.headers, error.category, error.clips
    )


@app.exception_handler(RequestValidationError)
async def _invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
    problem = invalid(list(error.errors()))
    return error_response(problem.status, problem.code, problem.message, problem.param)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    headers = dict(getattr(error, "headers", None) or {})
    if error.status_code == 405:  # Starlette names only the first route of the path; name them all
        headers["Allow"] = ", ".join(allowed_methods(request.scope))
    return error_response(error.status_code, code, str(error.detail), headers=headers or None)


def allowed_methods(scope: Scope) -> list[str]:
    """Every method some route of the app answers at the request's path (RFC 9110's `Allow`), found by
    asking the routes themselves, included routers too."""
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in app.routes)
    ]


@app.exception_handler(Exception)
async def _internal_error(_request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error in the Ingress")
    return error_response(500, "internal_error", f"internal error: {type(error).__name__}")


for module in (
    health,
    models,
    session,
    prompts,
    looks,
    videos,
    review,
    artifacts,
    storyboards,
    editorial,
    timeline,
    admin,
    luts,
    web,
):
    app.include_router(module.router)
app.mount("/studio", web.StudioFiles(), name="studio")
app.add_middleware(BodyPolicy)


# -- OpenAPI: made to say exactly what the server accepts (serve/http/openapi.py) --------------------------


def _openapi() -> dict[str, Any]:
    if app.openapi_schema is None:
        app.openapi_schema = openapi.build(app, __doc__)
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]
