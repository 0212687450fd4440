"""A storyboard's edit: selected takes and shot order (`PATCH /v1/storyboards/{id}`) and its first cut
(the cut as a timeline, out and back: serve/http/routes/timeline.py).

The cut is a durable job: the POST chooses the takes, queues the cut (serve.jobs.cuts) and answers 202;
the Scheduler has a Finisher replica render it (serve.scheduling.cuts), so no Ingress thread renders
(about 8 s per 5 s shot on one core), a restart loses nothing and progress is polled (`GET .../cut`) or
streamed (`GET .../cut/events`) like a video's.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from serve.auth import Caller
from serve.editorial.cut import CutNotReady, choose_takes
from serve.http.admission import project_settings
from serve.http.deps import CallerDep, IngressState, StateDep, deleting
from serve.http.editorial import CUT_SIZES, Cut, CutClipView, CutCreate, CutDeleted, StoryboardUpdate
from serve.http.errors import ApiError
from serve.http.events import cut_event_stream
from serve.http.routes.storyboards import board_and_jobs, storyboard_of
from serve.http.schemas import VideoError
from serve.http.storyboards import Storyboard
from serve.jobs import deletion
from serve.jobs.cuts import CutJob, CutRequest, CutRunning, CutStatus, new_cut_id
from serve.jobs.models import ApiState, utcnow
from serve.jobs.storyboard import CutRecord, StoryboardEdit, StoryboardRecord

router = APIRouter(prefix="/v1/storyboards", tags=["storyboards"])
DEFAULT_CUT_FPS = 24  # editors' rate, when neither the request, the board nor the project names one
CUT_STATES: dict[CutStatus, ApiState] = {
    "queued": "queued",
    "running": "in_progress",
    "succeeded": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}


@router.patch("/{storyboard_id}", response_model=Storyboard, summary="Select takes and order shots")
async def update_storyboard(
    storyboard_id: str, body: StoryboardUpdate, state: StateDep, caller: CallerDep
) -> Storyboard:
    """Set each shot's selected take (a video of that shot) and the order of shots in the cut."""
    record, jobs = await board_and_jobs(storyboard_id, state, caller)
    num_shots = len(record.request.shots)
    edit = record.edit.model_copy() if record.edit is not None else StoryboardEdit()
    if "order" in body.model_fields_set:
        outside = [shot for shot in body.order or [] if shot >= num_shots]
        if outside:
            raise ApiError(
                400,
                "invalid_shot",
                f"the board has {num_shots} shots (0–{num_shots - 1}), not {outside[0]}",
                "order",
            )
        edit.order = body.order
    takes = dict(edit.takes)
    for key, video_id in body.takes.items():
        shot = int(key)
        if shot >= num_shots:
            raise ApiError(
                400, "invalid_shot", f"the board has {num_shots} shots, not shot {shot}", f"takes.{key}"
            )
        if video_id is None:
            takes.pop(key, None)
            continue
        place = next((job.request.storyboard for job in jobs if job.id == video_id), None)
        if place is None or place.shot != shot:
            raise ApiError(
                400,
                "invalid_take",
                f"video {video_id!r} is not a take of shot {shot} of this board",
                f"takes.{key}",
            )
        takes[key] = video_id
    edit.takes = takes
    for key in body.trims:  # only clearing: a trim is set by a timeline read back
        edit.trims.pop(key, None)
    await asyncio.to_thread(state.store.update_storyboard, storyboard_id, edit=edit)
    return await storyboard_of(storyboard_id, state, caller)


