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
    GET    /v1/artifacts/{key}          a signed, expiring link to a stored clip (no key needed)
    ...    /v1/admin/...                projects, their quotas and keys (admin keys; serve/admin_routes.py)

Keys: every /v1 route but /v1/artifacts needs `Authorization: Bearer KEY` (401 `missing_api_key`,
`invalid_api_key`, `revoked_api_key`). The key names the project: a request sees only that project's
videos and storyboards (another project's ids are 404 like unknown ones), and a body or query `project`
naming another project is 403 `project_mismatch`. Quotas: 429 `queue_full`, `project_queue_full`,
`gpu_quota_exceeded`, each with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.prompt import compose_prompt
from pipeline.spec import ModelSpec, RequestSpec, describe_validation_error, resolve
from pipeline.upscale import upscale_target_size
from serve.admin_routes import router as admin_router
from serve.admission import (
    check_content,
    check_label,
    check_replay,
    fingerprint,
    project_settings,
    queue_bounds,
    refusal_error,
)
from serve.api import (
    SERVED_MODEL,
    SERVED_MODEL_ALIASES,
    ErrorResponse,
    GenerationSettings,
    Video,
    VideoCreate,
    VideoDeleted,
    VideoError,
    VideoList,
    VideoRemix,
    VideoState,
    WebhookAttempt,
    WebhookDeliveryInfo,
    WebhookDeliveryList,
)
from serve.auth import LABEL_TEXT, Caller, ProjectSettings
from serve.config import PrevizArgs
from serve.errors import ApiError, error_response, invalid
from serve.event_stream import event_stream
from serve.forms import read_fields
from serve.ingress_deps import (
    CallerDep,
    IdempotencyKey,
    IngressState,
    StateDep,
    job_or_404,
    project_of,
)
from serve.jobs import CancelResult, GpuQuotaExceeded, JobRecord, JobStatus, QueueFull, new_storyboard_id
from serve.storage import ArtifactNotFoundError
from serve.storyboards import (
    MAX_STORYBOARD_VIDEOS,
    Storyboard,
    StoryboardCreate,
    expand,
    storyboard_view,
)

logger = logging.getLogger("ray.serve")

MAX_UPSCALED_SIDE = 3840
POLL_AFTER_MS: dict[str, int] = {"queued": 1000, "in_progress": 500}  # what `openai-poll-after-ms` says
FINISHED: tuple[str, ...] = ("completed", "failed", "cancelled")
API_STATE_STATUSES: dict[str, list[JobStatus]] = {
    state: [status for status in JobStatus if status.api_state == state]
    for state in ("queued", "in_progress", "completed", "failed", "cancelled")
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Bad input; `param` names the field."),
        (401, "No API key, or not a valid one; see WWW-Authenticate."),
        (403, "The key may not do this (another project, or an admin route)."),
        (404, "No such id."),
        (409, "Conflicts with the video's state."),
        (429, "A queue or quota is full; see Retry-After."),
        (503, "Not ready."),
    )
}
BLOCKED: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorResponse, "description": "Refused by the content policy: `content_blocked`."}
}
_POSTER = re.compile(r"clip-a(\d+)\.mp4$")

app = FastAPI(
    title="Previz",
    summary="Studio text-to-video drafts on Wan2.2: an OpenAI-compatible Videos API with studio extensions.",
    version="1.0",
    responses=ERROR_RESPONSES,
)


# -- errors ----------------------------------------------------------------------------------------------


@app.exception_handler(ApiError)
async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
    return error_response(error.status, error.code, error.message, error.param, error.headers, error.category)


@app.exception_handler(RequestValidationError)
async def _invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
    problem = invalid(list(error.errors()))
    return error_response(problem.status, problem.code, problem.message, problem.param)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return error_response(error.status_code, code, str(error.detail), headers=getattr(error, "headers", None))


