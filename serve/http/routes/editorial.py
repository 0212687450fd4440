"""A storyboard's edit: selected takes and shot order (`PATCH /v1/storyboards/{id}`) and its first cut
(the cut as a timeline, out and back: serve/http/routes/timeline.py).

The cut is rendered in the Ingress, in a worker thread, while the POST waits: it only decodes, resizes,
interpolates and encodes clips that are finished already (no accelerator, no model). Measured on one core
of the 2-core dev box: a 5 s 832x480 take costs 0.3 s to decode, 4.1 s to conform 16 -> 24 fps with DIS
flow and 1.8 s to encode, and the cut encodes each shot twice (its clip and the cut), so about 8 s a shot:
a 10-shot board is about a minute, a 100-shot board over ten. The event loop never runs it, and at most
MAX_CONCURRENT_CUTS render at once per replica (others wait their turn), so a render never starves the
API. What long cuts need — a job kind the Scheduler hands to the Finisher, durable across restarts and
polled like a video — needs a second kind of job in the store (not built); until then a render that an
Ingress restart interrupts is asked for again.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from pipeline.interpolate import FlowInterpolator
from serve.auth import Caller
from serve.editorial.cut import CutNotReady, choose_takes, render_cut
from serve.http.admission import project_settings
from serve.http.deps import CallerDep, IngressState, StateDep, deleting
from serve.http.editorial import CUT_SIZES, Cut, CutClipView, CutCreate, CutDeleted, StoryboardUpdate
from serve.http.errors import ApiError
from serve.http.routes.storyboards import board_and_jobs, storyboard_of
from serve.http.storyboards import Storyboard
from serve.jobs import deletion
from serve.jobs.storyboard import CutRecord, StoryboardEdit, StoryboardRecord
from serve.storage import StorageError

router = APIRouter(prefix="/v1/storyboards", tags=["storyboards"])
MAX_CONCURRENT_CUTS = 1  # renders at once per Ingress replica (each uses a core)
DEFAULT_CUT_FPS = 24  # editors' rate, when neither the request, the board nor the project names one
_renders = asyncio.Semaphore(MAX_CONCURRENT_CUTS)


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
    await asyncio.to_thread(state.store.update_storyboard, storyboard_id, edit=edit)
    return await storyboard_of(storyboard_id, state, caller)


@router.post("/{storyboard_id}/cut", status_code=201, response_model=Cut, summary="Render the first cut")
async def create_cut(
    storyboard_id: str, request: Request, state: StateDep, caller: CallerDep, body: CutCreate | None = None
) -> Cut:
    """Assemble the selected takes (else each shot's first completed take) in the board's order, conformed
    to one rate and size, with optional slates, into one mp4 (and one per shot for the timeline). 409
    `cut_not_ready` while a shot of the cut has no completed take."""
    body = body or CutCreate()
    record, jobs = await board_and_jobs(storyboard_id, state, caller)
    try:
        choices = choose_takes(record, jobs)
    except CutNotReady as error:
        raise ApiError(
            409, "cut_not_ready", f"the cut cannot be made yet: {error}", "storyboard_id"
        ) from None
    if not choices:
        raise ApiError(409, "cut_not_ready", "the board's order has no shots", "storyboard_id")
    settings = await project_settings(state.store, record.project)
    fps = body.fps or record.request.fps or settings.default_fps or DEFAULT_CUT_FPS
    size = None
    if body.size is not None:
        first = choices[0].job.request.resolved
        size = _short_side(first.width, first.height, CUT_SIZES[body.size])
    async with _renders:
        try:
            cut = await asyncio.to_thread(
                render_cut,
                state.artifacts,
                record,
                choices,
                fps=fps,
                size=size,
                slate_seconds=float(body.slate_seconds) if body.slates else None,
                interpolator=FlowInterpolator(),
            )
        except StorageError:
            raise ApiError(503, "storage_unavailable", "the artifact store failed; try again") from None
    takes = [choice.job.id for choice in choices]
    saved = await asyncio.to_thread(state.store.save_cut, storyboard_id, cut, takes)
    if not saved:  # a take (or the board) was deleted while it rendered: its copy must not be served
        await asyncio.to_thread(deletion.delete_keys_or_leave_to_sweep, state.artifacts, cut.keys, cut.id)
        await board_and_jobs(storyboard_id, state, caller, with_jobs=False)  # 404 once the board is gone
        raise ApiError(
            409, "take_deleted", "a take of the cut was deleted while it rendered; render it again"
        )
    if record.cut is not None:  # the cut it replaces is served no more: its files go (no stale copies)
        old = record.cut.keys
        await asyncio.to_thread(
            deletion.delete_keys_or_leave_to_sweep, state.artifacts, old, "a replaced cut"
        )
    return await _cut_view(record, cut, state, request)


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


@router.get("/{storyboard_id}/cut", response_model=Cut, summary="Retrieve the last cut")
async def get_cut(storyboard_id: str, request: Request, state: StateDep, caller: CallerDep) -> Cut:
    record, cut = await board_cut(storyboard_id, state, caller)
    return await _cut_view(record, cut, state, request)


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


async def _cut_view(record: StoryboardRecord, cut: CutRecord, state: IngressState, request: Request) -> Cut:
    clips = [
        CutClipView(
            **clip.model_dump(exclude={"key"}), content_url=await artifact_link(clip.key, state, request)
        )
        for clip in cut.clips
    ]
    return Cut(
        id=cut.id,
        storyboard_id=record.id,
        fps=cut.fps,
        size=f"{cut.width}x{cut.height}",
        num_frames=cut.num_frames,
        seconds=cut.num_frames / cut.fps,
        slates=cut.slates,
        created_at=int(cut.created_at),
        content_url=await artifact_link(cut.key, state, request),
        timeline_url=f"/v1/storyboards/{record.id}/timeline",
        clips=clips,
    )


def _short_side(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) with the short side `short`, the aspect kept, both even."""
    if width >= height:
        return max(2, 2 * round(width * short / height / 2)), short
    return short, max(2, 2 * round(height * short / width / 2))
