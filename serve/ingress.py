"""The HTTP Ingress: accepts jobs durably (job store first), reports state, serves finished clips.

A job is accepted once its row is committed; the Scheduler is only nudged, so a job posted while the
Scheduler restarts is still picked up.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, ClassVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.prompt import compose_prompt
from pipeline.spec import ModelSpec, RequestSpec, describe_validation_error, resolve
from serve.api import ErrorBody, ErrorResponse, JobCreate, JobPublic
from serve.config import PrevizArgs
from serve.jobs import JobRecord, JobStatus, JobStore, QueueFull
from serve.storage import ArtifactNotFoundError, ArtifactStore, make_store

logger = logging.getLogger("ray.serve")
app = FastAPI(
    title="Previz",
    summary="Studio text-to-video drafts on Wan2.2",
    responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
)


class ApiError(Exception):
    """An error answered with the one error shape."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None, headers=None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.headers = status, code, message, param, headers


def _error_response(
    status: int, code: str, message: str, param: str | None = None, headers=None
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code, message=message, param=param))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


@app.exception_handler(ApiError)
async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
    return _error_response(error.status, error.code, error.message, error.param, error.headers)


@app.exception_handler(RequestValidationError)
async def _invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    location = [str(part) for part in first["loc"] if part != "body"]
    param = ".".join(location) or None
    message = str(first["msg"]).removeprefix("Value error, ")
    code = "invalid_json" if first["type"] == "json_invalid" else "invalid_request"
    return _error_response(400 if code == "invalid_json" else 422, code, message, param)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    return _error_response(error.status_code, code, str(error.detail))


class IngressState:
    """What the routes of one Ingress replica share.

    Held as a class attribute: Serve ships the deployment class and the FastAPI app as separate pickled
    copies, but this class is imported by name in both, so both see the same `current`.
    """

    current: ClassVar[IngressState | None] = None

    def __init__(self, args: PrevizArgs, model: ModelSpec, scheduler: DeploymentHandle) -> None:
        self.args = args
        self.model = model
        self.scheduler = scheduler
        self.store = JobStore(args.database_url)
        self.store.create_schema()
        self.artifacts: ArtifactStore = make_store(args.storage)


def _current_state() -> IngressState:
    if IngressState.current is None:
        raise ApiError(503, "not_ready", "the Ingress is still starting")
    return IngressState.current


StateDep = Annotated[IngressState, Depends(_current_state)]


async def _job_or_404(video_id: str, state: IngressState) -> JobRecord:
    job = await asyncio.to_thread(state.store.get, video_id)
    if job is None:
        raise ApiError(404, "not_found", f"no video with id {video_id!r}", param="video_id")
    return job


def _request_spec(body: JobCreate, model: ModelSpec) -> RequestSpec:
    try:
        prompt = compose_prompt(body.prompt, body.shot)
    except ValueError as error:
        raise ApiError(422, "invalid_request", str(error), param="prompt") from None
    fields = body.model_dump(include={"negative_prompt", "resolution", "aspect", "duration", "steps", "seed"})
    try:
        spec = RequestSpec(prompt=prompt, **fields)
    except ValidationError as error:
        first = error.errors()[0]
        raise ApiError(
            422, "invalid_request", describe_validation_error(error), param=str(first["loc"][0])
        ) from None
    if spec.seed is None:  # fix the seed now, so a re-run after a restart makes the same clip
        spec = spec.model_copy(update={"seed": resolve(spec, model).seed})
    return spec


def _public(job: JobRecord, state: IngressState) -> JobPublic:
    spec = RequestSpec.model_validate(job.request["spec"])
    resolved = resolve(spec, state.model)
    error = ErrorBody(code=job.error_code, message=job.error_message or "") if job.error_code else None
    return JobPublic(
        id=job.id,
        project=job.project,
        priority=job.priority,
        status=job.status.api_state,
        stage=job.status.name.lower(),
        progress=job.progress,
        prompt=spec.prompt,
        size=f"{resolved.width}x{resolved.height}",
        num_frames=resolved.num_frames,
        seed=resolved.seed,
        attempt=job.attempt,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        timings=job.timings or {},
        error=error,
        content_url=f"/v1/videos/{job.id}/content" if job.status == JobStatus.SUCCEEDED else None,
    )


@app.get("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/readyz", include_in_schema=False)
async def readyz(state: StateDep) -> Response:
    try:
        await asyncio.to_thread(state.store.count_by_status)
    except Exception as error:  # the job store is the one thing the Ingress cannot work without
        return _error_response(503, "not_ready", f"job store unavailable: {error}")
    return JSONResponse({"status": "ready"})


@app.post("/v1/videos", status_code=201, response_model=JobPublic)
async def create_video(body: JobCreate, state: StateDep) -> JSONResponse:
    spec = _request_spec(body, state.model)
    request = {
        "spec": spec.model_dump(mode="json"),
        "finish": {
            "upscale": body.upscale,
            "look": body.look,
            "label": "AI-generated draft" if body.label else None,
        },
    }
    resolved = resolve(spec, state.model)
    bucket = f"{resolved.width}x{resolved.height}x{resolved.num_frames}"
    try:
        job, created = await asyncio.to_thread(
            state.store.create,
            body.project,
            body.priority,
            request,
            bucket,
            max_queued=state.args.max_queued_jobs,
        )
    except QueueFull as full:
        raise ApiError(
            429,
            "queue_full",
            f"the {full.scope} queue is full; retry in {full.retry_after_s} s",
            headers={"Retry-After": str(full.retry_after_s)},
        ) from None
    state.scheduler.wake.remote()
    return JSONResponse(_public(job, state).model_dump(mode="json"), status_code=201 if created else 200)


@app.get("/v1/videos/{video_id}", response_model=JobPublic)
async def get_video(video_id: str, state: StateDep) -> JobPublic:
    return _public(await _job_or_404(video_id, state), state)


@app.get(
    "/v1/videos/{video_id}/content",
    response_class=FileResponse,
    responses={200: {"content": {"video/mp4": {}}}},
)
async def get_video_content(video_id: str, state: StateDep) -> Response:
    job = await _job_or_404(video_id, state)
    if job.status != JobStatus.SUCCEEDED or job.artifact_uri is None:
        raise ApiError(
            409,
            "not_ready",
            f"video {video_id} is {job.status.api_state}; its content exists once completed",
        )
    try:
        path = state.artifacts.local_path(job.artifact_uri)
    except ArtifactNotFoundError:
        raise ApiError(404, "artifact_missing", f"the clip of video {video_id} is no longer stored") from None
    if path is not None:
        return FileResponse(path, media_type="video/mp4", filename=f"{job.id}.mp4")
    return RedirectResponse(state.artifacts.url(job.artifact_uri), status_code=307)


@serve.deployment(name="Ingress", max_ongoing_requests=512, health_check_period_s=10)
@serve.ingress(app)
class Ingress:
    def __init__(self, args: PrevizArgs, model: ModelSpec, scheduler: DeploymentHandle) -> None:
        IngressState.current = IngressState(args, model, scheduler)
