"""A board's last cut as an editorial timeline, out (`GET /v1/storyboards/{id}/timeline`: OTIO, EDL, FCP
XML, AAF, at the cut's rate or 24/25) and back (`PUT`: an edited OTIO, EDL, FCP XML or AAF updates the
board's order, selected takes and trims in one write, or changes nothing)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response
from starlette.background import BackgroundTask

from serve.editorial.readback import (
    ReadFormat,
    TimelineRefused,
    UnreadableTimeline,
    apply_timeline,
    read_timeline,
)
from serve.editorial.timeline import (
    SMPTE_RATES,
    ClipReview,
    RateNotInTimecode,
    TimelineFormat,
    build_timeline,
    package,
    write_timeline,
)
from serve.editorial.timeline import WRITERS as TIMELINE_WRITERS
from serve.http.deps import CallerDep, IngressState, StateDep, jobs_on_board
from serve.http.editorial import ShotTrimView, TimelineApplied
from serve.http.errors import TIMELINE_REFUSED, ApiError
from serve.http.routes.editorial import artifact_link, board_cut
from serve.http.routes.storyboards import board_and_jobs
from serve.http.schemas import UnmatchedClip
from serve.jobs.reviews import review_status
from serve.jobs.storyboard import CutRecord, StoryboardRecord
from serve.storage import StorageError

router = APIRouter(prefix="/v1/storyboards", tags=["storyboards"])
TIMELINE_CONTENT = {
    "application/json": {},
    "text/plain": {},
    "application/xml": {},
    "application/octet-stream": {},
    "application/zip": {},
}
# Declared as text (what a file upload is); OTIO may come as application/json too, whose strings then pass
# the one text policy like every JSON body.
EDITED_TIMELINE_BODY = {
    "required": True,
    "description": "The edited timeline file as it is (OTIO JSON, CMX 3600 EDL, FCP 7 XML or AAF).",
    "content": {
        media: {"schema": {"type": "string"}}
        for media in ("text/plain", "application/xml", "application/octet-stream")
    },
}


@router.get(
    "/{storyboard_id}/timeline",
    response_class=Response,
    responses={200: {"content": TIMELINE_CONTENT, "description": "The timeline, or the package zip."}},
    summary="Export the last cut as a timeline",
)
async def get_timeline(
    storyboard_id: str,
    request: Request,
    state: StateDep,
    caller: CallerDep,
    format: Annotated[
        TimelineFormat,
        Query(description="otio (JSON), edl (CMX 3600), fcpxml (FCP 7 XML) or aaf (Avid)."),
    ] = "otio",
    rate: Annotated[
        int | None,
        Query(
            ge=min(SMPTE_RATES),
            le=max(SMPTE_RATES),
            description="The timeline's rate, 24 or 25: the clips' lengths are conformed to it (default: "
            "the cut's; EDL, FCP XML and AAF of a 16 fps cut need one).",
        ),
    ] = None,
    package_zip: Annotated[
        bool,
        Query(
            alias="package",
            description="A zip with the cut, the shots' clips and the timeline, its media as relative paths "
            "(else the timeline alone, its media as signed links).",
        ),
    ] = False,
) -> Response:
    """The last cut as a timeline: one clip per shot, named "<shot> take <n>", carrying its take id and its
    review (status and notes). EDL, FCP XML and AAF count SMPTE timecode: a 16 fps cut needs `rate` 24 or
    25 (else 409 `timeline_rate_unsupported`)."""
    record, cut = await board_cut(storyboard_id, state, caller)
    title = record.title or record.id
    reviews = await _reviews(state, record, cut)
    try:
        if package_zip:
            fd, name = tempfile.mkstemp(prefix="previz-package-", suffix=".zip")
            os.close(fd)
            try:
                path = await asyncio.to_thread(
                    package,
                    state.artifacts,
                    cut,
                    title,
                    format,
                    record.id,
                    Path(name),
                    rate=rate,
                    reviews=reviews,
                )
            except BaseException:
                Path(name).unlink(missing_ok=True)
                raise
            return FileResponse(
                path,
                media_type="application/zip",
                filename=f"{record.id}.zip",
                background=BackgroundTask(path.unlink, missing_ok=True),
            )
        links = [await artifact_link(clip.key, state, request) for clip in cut.clips]
        timeline = build_timeline(
            cut,
            title,
            lambda _clip, index: links[index],
            rate=rate,
            reviews=reviews,
            note_markers=format != "edl",
        )
        data = await asyncio.to_thread(write_timeline, timeline, format, rate or cut.fps)
    except RateNotInTimecode as error:
        raise ApiError(409, "timeline_rate_unsupported", str(error), "format") from None
    except StorageError:
        raise ApiError(503, "storage_unavailable", "the artifact store failed; try again") from None
    headers = {}
    if format == "aaf":
        headers["Content-Disposition"] = f'attachment; filename="{record.id}.aaf"'
    return Response(data, media_type=TIMELINE_WRITERS[format].media_type, headers=headers)


@router.put(
    "/{storyboard_id}/timeline",
    response_model=TimelineApplied,
    responses=TIMELINE_REFUSED,
    openapi_extra={"requestBody": EDITED_TIMELINE_BODY},
    summary="Read an edited timeline back",
)
async def put_timeline(
    storyboard_id: str,
    request: Request,
    state: StateDep,
    caller: CallerDep,
    format: Annotated[
        ReadFormat, Query(description="otio (JSON), edl (CMX 3600), fcpxml (FCP 7 XML) or aaf (Avid).")
    ],
    rate: Annotated[
        int | None,
        Query(
            ge=1, le=120, description="The rate an EDL counts at (default: the cut's if 24 or 25, else 24)."
        ),
    ] = None,
) -> TimelineApplied:
    """A timeline exported from the board's last cut and edited (clips re-ordered, trimmed, dropped, a take
    swapped for another take of the same shot) becomes the board's order, selected takes and per-shot trims,
    all in one write; the next cut honours them. Clips are matched by the take id every export carries,
    never by name. 422 `unmatched_clips` (a clip without a take id of this board, or a shot used twice) or
    409 `foreign_timeline` (no clip is a take of this board), each listing the clips in `error.clips` (its
    place, name, take id and a `reason` code), and nothing changes;
    400 `invalid_timeline` for a body that is no timeline of `format`."""
    record, jobs = await board_and_jobs(storyboard_id, state, caller)
    _record, cut = await board_cut(storyboard_id, state, caller)
    body = await request.body()
    edl_rate = rate or (cut.fps if cut.fps in (24, 25) else 24)
    try:
        edited = await asyncio.to_thread(read_timeline, body, format, edl_rate)
        edit = apply_timeline(record, jobs, cut, edited)
    except UnreadableTimeline as error:
        raise ApiError(400, "invalid_timeline", str(error), "format") from None
    except TimelineRefused as error:
        clips = [
            UnmatchedClip(
                position=clip.index + 1,
                name=clip.name,
                video_id=clip.video_id,
                reason=clip.code,  # type: ignore[arg-type]  # readback's codes are the schema's
                message=clip.reason,
            )
            for clip in error.unmatched
        ]
        if error.code == "foreign_timeline":
            message = f"the timeline is from another board; nothing was changed: {error}"
            raise ApiError(409, "foreign_timeline", message, "body", clips=clips) from None
        message = f"the timeline has clips it cannot use; nothing was changed: {error}"
        raise ApiError(422, "unmatched_clips", message, "body", clips=clips) from None
    await asyncio.to_thread(state.store.update_storyboard, storyboard_id, edit=edit)
    previous = record.shot_order
    return TimelineApplied(
        storyboard_id=storyboard_id,
        format=format,
        rate=edited.rate,
        order=edit.order or [],
        takes=dict(edit.takes),
        trims={shot: ShotTrimView(**trim.model_dump()) for shot, trim in edit.trims.items()},
        dropped=[shot for shot in previous if shot not in (edit.order or [])],
        num_frames=sum(clip.num_frames for clip in edited.clips),
    )


async def _reviews(state: IngressState, record: StoryboardRecord, cut: CutRecord) -> dict[str, ClipReview]:
    """The review of every take of the cut (video id -> status, notes)."""
    ids = {clip.video_id for clip in cut.clips}
    jobs = [job for job in await jobs_on_board(state, record) if job.id in ids]
    notes = await asyncio.to_thread(state.store.take_notes, [job.id for job in jobs])
    return {
        job.id: ClipReview(review_status(job), job.review_by, job.request.finish.fps, notes.get(job.id, []))
        for job in jobs
    }