@router.post(
    "/{storyboard_id}/cut",
    status_code=202,
    response_model=Cut,
    responses={202: {"description": "The cut is queued: poll it, or stream its events."}},
    summary="Render the first cut",
)
async def create_cut(
    storyboard_id: str, request: Request, state: StateDep, caller: CallerDep, body: CutCreate | None = None
) -> Cut:
    """Queue the cut of the selected takes (else each shot's first completed take) in the board's order,
    conformed to one rate and size, with optional slates, into one mp4 (and one per shot for the
    timeline); the takes are chosen now. Answers 202 with the cut `queued`: `GET .../cut` (or its
    `events_url`) follows it to `completed`. 409 `cut_not_ready` while a shot of the cut has no completed
    take; 409 `cut_running` while the board's previous cut is still rendering."""
    body = body or CutCreate()
    record, jobs = await board_and_jobs(storyboard_id, state, caller)
    try:
        takes = choose_takes(record, jobs)
    except CutNotReady as error:
        raise ApiError(
            409, "cut_not_ready", f"the cut cannot be made yet: {error}", "storyboard_id"
        ) from None
    if not takes:
        raise ApiError(409, "cut_not_ready", "the board's order has no shots", "storyboard_id")
    settings = await project_settings(state.store, record.project)
    fps = body.fps or record.request.fps or settings.default_fps or DEFAULT_CUT_FPS
    size = None
    if body.size is not None:
        first = next(job for job in jobs if job.id == takes[0].video_id).request.resolved
        size = _short_side(first.width, first.height, CUT_SIZES[body.size])
    cut_request = CutRequest(
        title=record.title or record.id,
        takes=takes,
        fps=fps,
        size=size,
        slate_seconds=float(body.slate_seconds) if body.slates else None,
    )
    try:
        cut = await asyncio.to_thread(
            state.store.create_cut, new_cut_id(), record.id, record.project, cut_request
        )
    except CutRunning as running:
        raise ApiError(
            409,
            "cut_running",
            f"{running}; wait for it, or POST /v1/storyboards/{storyboard_id}/cut/cancel",
            "storyboard_id",
        ) from None
    except LookupError:  # the board was deleted meanwhile
        await board_and_jobs(storyboard_id, state, caller, with_jobs=False)
        raise
    state.scheduler.wake.remote()
    return await _cut_view(record, cut, None, state, request)


@router.post("/{storyboard_id}/cut/cancel", response_model=Cut, summary="Cancel the rendering cut")
async def cancel_cut(storyboard_id: str, request: Request, state: StateDep, caller: CallerDep) -> Cut:
    """Stop the board's queued or rendering cut: its files are deleted and the board keeps the cut it had
    before. 409 `no_cut_running` when none is queued or rendering."""
    record, _jobs = await board_and_jobs(storyboard_id, state, caller, with_jobs=False)
    cut = await asyncio.to_thread(state.store.cancel_cut, record.id)
    if cut is None:
        raise ApiError(
            409,
            "no_cut_running",
            f"storyboard {storyboard_id} has no cut queued or rendering",
            "storyboard_id",
        )
    state.scheduler.cancel_cut.remote(cut.id)
    return await _cut_view(record, cut, None, state, request)


