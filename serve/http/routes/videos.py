"""`/v1/videos`: create, list, retrieve, cancel, content, remix, promote, events, webhooks. Thin: each
route reads its input, calls the one admission path or the store, and renders with the one video view."""

from __future__ import annotations

import asyncio
import hashlib
import time
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import ValidationError

from serve.http.admission import (
    VideoDraft,
    admit,
    check_model,
    project_settings,
    promote_settings,
    remix_place,
    remix_settings,
)
from serve.http.deps import (
    CallerDep,
    IdempotencyKey,
    IngressState,
    StateDep,
    deleting,
    job_or_404,
    project_of,
    queue_waits,
)
from serve.http.errors import BLOCKED, ApiError, invalid
from serve.http.events import event_stream
from serve.http.forms import UploadedFile, read_fields
from serve.http.keyframes import KeyframeInputs, input_reference, keyframe_inputs, stored_keyframe_inputs
from serve.http.schemas import (
    Video,
    VideoCreate,
    VideoDeleted,
    VideoKeyframes,
    VideoLinks,
    VideoList,
    VideoPromote,
    VideoRemix,
    VideoState,
    WebhookAttempt,
    WebhookDeliveryInfo,
    WebhookDeliveryList,
)
from serve.http.views import video_payload, video_view
from serve.jobs import CancelResult, JobRecord, JobStatus, deletion
from serve.jobs.models import unix
from serve.jobs.request import KeyframeSource
from serve.jobs.reviews import ReviewStatus
from serve.scheduling.queue_wait import QueueWait, queue_wait
from serve.storage import JobArtifacts

router = APIRouter(prefix="/v1/videos", tags=["videos"])

POLL_AFTER_MS: dict[str, int] = {"queued": 1000, "in_progress": 500}  # what `openai-poll-after-ms` says
API_STATE_STATUSES: dict[str, list[JobStatus]] = {
    state: [status for status in JobStatus if status.api_state == state]
    for state in ("queued", "in_progress", "completed", "failed", "cancelled")
}
REPLAYED = {200: {"model": Video, "description": "A replay of an Idempotency-Key: the first job."}}
# The create body is read by hand (JSON or form); its schema is added to the OpenAPI page by serve.http.app.
# A form's structured fields are JSON parts, each holding the whole value (`loras`: the list, not a part per
# item), as serve.http.forms reads them; declared, so a client does not guess an array's encoding.
FORM_JSON_PARTS = {
    name: {"contentType": "application/json"} for name in ("shot", "labels", "cache", "loras", "keyframes")
} | {
    # a file part (the openai package's upload), or the ImageReference object as a JSON part
    "input_reference": {"contentType": "image/png, image/jpeg, image/webp, application/json"}
}
CREATE_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/VideoCreate"}},
        "multipart/form-data": {
            "schema": {"$ref": "#/components/schemas/VideoCreate"},
            "encoding": FORM_JSON_PARTS,
        },
    },
}


def reference_fingerprint(reference: Any) -> Any:
    """What a create's fingerprint holds of its `input_reference`: an upload's SHA-256, else the value."""
    if isinstance(reference, UploadedFile):
        return {"sha256": hashlib.sha256(reference.data).hexdigest()}
    return reference


def video_response(
    job: JobRecord,
    status_code: int = 200,
    wait: QueueWait | None = None,
    retention_days: int | None = None,
    **headers: str,
) -> JSONResponse:
    video = video_view(job, wait, retention_days=retention_days)
    poll_after = POLL_AFTER_MS.get(video.status)
    if poll_after is not None:
        headers["openai-poll-after-ms"] = str(poll_after)
    return JSONResponse(video.model_dump(mode="json"), status_code=status_code, headers=headers)


def admitted_response(job: JobRecord, created: bool) -> JSONResponse:
    if created:
        return video_response(job, 201)
    return video_response(job, 200, **{"Idempotent-Replayed": "true"})


