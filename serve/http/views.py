"""The API's views of stored records: one `Video` per job, one `Storyboard` per board.

`video_view` is the only rendering of a job: `GET /v1/videos/{id}`, lists, the events stream's `done`, the
storyboard view and the webhook payload (written by the job store's outbox) all use it, so they never
disagree. It needs the job row (the request carries its resolved size, frames and steps) and, for
`expires_at`, the project's retention.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pipeline.interpolate import conform_frame_count
from serve.http.schemas import LoraUse, StepCache, Video, VideoError
from serve.http.storyboards import Storyboard, StoryboardShotState, StoryboardVideo, board_status
from serve.jobs.models import JobRecord, JobStatus, unix
from serve.jobs.reviews import review_status
from serve.jobs.storyboard import StoryboardRecord
from serve.jobs.takes import take_number
from serve.scheduling.queue_wait import QueueWait


def video_view(job: JobRecord, wait: QueueWait | None = None, *, retention_days: int | None = None) -> Video:
    """The video as the API shows it; `wait` is its place and ETA while it is in the job queue (counted
    by serve.scheduling.queue_wait), `retention_days` its project's (it sets `expires_at`)."""
    queued = job.status == JobStatus.QUEUED
    request = job.request
    resolved = request.resolved
    completed = job.status == JobStatus.SUCCEEDED
    error = None
    if job.status == JobStatus.FAILED:
        error = VideoError(code=job.error_code or "failed", message=job.error_message or "")
    elif job.status == JobStatus.CANCELLED:
        error = VideoError(code="cancelled", message="the video was cancelled")
    base = f"/v1/videos/{job.id}"
    return Video(
        id=job.id,
        model=request.model,
        status=job.status.api_state,
        progress=job.progress,
        created_at=unix(job.created_at),
        completed_at=unix(job.finished_at),
        expires_at=unix(expiry(job, retention_days)),
        prompt=request.spec.prompt,
        seconds=f"{request.spec.duration:g}",
        size=job.request.bucket.size,
        remixed_from_video_id=request.remixed_from,
        error=error,
        project=job.project,
        priority=job.priority,
        stage=job.stage,
        queue_position=(wait.num_ahead if wait else None) if queued else job.num_ahead_in_engine,
        waiting_for=job.waiting_for,
        seed=job.seed if job.seed is not None else resolved.seed,
        steps=resolved.steps,
        quality=resolved.quality,
        loras=[LoraUse(name=lora.name, weight=lora.weight) for lora in resolved.loras],
        promoted_from=request.promoted_from,
        promoted_to=job.promoted_to,
        eta_seconds=(wait.eta_seconds if wait else None) if queued else job.eta_seconds,
        cache=StepCache.model_validate(resolved.cache.model_dump()) if resolved.cache is not None else None,
        num_frames=conform_frame_count(resolved.num_frames, resolved.fps, request.finish.fps),
        fps=request.finish.fps,
        upscale=request.finish.upscale,
        look=request.finish.look,
        labels=job.labels,
        storyboard_id=job.storyboard_id,
        take=job.take,
        review=review_status(job),
        review_by=job.review_by,
        reviewed_at=unix(job.review_at),
        callback_url=request.callback_url,
        attempt=job.attempt,
        started_at=unix(job.started_at),
        timings=job.timings or {},
        content_url=f"{base}/content" if completed else None,
        thumbnail_url=f"{base}/content?variant=thumbnail" if completed and job.poster_uri else None,
        events_url=f"{base}/events",
    )


def video_payload(job: JobRecord, retention_days: int | None = None) -> dict[str, Any]:
    """`video_view` as JSON: the webhook's `data` and the events stream's `done`."""
    return video_view(job, retention_days=retention_days).model_dump(mode="json")


def expiry(job: JobRecord, retention_days: int | None) -> datetime | None:
    """When a finished job is deleted under its project's retention (None: kept)."""
    if retention_days is None or job.finished_at is None:
        return None
    return job.finished_at + timedelta(days=retention_days)


def keyframe_kind(job: JobRecord) -> str | None:
    keyframes = job.request.keyframes
    return keyframes.first.kind if keyframes is not None and keyframes.first is not None else None


def storyboard_view(
    record: StoryboardRecord, jobs: list[JobRecord], waits: dict[str, QueueWait] | None = None
) -> Storyboard:
    """The board as the API shows it: its jobs grouped by shot, in creation order; `waits`: job id -> the
    wait of each of its queued jobs."""
    waits = waits or {}
    shots = [
        StoryboardShotState(index=index, name=shot.name, prompt="", videos=[], continues=shot.continues)
        for index, shot in enumerate(record.request.shots)
    ]
    counts: dict[str, int] = {}
    progress = 0
    take_of = {job.id: job.take for job in jobs}
    for job in jobs:
        video = video_view(job, waits.get(job.id))
        place = job.request.storyboard
        shot = shots[place.shot if place is not None else 0]
        shot.prompt = shot.prompt or video.prompt
        counts[video.status] = counts.get(video.status, 0) + 1
        progress += video.progress
        shot.videos.append(
            StoryboardVideo(
                video_id=job.id,
                variant=place.variant if place is not None else 0,
                take=take_number(job),
                seed=video.seed,
                grid=place.grid if place is not None else {},
                status=video.status,
                stage=video.stage,
                progress=video.progress,
                waiting_for=video.waiting_for,
                queue_position=video.queue_position,
                eta_seconds=video.eta_seconds,
                url=f"/v1/videos/{job.id}",
                content_url=video.content_url,
                thumbnail_url=video.thumbnail_url,
                error=video.error.model_dump() if video.error else None,
                quality=video.quality,
                promoted_to=video.promoted_to,
                promoted_from=video.promoted_from,
                promoted_from_take=take_of.get(video.promoted_from) if video.promoted_from else None,
                review=video.review,
                review_by=video.review_by,
                keyframe=keyframe_kind(job),
            )
        )
    takes = record.edit.takes if record.edit is not None else {}
    for key, video_id in takes.items():
        shots[int(key)].selected_video_id = video_id
    for key, trim in (record.edit.trims if record.edit is not None else {}).items():
        shots[int(key)].trim = trim
    states = [video.status for shot in shots for video in shot.videos]
    return Storyboard(
        id=record.id,
        project=record.project,
        title=record.title,
        created_at=unix(record.created_at),
        status=board_status(states) if states else "queued",
        progress=round(progress / len(jobs)) if jobs else 0,
        num_videos=len(jobs),
        counts=counts,
        shots=shots,
        order=record.shot_order,
        # a stale cut (a take of it was deleted) is not served: the board shows none until rendered again
        cut_url=f"/v1/storyboards/{record.id}/cut" if record.served_cut is not None else None,
    )
