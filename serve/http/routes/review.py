"""`/v1/videos/{id}/notes` and `/v1/videos/{id}/review`: a take's review. Thin: read, check, store.

A note's author is the calling API key's name (its id when it has none): who wrote what is the key's, not
a name the body could claim. Another project's take is 404, as everywhere.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from pipeline.interpolate import conform_frame_count
from serve.auth import Caller
from serve.http.deps import CallerDep, IngressState, StateDep, job_or_404
from serve.http.errors import ApiError
from serve.http.review import Note, NoteCreate, NoteList, Review, ReviewUpdate
from serve.jobs import JobRecord
from serve.jobs.models import unix
from serve.jobs.reviews import TakeNote, review_status

router = APIRouter(prefix="/v1/videos", tags=["review"])


@router.post("/{video_id}/notes", status_code=201, response_model=Note, summary="Add a note to a take")
async def add_note(video_id: str, body: NoteCreate, state: StateDep, caller: CallerDep) -> Note:
    """A review note on the video, optionally on one `frame` (0-based, at the video's own delivered rate;
    400 `invalid_frame` past its last frame). The author is the API key's name."""
    job = await job_or_404(video_id, state, caller)
    num_frames = take_frames(job)
    if body.frame is not None and body.frame >= num_frames:
        raise ApiError(
            400,
            "invalid_frame",
            f"video {video_id} has {num_frames} frames at {job.request.finish.fps} fps (0–{num_frames - 1}), "
            f"not frame {body.frame}",
            "frame",
        )
    author = await author_of(state, caller)
    note = await asyncio.to_thread(
        state.store.add_note,
        video_id,
        project=job.project,
        author=author,
        key_id=caller.key_id,
        text=body.text,
        frame=body.frame,
    )
    if note is None:  # deleted meanwhile
        raise ApiError(404, "not_found", f"no video with id {video_id!r}", param="video_id")
    return note_view(note, job.request.finish.fps)


@router.get("/{video_id}/notes", response_model=NoteList, summary="List a take's notes")
async def list_notes(video_id: str, state: StateDep, caller: CallerDep) -> NoteList:
    job = await job_or_404(video_id, state, caller)
    notes = (await asyncio.to_thread(state.store.take_notes, [job.id])).get(job.id, [])
    return NoteList(data=[note_view(note, job.request.finish.fps) for note in notes])


@router.put("/{video_id}/review", response_model=Review, summary="Set a take's review status")
async def set_review(video_id: str, body: ReviewUpdate, state: StateDep, caller: CallerDep) -> Review:
    """Set the take's status (pending, approved, rejected, needs-changes). A change is logged on the video
    (a `review` event: from, to, by) and fires a `video.review_changed` webhook to its `callback_url`;
    setting the status it has changes nothing."""
    job = await job_or_404(video_id, state, caller)
    author = await author_of(state, caller)
    result = await asyncio.to_thread(
        state.store.set_review, video_id, body.status, project=job.project, author=author
    )
    if result is None:
        raise ApiError(404, "not_found", f"no video with id {video_id!r}", param="video_id")
    job, changed = result
    return review_view(job, changed)


@router.get("/{video_id}/review", response_model=Review, summary="Retrieve a take's review status")
async def get_review(video_id: str, state: StateDep, caller: CallerDep) -> Review:
    return review_view(await job_or_404(video_id, state, caller), False)


def take_frames(job: JobRecord) -> int:
    """The take's frame count at its own delivered rate (what its `num_frames` says)."""
    resolved = job.request.resolved
    return conform_frame_count(resolved.num_frames, resolved.fps, job.request.finish.fps)


async def author_of(state: IngressState, caller: Caller) -> str:
    key = await asyncio.to_thread(state.store.get_key, caller.key_id)
    return (key.name if key is not None and key.name else None) or caller.key_id


def note_view(note: TakeNote, fps: int) -> Note:
    return Note(
        id=note.id,
        video_id=note.video_id,
        author=note.author,
        text=note.text,
        frame=note.frame,
        seconds=None if note.frame is None else round(note.frame / fps, 3),
        created_at=unix(note.created_at),
    )


def review_view(job: JobRecord, changed: bool) -> Review:
    return Review(
        video_id=job.id,
        status=review_status(job),
        review_by=job.review_by,
        reviewed_at=unix(job.review_at),
        changed=changed,
    )