@app.exception_handler(Exception)
async def _internal_error(_request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error in the Ingress")
    return error_response(500, "internal_error", f"internal error: {type(error).__name__}")


# -- request bodies --------------------------------------------------------------------------------------


def _check_model(model: str) -> None:
    if model.lower() not in SERVED_MODEL_ALIASES:
        raise ApiError(
            400,
            "unknown_model",
            f"Previz serves {SERVED_MODEL} only; `model` must be {SERVED_MODEL!r} (or omitted) "
            f"but is {model!r}",
            "model",
        )


def _job_request(
    settings: GenerationSettings, model: ModelSpec, prefix: str = ""
) -> tuple[dict[str, Any], str]:
    """The stored request of one video and its bucket; an ApiError (400) names the field at fault."""
    if settings.seconds is not None and settings.duration is not None:
        raise ApiError(400, "invalid_value", "give `seconds` or `duration`, not both", f"{prefix}seconds")
    if settings.size is not None and settings.resolution is not None:
        raise ApiError(400, "invalid_value", "give `size` or `resolution`, not both", f"{prefix}size")
    try:
        prompt = compose_prompt(settings.prompt, settings.shot)
    except ValueError as error:
        raise ApiError(400, "missing_field", str(error), f"{prefix}prompt") from None
    duration = settings.duration if settings.duration is not None else 5.0
    if settings.seconds is not None:
        duration = float(settings.seconds)
    fields: dict[str, Any] = {
        "resolution": settings.size or settings.resolution or "480p",
        "aspect": settings.aspect,
        "duration": duration,
        "steps": settings.steps,
        "seed": settings.seed,
    }
    if settings.negative_prompt is not None:
        fields["negative_prompt"] = settings.negative_prompt
    try:
        spec = RequestSpec(prompt=prompt, **fields)
    except ValidationError as error:
        location = error.errors()[0]["loc"]
        field = str(location[0]) if location else "aspect"  # RequestSpec's one cross-field rule: aspect
        renamed = {"duration": "seconds" if settings.seconds is not None else "duration"}
        renamed["resolution"] = "size" if settings.size is not None else "resolution"
        param = renamed.get(field, field)
        message = describe_validation_error(error).replace(f"`{field}`", f"`{param}`")
        raise ApiError(400, "invalid_value", message, prefix + param) from None
    if spec.seed is None:  # fix the seed now, so a re-run after a restart makes the same clip
        spec = spec.model_copy(update={"seed": resolve(spec, model).seed})
    resolved = resolve(spec, model)
    upscaled = upscale_target_size(settings.upscale, resolved.width, resolved.height)
    if max(upscaled) > MAX_UPSCALED_SIDE:
        raise ApiError(
            400,
            "invalid_value",
            f"`upscale` {settings.upscale} of {resolved.width}x{resolved.height} gives "
            f"{upscaled[0]}x{upscaled[1]}; at most {MAX_UPSCALED_SIDE} pixels a side",
            f"{prefix}upscale",
        )
    request = {
        "spec": spec.model_dump(mode="json"),
        "finish": {
            "upscale": settings.upscale,
            "look": settings.look,
            "label": "AI-generated draft" if settings.label else None,
        },
        "model": SERVED_MODEL,
        "source": {
            "prompt": settings.prompt,
            "shot": settings.shot.model_dump(exclude_none=True) if settings.shot else None,
        },
    }
    return request, f"{resolved.width}x{resolved.height}x{resolved.num_frames}"


# -- responses -------------------------------------------------------------------------------------------


def _unix(moment: Any) -> int | None:
    return None if moment is None else int(moment.timestamp())


def _video(job: JobRecord, model: ModelSpec) -> Video:
    spec = RequestSpec.model_validate(job.request["spec"])
    resolved = resolve(spec, model)
    finish = job.request.get("finish", {})
    state = job.status.api_state
    completed = job.status == JobStatus.SUCCEEDED
    error = None
    if job.status == JobStatus.FAILED:
        error = VideoError(code=job.error_code or "failed", message=job.error_message or "")
    elif job.status == JobStatus.CANCELLED:
        error = VideoError(code="cancelled", message="the video was cancelled")
    base = f"/v1/videos/{job.id}"
    return Video(
        id=job.id,
        model=job.request.get("model", SERVED_MODEL),
        status=state,
        progress=job.progress,
        created_at=_unix(job.created_at),
        completed_at=_unix(job.finished_at),
        prompt=spec.prompt,
        seconds=f"{spec.duration:g}",
        size=f"{resolved.width}x{resolved.height}",
        remixed_from_video_id=job.request.get("remixed_from"),
        error=error,
        project=job.project,
        priority=job.priority,
        stage=job.status.name.lower(),
        seed=resolved.seed,
        steps=resolved.steps,
        num_frames=resolved.num_frames,
        upscale=finish.get("upscale", "none"),
        look=finish.get("look", "none"),
        labels=job.labels,
        storyboard_id=job.storyboard_id,
        callback_url=job.request.get("callback_url"),
        attempt=job.attempt,
        started_at=_unix(job.started_at),
        timings=job.timings or {},
        content_url=f"{base}/content" if completed else None,
        thumbnail_url=f"{base}/content?variant=thumbnail" if completed else None,
        events_url=f"{base}/events",
    )


def _video_response(
    job: JobRecord, state: IngressState, status_code: int = 200, **headers: str
) -> JSONResponse:
    video = _video(job, state.model)
    poll_after = POLL_AFTER_MS.get(video.status)
    if poll_after is not None:
        headers["openai-poll-after-ms"] = str(poll_after)
    return JSONResponse(video.model_dump(mode="json"), status_code=status_code, headers=headers)


async def _create(
    state: IngressState,
    project: str,
    settings: ProjectSettings,
    priority: str,
    request: dict[str, Any],
    bucket: str,
    labels: dict[str, Any],
    idempotency_key: str | None,
) -> JSONResponse:
    try:
        job, created = await asyncio.to_thread(
            state.store.create,
            project,
            priority,
            request,
            bucket,
            idempotency_key=idempotency_key,
            labels=labels,
            **queue_bounds(state.args, settings),
        )
    except (QueueFull, GpuQuotaExceeded) as refused:
        raise refusal_error(refused) from None
    if not created:
        check_replay("video", idempotency_key, job.request, request["body_sha256"])
        return _video_response(job, state, 200, **{"Idempotent-Replayed": "true"})
    state.scheduler.wake.remote()
    return _video_response(job, state, 201)


# -- routes: health --------------------------------------------------------------------------------------


@app.get("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/readyz", include_in_schema=False)
async def readyz(state: StateDep) -> Response:
    try:
        await asyncio.to_thread(state.store.count_by_status)
    except Exception as error:  # the job store is the one thing the Ingress cannot work without
        return error_response(503, "not_ready", f"job store unavailable: {error}")
    return JSONResponse({"status": "ready"})


# -- routes: videos --------------------------------------------------------------------------------------

_CREATE_BODY = {
    "required": True,
    "content": {
        media: {"schema": {"$ref": "#/components/schemas/VideoCreate"}}
        for media in ("application/json", "multipart/form-data")
    },
}


@app.post(
    "/v1/videos",
    status_code=201,
    response_model=Video,
    openapi_extra={"requestBody": _CREATE_BODY},
    responses={
        200: {"model": Video, "description": "A replay of an Idempotency-Key: the first job."},
        **BLOCKED,
    },
    summary="Create a video",
)
async def create_video(
    request: Request, state: StateDep, caller: CallerDep, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Queue one clip. JSON or multipart form (what `openai.videos.create` sends); extra studio fields
    are listed in the VideoCreate schema. 201 when created, 200 for a replayed Idempotency-Key."""
    fields = await read_fields(request)
    if fields.get("input_reference") not in (None, ""):
        raise ApiError(
            400,
            "unsupported",
            "`input_reference` is not supported: Previz is text-to-video",
            "input_reference",
        )
    fields.pop("input_reference", None)
    try:
        body = VideoCreate.model_validate(fields)
    except ValidationError as error:
        raise invalid(list(error.errors())) from None
    _check_model(body.model)
    project = project_of(caller, body.project)
    settings = await project_settings(state.store, project)
    check_label(body.label, settings)
    job_request, bucket = _job_request(body, state.model)
    await check_content(state.safety, body.prompt, body.shot)
    job_request["callback_url"] = str(body.callback_url) if body.callback_url else None
    job_request["body_sha256"] = fingerprint(body.model_dump(mode="json"))
    return await _create(
        state, project, settings, body.priority, job_request, bucket, body.labels, idempotency_key
    )


@app.get("/v1/videos", response_model=VideoList, summary="List videos")
async def list_videos(
    state: StateDep,
    caller: CallerDep,
    after: Annotated[
        str | None, Query(max_length=64, description="The last id of the previous page.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Videos per page.")] = 20,
    order: Annotated[Literal["asc", "desc"], Query(description="By creation time.")] = "desc",
    project: Annotated[str | None, Query(max_length=64, description="Only this project's videos.")] = None,
    status: Annotated[VideoState | None, Query(description="Only videos in this state.")] = None,
    storyboard_id: Annotated[str | None, Query(max_length=64, description="Only this storyboard's.")] = None,
) -> VideoList:
    jobs = await asyncio.to_thread(
        state.store.list,
        project=project_of(caller, project),
        statuses=API_STATE_STATUSES[status] if status else None,
        storyboard_id=storyboard_id,
        after=after,
        limit=limit + 1,
        order=order,
    )
    page = [_video(job, state.model) for job in jobs[:limit]]
    return VideoList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(jobs) > limit,
    )


@app.get("/v1/videos/{video_id}", response_model=Video, summary="Retrieve a video")
async def get_video(video_id: str, state: StateDep, caller: CallerDep) -> JSONResponse:
    return _video_response(await job_or_404(video_id, state, caller), state)


@app.delete("/v1/videos/{video_id}", response_model=VideoDeleted, summary="Cancel a video")
async def delete_video(video_id: str, state: StateDep, caller: CallerDep) -> VideoDeleted:
    """Cancel a queued or running video and free its slot in the pipeline (the record stays, status
    `cancelled`). A finished video cannot be cancelled: 409 `already_finished`."""
    result = await asyncio.to_thread(state.store.cancel, video_id, project=caller.project)
    if result == CancelResult.NOT_FOUND:
        raise ApiError(404, "not_found", f"no video with id {video_id!r}", param="video_id")
    if result == CancelResult.ALREADY_FINISHED:
        job = await job_or_404(video_id, state, caller)
        raise ApiError(
            409,
            "already_finished",
            f"video {video_id} is already {job.status.api_state}; "
            "only queued or running videos can be cancelled",
            param="video_id",
        )
    state.scheduler.cancel.remote(video_id)  # stop its pipeline now; the slot frees and the queue moves
    state.scheduler.wake.remote()
    return VideoDeleted(id=video_id)


@app.get(
    "/v1/videos/{video_id}/content",
    response_class=FileResponse,
    responses={
        200: {"content": {"video/mp4": {}, "image/jpeg": {}}, "description": "The mp4 or the poster frame."},
        307: {"description": "Redirect to a signed link that expires (S3 presigned, or /v1/artifacts)."},
    },
    summary="Download a video's content",
)
async def get_video_content(
    video_id: str,
    state: StateDep,
    caller: CallerDep,
    variant: Annotated[
        Literal["video", "thumbnail", "spritesheet"],
        Query(description="`video` (mp4) or `thumbnail` (JPEG)."),
    ] = "video",
) -> Response:
    job = await job_or_404(video_id, state, caller)
    if variant == "spritesheet":
        raise ApiError(
            400, "unsupported", "the `spritesheet` variant is not available; use `thumbnail`", "variant"
        )
    if job.status != JobStatus.SUCCEEDED or job.artifact_uri is None:
        raise ApiError(
            409,
            "video_not_ready",
            f"video {video_id} is {job.status.api_state}; its content exists once completed",
            param="video_id",
        )
    key = job.artifact_uri
    if variant == "thumbnail":
        key = _POSTER.sub(r"poster-a\1.jpg", key)
        if key == job.artifact_uri:
            raise ApiError(404, "artifact_missing", f"video {video_id} has no poster frame")
    ttl_s = state.args.artifact_url_ttl_s
    if state.signer is None:
        return RedirectResponse(state.artifacts.url(key, expires_in_s=ttl_s), status_code=307)
    if not await asyncio.to_thread(state.artifacts.exists, key):
        raise ApiError(404, "artifact_missing", f"the {variant} of video {video_id} is no longer stored")
    base = (state.args.storage.public_base_url or "").rstrip("/")
    return RedirectResponse(base + state.signer.url(key, ttl_s), status_code=307)


@app.get(
    "/v1/artifacts/{key:path}",
    response_class=FileResponse,
    responses={200: {"content": {"video/mp4": {}, "image/jpeg": {}}, "description": "The stored file."}},
    summary="Download through a signed link",
)
async def get_artifact(
    key: str,
    state: StateDep,
    expires: Annotated[int, Query(description="Unix seconds after which the link is refused.")],
    signature: Annotated[str, Query(max_length=128, description="HMAC-SHA256 of the key and expiry.")],
) -> FileResponse:
    """What `/v1/videos/{id}/content` redirects to: no API key needed, until `expires` (then 403
    `url_expired`; a changed key, expiry or signature is 403 `bad_signature`)."""
    if state.signer is None:
        raise ApiError(404, "not_found", "this deployment hands out its store's own links")
    problem = state.signer.check(key, expires, signature)
    if problem == "bad_signature":
        raise ApiError(403, problem, "the link's signature does not match; ask the API for a new link")
    if problem == "url_expired":
        raise ApiError(403, problem, "the link has expired; ask the API for the content again")
    try:
        path = state.artifacts.local_path(key)
    except (ArtifactNotFoundError, ValueError):
        raise ApiError(404, "artifact_missing", "the file is no longer stored") from None
    parts = key.split("/")
    job_id = parts[-2] if len(parts) > 1 else "artifact"
    if key.endswith(".jpg"):
        return FileResponse(path, media_type="image/jpeg", filename=f"{job_id}.jpg")
    return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4")


@app.post(
    "/v1/videos/{video_id}/remix",
    status_code=201,
    response_model=Video,
    responses={
        200: {"model": Video, "description": "A replay of an Idempotency-Key: the first job."},
        **BLOCKED,
    },
    summary="Remix a video",
)
async def remix_video(
    video_id: str,
    body: VideoRemix,
    state: StateDep,
    caller: CallerDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """A new video with the source's seed, size, length, steps and finish, and a new prompt
    ("what if he wore a blue coat"). The source may be in any state."""
    source = await job_or_404(video_id, state, caller)
    settings = await project_settings(state.store, source.project)
    try:
        prompt = compose_prompt(body.prompt, body.shot)
    except ValueError as error:
        raise ApiError(400, "missing_field", str(error), "prompt") from None
    try:
        spec = RequestSpec.model_validate({**source.request["spec"], "prompt": prompt})
    except ValidationError as error:
        raise ApiError(400, "invalid_value", describe_validation_error(error), "prompt") from None
    await check_content(state.safety, body.prompt, body.shot)
    request = {
        **source.request,
        "spec": spec.model_dump(mode="json"),
        "source": {
            "prompt": body.prompt,
            "shot": body.shot.model_dump(exclude_none=True) if body.shot else None,
        },
        "remixed_from": source.id,
        "finish": {
            **source.request.get("finish", {}),
            **({"label": LABEL_TEXT} if settings.burn_label else {}),
        },
        "storyboard": None,
        "body_sha256": fingerprint({"remix_of": source.id, **body.model_dump(mode="json")}),
    }
    labels = body.labels if body.labels is not None else source.labels
    return await _create(
        state,
        source.project,
        settings,
        body.priority or source.priority,
        request,
        source.bucket,
        labels,
        idempotency_key,
    )


@app.get(
    "/v1/videos/{video_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."}},
    summary="Stream a video's progress",
)
async def video_events(
    video_id: str,
    state: StateDep,
    caller: CallerDep,
    last_event_id: Annotated[
        int | None, Header(alias="Last-Event-ID", ge=0, description="Resume after this event id.")
    ] = None,
) -> StreamingResponse:
    """Server-sent events until the video finishes. `event:` is the kind: the job's log (`created`,
    `claimed`, `stage`, `progress`, `checkpoint`, `requeued`, `resumed`, `retry`, `succeeded`, `failed`,
    `cancelled`, each with an `id:` to resume from), `status` whenever its stage or step progress moves
    (`{"status", "stage", "progress", "stage_progress"}`), and a last `done` carrying the video object."""
    await job_or_404(video_id, state, caller)
    return StreamingResponse(
        event_stream(
            state.store,
            video_id,
            last_event_id or 0,
            lambda job: _video(job, state.model).model_dump(mode="json"),
        ),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@app.get(
    "/v1/videos/{video_id}/webhooks", response_model=WebhookDeliveryList, summary="List a video's webhooks"
)
async def video_webhooks(video_id: str, state: StateDep, caller: CallerDep) -> WebhookDeliveryList:
    """The POSTs to the video's `callback_url` (one per outcome) with every attempt: status code, error
    and duration. Empty when the video has no `callback_url` or is not finished yet."""
    job = await job_or_404(video_id, state, caller)
    deliveries = await asyncio.to_thread(state.store.webhook_deliveries, job.id)
    return WebhookDeliveryList(
        data=[
            WebhookDeliveryInfo(
                id=delivery.id,
                event=delivery.event,
                url=delivery.url,
                status=delivery.status,
                attempts=delivery.attempts,
                next_attempt_at=_unix(delivery.next_attempt_at),
                delivered_at=_unix(delivery.delivered_at),
                created_at=_unix(delivery.created_at),
                log=[WebhookAttempt.model_validate(entry) for entry in delivery.log],
            )
            for delivery in deliveries
        ]
    )


# -- routes: storyboards ---------------------------------------------------------------------------------


@app.post(
    "/v1/storyboards",
    status_code=201,
    response_model=Storyboard,
    responses={200: {"model": Storyboard, "description": "A replay of an Idempotency-Key."}, **BLOCKED},
    summary="Create a storyboard",
)
async def create_storyboard(
    body: StoryboardCreate, state: StateDep, caller: CallerDep, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Every shot × variant (seeds × grid) becomes a video of the board's project, all created in one
    transaction (a full queue refuses all of them: 429). They share the project's fair share."""
    _check_model(body.model)
    project = project_of(caller, body.project)
    settings = await project_settings(state.store, project)
    if body.num_videos > MAX_STORYBOARD_VIDEOS:
        raise ApiError(
            400,
            "too_many_videos",
            f"the board asks for {body.num_videos} videos ({len(body.shots)} shots × "
            f"{body.variants.num_variants} variants); at most {MAX_STORYBOARD_VIDEOS} in one storyboard",
            "variants",
        )
    try:
        planned = expand(body)
    except ValidationError as error:
        raise invalid(list(error.errors()), "variants.grid.") from None
    storyboard_id = new_storyboard_id()
    videos = []
    for video in planned:
        check_label(video.settings.label, settings, f"shots.{video.shot_index}.label")
        request, bucket = _job_request(video.settings, state.model, f"shots.{video.shot_index}.")
        await check_content(
            state.safety, video.settings.prompt, video.settings.shot, f"shots.{video.shot_index}."
        )
        shot = body.shots[video.shot_index]
        request["callback_url"] = str(body.callback_url) if body.callback_url else None
        request["storyboard"] = {
            "id": storyboard_id,
            "shot": video.shot_index,
            "variant": video.variant_index,
            "name": shot.name,
            "grid": video.grid,
        }
        videos.append((body.priority, request, bucket, {**body.labels, **shot.labels}))
    board_request = {
        **body.model_dump(mode="json"),
        "body_sha256": fingerprint(body.model_dump(mode="json")),
    }
    try:
        record, created = await asyncio.to_thread(
            state.store.create_storyboard,
            storyboard_id,
            project,
            body.title,
            board_request,
            videos,
            idempotency_key=idempotency_key,
            **queue_bounds(state.args, settings),
        )
    except (QueueFull, GpuQuotaExceeded) as refused:
        raise refusal_error(refused) from None
    if created:
        state.scheduler.wake.remote()
    else:
        check_replay("storyboard", idempotency_key, record.request, board_request["body_sha256"])
    board = await _storyboard(record.id, state, caller)
    headers = {} if created else {"Idempotent-Replayed": "true"}
    return JSONResponse(board.model_dump(mode="json"), status_code=201 if created else 200, headers=headers)


@app.get("/v1/storyboards/{storyboard_id}", response_model=Storyboard, summary="Retrieve a storyboard")
async def get_storyboard(storyboard_id: str, state: StateDep, caller: CallerDep) -> Storyboard:
    return await _storyboard(storyboard_id, state, caller)


async def _storyboard(storyboard_id: str, state: IngressState, caller: Caller) -> Storyboard:
    record = await asyncio.to_thread(state.store.get_storyboard, storyboard_id)
    if record is None or record.project != caller.project:
        raise ApiError(404, "not_found", f"no storyboard with id {storyboard_id!r}", param="storyboard_id")
    jobs = await asyncio.to_thread(
        state.store.list,
        project=caller.project,
        storyboard_id=storyboard_id,
        order="asc",
        limit=max(1, min(record.num_jobs, 1000)),
    )
    return storyboard_view(record, [(job, _video(job, state.model)) for job in jobs])


app.include_router(admin_router)


# -- OpenAPI: the create body is read by hand (JSON or form), so its schema is added here -----------------


def _openapi() -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, description=__doc__, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        generated = VideoCreate.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in generated.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components["VideoCreate"] = generated
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]


@serve.deployment(name="Ingress", max_ongoing_requests=512, health_check_period_s=10)
@serve.ingress(app)
class Ingress:
    def __init__(self, args: PrevizArgs, model: ModelSpec, scheduler: DeploymentHandle) -> None:
        IngressState.current = IngressState(args, model, scheduler)