@router.get(
    "/{storyboard_id}/cut/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."}},
    summary="Stream the cut's progress",
)
async def cut_events(
    storyboard_id: str, request: Request, state: StateDep, caller: CallerDep
) -> StreamingResponse:
    """Server-sent events of the board's newest cut: `status` whenever its status, progress or ETA moves
    (`{"id", "status", "progress", "eta_seconds"}`), then `done` with the cut object once it is finished.
    409 `no_cut` when the board never had a cut job."""
    record, _jobs = await board_and_jobs(storyboard_id, state, caller, with_jobs=False)
    cut = await asyncio.to_thread(state.store.latest_cut, record.id)
    if cut is None:
        raise ApiError(409, "no_cut", f"storyboard {storyboard_id} has no cut yet", "storyboard_id")

    async def final(job: CutJob) -> dict:
        board = await asyncio.to_thread(state.store.get_storyboard, record.id) or record
        rendered = (
            board.served_cut if board.served_cut is not None and board.served_cut.id == job.id else None
        )
        return (await _cut_view(board, job, rendered, state, request)).model_dump(mode="json")

    return StreamingResponse(
        cut_event_stream(state.store, cut.id, final),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.delete("/{storyboard_id}/cut", response_model=CutDeleted, summary="Delete the last cut")
async def delete_cut(storyboard_id: str, state: StateDep, caller: CallerDep) -> CutDeleted:
    """Delete the board's cut: its mp4 and per-shot clips leave the artifact store (their signed links and
    the timeline 404 / 409 from then on); the takes, the board and its edit stay. 409 `no_cut` when the
    board has none; 503 `storage_unavailable`, nothing deleted, if the store fails."""
    record, _jobs = await board_and_jobs(storyboard_id, state, caller, with_jobs=False)
    cut = await deleting(deletion.delete_cut, state.store, state.artifacts, record)
    if cut is None:
        raise ApiError(409, "no_cut", f"storyboard {storyboard_id} has no cut", "storyboard_id")
    return CutDeleted(id=cut.id, storyboard_id=record.id)


@router.get("/{storyboard_id}/cut", response_model=Cut, summary="Retrieve the cut")
async def get_cut(storyboard_id: str, request: Request, state: StateDep, caller: CallerDep) -> Cut:
    """The board's newest cut: while queued or rendering its progress and ETA, if it failed or was cancelled
    why, once completed its mp4, clips and timeline. 409 `no_cut` / `cut_stale` when it has none to serve."""
    record, _jobs = await board_and_jobs(storyboard_id, state, caller, with_jobs=False)
    job = await asyncio.to_thread(state.store.latest_cut, record.id)
    if job is not None and job.status != "succeeded":
        return await _cut_view(record, job, None, state, request)
    record, cut = await board_cut(storyboard_id, state, caller)
    return await _cut_view(record, job if job is not None and job.id == cut.id else None, cut, state, request)


@router.get(
    "/{storyboard_id}/cut/content",
    response_class=RedirectResponse,
    status_code=307,
    responses={307: {"description": "Redirect to a signed link of the cut's mp4."}},
    summary="Download the last cut",
)
async def get_cut_content(
    storyboard_id: str, request: Request, state: StateDep, caller: CallerDep
) -> Response:
    _record, cut = await board_cut(storyboard_id, state, caller)
    return RedirectResponse(await artifact_link(cut.key, state, request), status_code=307)


async def board_cut(
    storyboard_id: str, state: IngressState, caller: Caller
) -> tuple[StoryboardRecord, CutRecord]:
    record, _jobs = await board_and_jobs(storyboard_id, state, caller, with_jobs=False)
    if record.cut is None:
        raise ApiError(
            409,
            "no_cut",
            f"storyboard {storyboard_id} has no cut yet; POST /v1/storyboards/{storyboard_id}/cut",
        )
    cut = record.cut
    if cut.stale is not None:
        raise ApiError(
            409,
            "cut_stale",
            f"the cut {cut.id} of storyboard {storyboard_id} is no longer served: {cut.stale}; "
            f"POST /v1/storyboards/{storyboard_id}/cut renders it again",
        )
    return record, cut


async def artifact_link(key: str, state: IngressState, request: Request) -> str:
    link = await asyncio.to_thread(state.artifacts.url, key, expires_in_s=state.args.artifact_url_ttl_s)
    if link.startswith("/"):  # the local store's links are paths on this API
        base = state.args.public_url or str(request.base_url)
        link = base.rstrip("/") + link
    return link


async def _cut_view(
    record: StoryboardRecord, job: CutJob | None, cut: CutRecord | None, state: IngressState, request: Request
) -> Cut:
    """The API's cut: `job`'s state (None: a cut rendered before cuts were jobs), and once `cut` is
    rendered and served, its files."""
    if job is None and cut is None:
        raise ValueError("a cut view needs the cut job or the rendered cut")
    links = {"content_url": None, "timeline_url": None}
    clips: list[CutClipView] = []
    if cut is not None:
        clips = [
            CutClipView(
                **clip.model_dump(exclude={"key"}), content_url=await artifact_link(clip.key, state, request)
            )
            for clip in cut.clips
        ]
        links = {
            "content_url": await artifact_link(cut.key, state, request),
            "timeline_url": f"/v1/storyboards/{record.id}/timeline",
        }
        status, progress, eta_seconds, error = "completed", 100, None, None
    elif job is not None:
        status = CUT_STATES[job.status]
        progress = round(job.progress * 100)
        eta_seconds = None
        if job.status == "running" and job.eta_at is not None:
            eta_seconds = max(0.0, round((job.eta_at - utcnow()).total_seconds(), 1))
        error = VideoError(code=job.error_code, message=job.error_message or "") if job.error_code else None
    asked = job.request if job is not None else None
    return Cut(
        id=cut.id if cut is not None else job.id,
        storyboard_id=record.id,
        status=status,
        progress=progress,
        eta_seconds=eta_seconds,
        error=error,
        fps=cut.fps if cut is not None else asked.fps,
        size=f"{cut.width}x{cut.height}" if cut is not None else _size_text(asked.size),
        num_frames=cut.num_frames if cut is not None else None,
        seconds=cut.num_frames / cut.fps if cut is not None else None,
        slates=cut.slates if cut is not None else asked.slate_seconds is not None,
        num_clips=len(cut.clips) if cut is not None else len(asked.takes),
        created_at=int(cut.created_at if cut is not None else job.created_at.timestamp()),
        events_url=f"/v1/storyboards/{record.id}/cut/events",
        clips=clips,
        **links,
    )


def _size_text(size: tuple[int, int] | None) -> str | None:
    return None if size is None else f"{size[0]}x{size[1]}"


def _short_side(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) with the short side `short`, the aspect kept, both even."""
    if width >= height:
        return max(2, 2 * round(width * short / height / 2)), short
    return short, max(2, 2 * round(height * short / width / 2))
