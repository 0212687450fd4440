"""The `/v1/videos/{id}/events` stream: a job's event log and status changes as server-sent events, read
from the job store (so any Ingress replica can serve any stream, and a restart loses no event); and the
same for a board's cut job (`/v1/storyboards/{id}/cut/events`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from serve.jobs import JobEvent, JobRecord, JobStatus, JobStore
from serve.jobs.cuts import CutJob
from serve.jobs.models import utcnow
from serve.scheduling.lanes import Lanes
from serve.scheduling.queue_wait import queue_wait

EVENTS_POLL_S = 0.25  # how often an event stream looks at the job store
EVENTS_KEEPALIVE_S = 15.0
QUEUE_RECOUNT_S = 2.0  # how often a queued video's place and ETA are counted again


def _sse(kind: str, data: dict[str, Any], event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"


def _event_data(event: JobEvent) -> dict[str, Any]:
    data = {"id": event.id, "type": event.kind, "at": event.at.isoformat(), **event.data}
    if "status" in event.data:
        data["stage"] = str(event.data["status"]).lower()
    return data


async def event_stream(
    store: JobStore,
    video_id: str,
    after_id: int,
    final: Callable[[JobRecord], dict[str, Any]],
    lanes: Lanes,
) -> AsyncIterator[str]:
    """Server-sent events of one video: its logged events after `after_id` (ids let a client resume with
    Last-Event-ID), a `status` event on each change, and `done` with `final(job)` once it is finished.
    While queued, its wait (`lanes`: the Scheduler's slots it waits for) is counted again every
    QUEUE_RECOUNT_S."""
    last_status: tuple[Any, ...] | None = None
    wait, counted_at = None, 0.0
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    yield "retry: 1000\n\n"
    while True:
        # Read the job first: when it is finished, every event it will ever have is committed already.
        job = await asyncio.to_thread(store.get, video_id)
        if job is None:
            return
        events = await asyncio.to_thread(store.events, video_id, after_id=after_id)
        for event in events:
            after_id = event.id
            yield _sse(event.kind, _event_data(event), event.id)
        # while queued: its place in the job queue (counted in the store); while running: in its stage's
        position, eta_seconds = job.num_ahead_in_engine, job.eta_seconds
        if job.continues_shot is not None:  # a chained take: no place in the queue until it is released
            position, eta_seconds = None, None
        elif job.status == JobStatus.QUEUED:
            if wait is None or loop.time() - counted_at >= QUEUE_RECOUNT_S:
                wait, counted_at = await asyncio.to_thread(queue_wait, store, job, lanes), loop.time()
            position, eta_seconds = wait.num_ahead, wait.eta_seconds
        eta_shown = round(eta_seconds) if eta_seconds is not None else None
        status = (job.status, job.progress, round(job.stage_progress, 3), position, job.eta_at, eta_shown)
        if status != last_status:
            last_status = status
            yield _sse(
                "status",
                {
                    "status": job.status.api_state,
                    "stage": job.stage,
                    "waiting_for": job.waiting_for,
                    "queue_position": position,
                    "progress": job.progress,
                    "stage_progress": job.stage_progress,
                    "eta_seconds": eta_seconds,
                },
            )
            quiet_since = loop.time()
        if job.is_finished:
            yield _sse("done", final(job))
            return
        if events:
            quiet_since = loop.time()
        elif loop.time() - quiet_since > EVENTS_KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet_since = loop.time()
        await asyncio.sleep(EVENTS_POLL_S)


async def cut_event_stream(
    store: JobStore, cut_id: str, final: Callable[[CutJob], Awaitable[dict[str, Any]]]
) -> AsyncIterator[str]:
    """Server-sent events of one cut job, read from the store: `status` on each change of its status,
    progress or ETA, and `done` with `await final(cut)` once it is finished."""
    last: tuple[Any, ...] | None = None
    loop = asyncio.get_running_loop()
    quiet_since = loop.time()
    yield "retry: 1000\n\n"
    while True:
        cut = await asyncio.to_thread(store.get_cut, cut_id)
        if cut is None:
            return
        now = (cut.status, round(cut.progress, 3), cut.eta_at)
        if now != last:
            last = now
            eta = None if cut.eta_at is None else max(0.0, (cut.eta_at - utcnow()).total_seconds())
            data = {
                "id": cut.id,
                "status": cut.status,
                "progress": round(cut.progress * 100),
                "eta_seconds": eta,
            }
            yield _sse("status", data)
            quiet_since = loop.time()
        if cut.is_finished:
            yield _sse("done", await final(cut))
            return
        if loop.time() - quiet_since > EVENTS_KEEPALIVE_S:
            yield ": keep-alive\n\n"
            quiet_since = loop.time()
        await asyncio.sleep(EVENTS_POLL_S)