@router.post(
    "",
    status_code=201,
    response_model=Video,
    openapi_extra={"requestBody": CREATE_BODY},
    responses={**REPLAYED, **BLOCKED},
    summary="Create a video",
)
async def create_video(
    request: Request, state: StateDep, caller: CallerDep, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Queue one clip. JSON or multipart form (what `openai.videos.create` sends); extra studio fields
    are listed in the VideoCreate schema. 201 when created, 200 for a replayed Idempotency-Key."""
    fields = await read_fields(request)
    reference = fields.pop("input_reference", None)
    try:
        body = VideoCreate.model_validate(fields)
    except ValidationError as error:
        raise invalid(list(error.errors())) from None
    model = check_model(body.model) if "model" in body.model_fields_set else None
    keyframes = await asyncio.to_thread(lambda: keyframe_inputs(body.keyframes, input_reference(reference)))
    draft = VideoDraft(
        settings=body,
        priority=body.priority,
        labels=body.labels,
        callback_url=str(body.callback_url) if body.callback_url else None,
        model=model,
        keyframes=keyframes,
    )
    admitted = await admit(
        state,
        project_of(caller, body.project),
        [draft],
        body={**body.model_dump(mode="json"), "input_reference": reference_fingerprint(reference)},
        idempotency_key=idempotency_key,
    )
    return admitted_response(admitted.job, admitted.created)


@router.get("", response_model=VideoList, summary="List videos")
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
    review: Annotated[
        ReviewStatus | None, Query(description="Only takes of this review status (`?review=approved`).")
    ] = None,
) -> VideoList:
    project = project_of(caller, project)
    if after is not None and await asyncio.to_thread(state.store.get, after, project=project) is None:
        raise ApiError(
            400,
            "invalid_cursor",
            f"`after` must be the id of one of the project's videos, not {after!r}",
            "after",
        )
    jobs = await asyncio.to_thread(
        state.store.list,
        project=project,
        statuses=API_STATE_STATUSES[status] if status else None,
        storyboard_id=storyboard_id,
        review=review,
        after=after,
        limit=limit + 1,
        order=order,
    )
    retention_days = (await project_settings(state.store, project)).retention_days
    waits = await queue_waits(state, jobs[:limit])  # a queued video's place and ETA, as on its own page
    page = [video_view(job, waits.get(job.id), retention_days=retention_days) for job in jobs[:limit]]
    return VideoList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(jobs) > limit,
    )


@router.get("/{video_id}", response_model=Video, summary="Retrieve a video")
async def get_video(video_id: str, state: StateDep, caller: CallerDep) -> JSONResponse:
    job = await job_or_404(video_id, state, caller)
    wait = (
        await asyncio.to_thread(queue_wait, state.store, job, state.lanes)
        if job.status == JobStatus.QUEUED
        else None
    )
    retention_days = (await project_settings(state.store, job.project)).retention_days
    return video_response(job, wait=wait, retention_days=retention_days)


@router.delete("/{video_id}", response_model=VideoDeleted, summary="Cancel or delete a video")
async def delete_video(
    video_id: str,
    state: StateDep,
    caller: CallerDep,
    cancel_only: Annotated[
        bool, Query(description="Only cancel: a finished video is then 409 `already_finished`, not deleted.")
    ] = False,
) -> VideoDeleted:
    """Cancel a queued or running video and free its slot in the pipeline (the record stays, status
    `cancelled`; whatever its run had stored is removed when the run stops); delete a finished one
    everywhere: its clip, poster and checkpoint leave the artifact store, the video answers 404 from
    then on, its signed links 404, and a storyboard cut that holds it as a take is marked stale (`GET
    /v1/storyboards/{id}/cut` and its timeline answer 409 `cut_stale`) and its files deleted: render the
    cut again. 503 `storage_unavailable`, nothing deleted, if the store fails."""
    result = await asyncio.to_thread(state.store.cancel, video_id, project=caller.project)
    if result == CancelResult.NOT_FOUND:
        raise ApiError(404, "not_found", f"no video with id {video_id!r}", param="video_id")
    if result == CancelResult.ALREADY_FINISHED:
        job = await job_or_404(video_id, state, caller)
        if cancel_only:
            raise ApiError(
                409,
                "already_finished",
                f"video {video_id} is already {job.status.api_state}; only queued or running videos can be "
                "cancelled (DELETE without `cancel_only` deletes it)",
                param="video_id",
            )
        deleted = await deleting(deletion.delete_video, state.store, state.artifacts, job)
        if deleted is None:  # deleted meanwhile by another request
            raise ApiError(404, "not_found", f"no video with id {video_id!r}", param="video_id")
        return VideoDeleted(id=video_id, status=deleted.status.api_state)
    state.scheduler.cancel.remote(video_id)  # stop its pipeline now; the slot frees and the queue moves
    state.scheduler.wake.remote()
    return VideoDeleted(id=video_id)


@router.get(
    "/{video_id}/content",
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
        Literal["video", "thumbnail"],
        Query(description="`video` (mp4) or `thumbnail` (JPEG); OpenAI's `spritesheet` is not offered."),
    ] = "video",
) -> Response:
    job = await job_or_404(video_id, state, caller)
    return RedirectResponse(await signed_link(job, variant, state), status_code=307)


@router.get("/{video_id}/links", response_model=VideoLinks, summary="Signed links to a video's files")
async def get_video_links(video_id: str, state: StateDep, caller: CallerDep) -> VideoLinks:
    """The links `/content` redirects to, as JSON: for a page's `<video>` and `<img>`, which cannot send
    an API key. They expire after the deployment's `artifact_url_ttl_s`."""
    job = await job_or_404(video_id, state, caller)
    expires_at = int(time.time()) + state.args.artifact_url_ttl_s
    video = await signed_link(job, "video", state)
    thumbnail = await signed_link(job, "thumbnail", state) if job.poster_uri is not None else None
    return VideoLinks(id=job.id, video=video, thumbnail=thumbnail, expires_at=expires_at)


@router.get(
    "/{video_id}/keyframes", response_model=VideoKeyframes, summary="Signed links to a video's keyframes"
)
async def get_video_keyframes(video_id: str, state: StateDep, caller: CallerDep) -> VideoKeyframes:
    """The images the video starts (and ends) from, in any state: the panel beside its takes."""
    job = await job_or_404(video_id, state, caller)
    ttl = state.args.artifact_url_ttl_s
    keys = JobArtifacts(job.project, job.id)
    recorded = job.request.keyframes

    first = recorded.first if recorded is not None else None
    last = recorded.last if recorded is not None else None

    async def link(which: Literal["first", "last"], source: KeyframeSource | None) -> str | None:
        key = keys.keyframe(which)
        if source is None or source.sha256 is None:  # none, or a chained take still waiting for its frame
            return None
        if not await asyncio.to_thread(state.artifacts.exists, key):
            return None
        return await asyncio.to_thread(state.artifacts.url, key, expires_in_s=ttl)

    return VideoKeyframes(
        id=job.id,
        first=await link("first", first),
        last=await link("last", last),
        first_from=first.video if first is not None else None,
        expires_at=int(time.time()) + ttl,
    )


async def signed_link(job: JobRecord, variant: Literal["video", "thumbnail"], state: IngressState) -> str:
    """A signed, expiring link to the job's mp4 or poster; 409 before it completed, 404 once gone."""
    if job.status != JobStatus.SUCCEEDED or job.artifact_uri is None:
        raise ApiError(
            409,
            "video_not_ready",
            f"video {job.id} is {job.status.api_state}; its content exists once completed",
            param="video_id",
        )
    key = job.artifact_uri if variant == "video" else job.poster_uri
    if key is None:
        raise ApiError(404, "artifact_missing", f"video {job.id} has no poster frame")
    if not await asyncio.to_thread(state.artifacts.exists, key):
        raise ApiError(404, "artifact_missing", f"the {variant} of video {job.id} is no longer stored")
    return await asyncio.to_thread(state.artifacts.url, key, expires_in_s=state.args.artifact_url_ttl_s)


@router.post(
    "/{video_id}/remix",
    status_code=201,
    response_model=Video,
    responses={**REPLAYED, **BLOCKED},
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
    ("what if he wore a blue coat"). The source may be in any state. A remix of a storyboard's take is
    a new take of the same shot on that board."""
    source = await job_or_404(video_id, state, caller)
    settings = await project_settings(state.store, source.project)
    keyframes = await asyncio.to_thread(stored_keyframe_inputs, state.artifacts, source)
    continues = None
    if body.rechain:
        first = source.request.keyframes.first if source.request.keyframes is not None else None
        if first is None or first.kind != "continue" or source.storyboard_id is None:
            raise ApiError(
                400,
                "invalid_continue",
                f"video {source.id} does not continue another shot; `rechain` is for a chained shot's take",
                "rechain",
            )
        continues = first.shot  # waits for that shot's take as it is now, like the board's first takes
        last = keyframes.last if keyframes is not None else None
        keyframes = KeyframeInputs(last=last) if last is not None else None
    draft = VideoDraft(
        settings=remix_settings(source.request, body.prompt, body.shot, settings.burn_label),
        priority=body.priority or source.priority,
        labels=body.labels if body.labels is not None else source.labels,
        callback_url=source.request.callback_url,
        storyboard=await remix_place(state, source),
        remixed_from=source.id,
        model=source.request.model,
        keyframes=keyframes,
        continues=continues,
    )
    admitted = await admit(
        state,
        source.project,
        [draft],
        body={"remix_of": source.id, **body.model_dump(mode="json")},
        idempotency_key=idempotency_key,
        settings=settings,
    )
    return admitted_response(admitted.job, admitted.created)


@router.post(
    "/{video_id}/promote",
    status_code=201,
    response_model=Video,
    responses={**REPLAYED, **BLOCKED},
    summary="Promote a draft to its final take",
)
async def promote_video(
    video_id: str,
    body: VideoPromote,
    state: StateDep,
    caller: CallerDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """The `final`-tier take of a `draft` video: its seed, prompt, shot, length and size (or a new `size`,
    `upscale`, `look`) with the full 40-step recipe. The two link each other (`promoted_to` on the draft,
    `promoted_from` on the final). A take is promoted once: again is 409 `already_promoted`; a final video
    is 409 `not_a_draft`. The draft may be in any state."""
    source = await job_or_404(video_id, state, caller)
    check_promotable(source)
    settings = await project_settings(state.store, source.project)
    keyframes = await asyncio.to_thread(stored_keyframe_inputs, state.artifacts, source)
    draft = promotion_draft(source, body, settings.burn_label, keyframes=keyframes)
    admitted = await admit(
        state,
        source.project,
        [draft],
        body={"promote_of": source.id, **body.model_dump(mode="json")},
        idempotency_key=idempotency_key,
        settings=settings,
    )
    return admitted_response(admitted.job, admitted.created)


def check_promotable(source: JobRecord, param: str = "video_id") -> None:
    if source.request.resolved.quality != "draft":
        raise ApiError(
            409, "not_a_draft", f"video {source.id} is a final take already; only drafts are promoted", param
        )
    if source.promoted_to is not None:
        raise ApiError(
            409,
            "already_promoted",
            f"video {source.id} was already promoted to {source.promoted_to}; promote a take once",
            param,
        )


def promotion_draft(
    source: JobRecord,
    body: VideoPromote,
    burn_label: bool,
    prefix: str = "",
    keyframes: KeyframeInputs | None = None,
) -> VideoDraft:
    """The final take of `source` as a draft for the admission path; `keyframes`: the source's stored ones
    (serve.http.keyframes.stored_keyframe_inputs), so the final starts from the draft's image."""
    return VideoDraft(
        settings=promote_settings(
            source.request,
            burn_label,
            size=body.size,
            upscale=body.upscale,
            look=body.look,
            cache={"cache": body.cache} if "cache" in body.model_fields_set else None,
        ),
        priority=body.priority or "batch",
        labels=body.labels if body.labels is not None else source.labels,
        prefix=prefix,
        callback_url=source.request.callback_url,
        # a take of a board joins its shot; one whose board was deleted is a video of no board
        storyboard=source.request.storyboard if source.storyboard_id is not None else None,
        promoted_from=source.id,
        repeats=source.request,  # the draft's text as it ran, whatever compiler version made it
        model=source.request.model,
        keyframes=keyframes,
    )


@router.get(
    "/{video_id}/events",
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
    (`{"status", "stage", "waiting_for", "queue_position", "progress", "stage_progress", "eta_seconds"}`;
    `queue_position` counts the videos ahead of it in the job queue while queued, and in the replica of
    the stage it is `waiting_for` while it waits there; the ETA is re-predicted after each denoising step
    from the step times measured for the video's size and tier, and while it waits after the denoiser),
    and a last `done` carrying the video object."""
    job = await job_or_404(video_id, state, caller)
    retention_days = (await project_settings(state.store, job.project)).retention_days
    return StreamingResponse(
        event_stream(
            state.store,
            video_id,
            last_event_id or 0,
            partial(video_payload, retention_days=retention_days),
            state.lanes,
        ),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/{video_id}/webhooks", response_model=WebhookDeliveryList, summary="List a video's webhooks")
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
                next_attempt_at=unix(delivery.next_attempt_at),
                delivered_at=unix(delivery.delivered_at),
                created_at=unix(delivery.created_at),
                log=[WebhookAttempt.model_validate(entry) for entry in delivery.log],
            )
            for delivery in deliveries
        ]
    )
