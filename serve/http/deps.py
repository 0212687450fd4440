"""What every Ingress route depends on: the replica's shared state, the caller's API key (its project and
role), and the lookups that keep a project to its own videos."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, TypeVar

from fastapi import Depends, Header, Request
from fastapi.dependencies.models import Dependant
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray.serve.handle import DeploymentHandle

from pipeline.safety import FrameCheck, PromptPolicy
from pipeline.spec import ModelSpec
from serve.auth import Caller
from serve.config import PrevizArgs
from serve.http.errors import ApiError
from serve.jobs import JobRecord, JobStatus, StoryboardRecord
from serve.luts import register_configured
from serve.scheduling.lanes import Lanes
from serve.scheduling.queue_wait import QueueWait, queue_wait
from serve.sharding import I2V_PREFIX, ShapeRules
from serve.storage import ArtifactSigner, ArtifactStore, LocalArtifactStore, StorageError, make_store
from serve.webhooks import callback_policy, open_job_store

T = TypeVar("T")


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
        self.store = open_job_store(args.database_url)
        self.store.create_schema()
        self.artifacts: ArtifactStore = make_store(args.storage)
        # Local artifacts are handed out as signed, expiring links to /v1/artifacts (S3 presigns its own).
        local = isinstance(self.artifacts, LocalArtifactStore)
        self.signer: ArtifactSigner | None = self.artifacts.signer if local else None
        self.safety = PromptPolicy.from_settings(args.safety)
        self.frame_check = FrameCheck.from_settings(args.safety)  # also shown every keyframe image
        self.callbacks = callback_policy(args.webhooks)
        self.shapes = ShapeRules(args.experts, args.model, model, args.model_cache_dir)
        # the image-to-video model's args (PrevizArgs.for_i2v) and shape rules; None: T2V only
        self.i2v_args = args.for_i2v() if args.i2v is not None else None
        self.i2v_shapes = (
            ShapeRules(
                self.i2v_args.experts,
                self.i2v_args.model,
                self.i2v_args.sampling,
                args.model_cache_dir,
                prefix=I2V_PREFIX,
            )
            if self.i2v_args is not None
            else None
        )
        register_configured(self.store, self.artifacts, args.luts, args.storage)
        self.lanes = Lanes(args.max_jobs_in_flight, args.reserved_slots)  # what a queued job waits for


def current_state() -> IngressState:
    """The replica's state (a route's `StateDep`); tests give their own with `app.dependency_overrides`."""
    if IngressState.current is None:
        raise ApiError(503, "not_ready", "the Ingress is still starting")
    return IngressState.current


def state_of(app: object) -> IngressState:
    """The state the routes of `app` (the FastAPI app of a request's scope) see: `current_state`, or
    what `app.dependency_overrides` puts in its place. For the ASGI parts that run outside routing (the
    body policy, the static page)."""
    overrides = getattr(app, "dependency_overrides", {})
    return overrides.get(current_state, current_state)()


CALLER_STATE_KEY = "previz_caller"  # scope["state"][…]: the Caller the body policy authenticated

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key `pvz_<keyid>_<secret>`: it names the project (and role) of the request.",
)


def _unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, headers={"WWW-Authenticate": "Bearer"})


async def authenticated_caller(
    request: Request,
    state: Annotated[IngressState, Depends(current_state)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The project and role of the request's key; 401 without a usable one. A request with a body was
    authenticated by the body policy before its body was read (serve.http.limits): that caller is used."""
    found = request.scope.get("state", {}).get(CALLER_STATE_KEY)
    if isinstance(found, Caller):
        return found
    return await caller_of_key(state, credentials.credentials if credentials is not None else None)


async def caller_of_header(state: IngressState, authorization: str | None) -> Caller:
    """The caller of an `Authorization: Bearer KEY` header (401 without a usable one)."""
    scheme, _, key = (authorization or "").strip().partition(" ")
    return await caller_of_key(state, key.strip() if scheme.lower() == "bearer" and key.strip() else None)


async def caller_of_key(state: IngressState, key: str | None) -> Caller:
    if key is None:
        raise _unauthorized("missing_api_key", "send an API key as `Authorization: Bearer KEY`")
    found = await asyncio.to_thread(state.store.authenticate, key)
    if found == "unknown":
        raise _unauthorized("invalid_api_key", "the API key is not valid")
    if found == "revoked":
        raise _unauthorized("revoked_api_key", "the API key was revoked; ask an admin for a new one")
    return found


def project_of(caller: Caller, requested: str | None) -> str:
    """The caller's project; a request that names another one is refused (403)."""
    if requested is not None and requested != caller.project:
        raise ApiError(
            403,
            "project_mismatch",
            f"the API key belongs to project {caller.project!r}, not {requested!r}",
            "project",
        )
    return caller.project


StateDep = Annotated[IngressState, Depends(current_state)]
CallerDep = Annotated[Caller, Depends(authenticated_caller)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="A retried POST with the same key (and project) returns the first job, never a second.",
    ),
]


async def job_or_404(video_id: str, state: IngressState, caller: Caller) -> JobRecord:
    job = await asyncio.to_thread(state.store.get, video_id, project=caller.project)
    if job is None:
        raise ApiError(404, "not_found", f"no video with id {video_id!r}", param="video_id")
    return job


async def deleting(delete: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one of serve.jobs.deletion's deletes in a worker thread; a failing artifact store is 503
    `storage_unavailable` (each delete leaves the record whole when its own files could not go)."""
    try:
        return await asyncio.to_thread(delete, *args, **kwargs)
    except StorageError:
        raise ApiError(503, "storage_unavailable", "the artifact store failed; delete it again") from None


async def queue_waits(state: IngressState, jobs: list[JobRecord]) -> dict[str, QueueWait]:
    """job id -> the wait of each queued one of `jobs` (counted in the store)."""
    queued = [job for job in jobs if job.status == JobStatus.QUEUED]
    return {job.id: await asyncio.to_thread(queue_wait, state.store, job, state.lanes) for job in queued}


async def jobs_on_board(state: IngressState, board: StoryboardRecord) -> list[JobRecord]:
    """The board's videos in creation order (its takes, remixes and promotions included)."""
    return await asyncio.to_thread(
        state.store.list,
        project=board.project,
        storyboard_id=board.id,
        order="asc",
        limit=max(1, min(board.num_jobs, 1000)),
    )


async def known_query_parameters(request: Request) -> None:
    """Refuse a query parameter the route does not take (400 `unknown_parameter`): a misspelt `limt` or
    `statu` would otherwise be ignored and the caller get an answer to a question they did not ask."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = query_parameters(dependant)
    for name in request.query_params:
        if name not in known:
            allowed = ", ".join(f"`{parameter}`" for parameter in sorted(known)) or "none"
            message = f"unknown query parameter {name!r}; this route takes {allowed}"
            raise ApiError(400, "unknown_parameter", message, name)


def query_parameters(dependant: Dependant) -> set[str]:
    """The query parameters of a route's handler and of everything it depends on."""
    names = {parameter.alias for parameter in dependant.query_params}
    for dependency in dependant.dependencies:
        names |= query_parameters(dependency)
    return names
