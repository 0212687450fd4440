"""Chained shots: a board's shot that says `continue` starts from the last decoded frame of a take of the
shot it continues. Its takes are created with the board, queued but waiting (`continues_shot` set, never
claimed); each Scheduler pass releases those whose predecessor has the take to start from:

    the predecessor shot's selected take (the board's edit), once it completed; while none is selected,
    its first completed take. A selected take that is still running is waited for; one that failed or was
    cancelled falls back to the first completed take.

Release = the take's stored last frame (serve.stages.decoder wrote it at decode time, before any label,
look or conform), fitted to the waiting take's size, shown to the content policy's frame check as every
keyframe image is at admission (serve.http.keyframes), stored as its first keyframe, and the job let into
the claimable queue (JobStore.release_chained). A frame the check blocks fails the take with
`continuity_frame_blocked` (its own code: the page says the frame it would start from was blocked, not its
finished frames), nothing stored, as a blocked image is refused; a check that fails (SafetyCheckError)
releases nothing: the take keeps waiting and the next pass asks again (fail closed). A predecessor whose
takes all ended without one completing breaks the chain: the waiting take fails with `continuity_broken`.
Changing the selection later re-runs nothing; a remix of the chained take starts from the frame it was
released with.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

import numpy as np
from PIL import Image

from pipeline.safety import FrameCheck, SafetyCheckError
from serve.jobs import JobRecord, JobStatus, JobStore
from serve.jobs.keyframes import PNG, fit_to_size, load_last_frame, png_bytes
from serve.metrics import record_job_finished, record_safety_block
from serve.storage import ArtifactStore, JobArtifacts

logger = logging.getLogger("ray.serve")


async def release_chained(
    store: JobStore, artifacts: ArtifactStore, scheduler_id: str, frame_check: FrameCheck | None = None
) -> int:
    """Release every waiting chained take whose predecessor's take is ready and whose frame `frame_check`
    (the content policy's; None: no check) passes; the number released."""
    released = 0
    for job in await asyncio.to_thread(store.waiting_chained):
        try:
            released += await _release(store, artifacts, job, scheduler_id, frame_check)
        except Exception:  # one board's trouble must not stop the claim loop; retried next pass
            logger.exception("could not release chained take %s", job.id)
    return released


async def _release(
    store: JobStore,
    artifacts: ArtifactStore,
    job: JobRecord,
    scheduler_id: str,
    frame_check: FrameCheck | None,
) -> bool:
    shot = job.continues_shot
    if job.storyboard_id is None or shot is None:
        return False
    board = await asyncio.to_thread(store.get_storyboard, job.storyboard_id)
    takes = await asyncio.to_thread(
        store.list, storyboard_id=job.storyboard_id, project=job.project, limit=200, order="asc"
    )
    of_shot = [take for take in takes if take.request.storyboard and take.request.storyboard.shot == shot]
    selected_id = board.edit.takes.get(str(shot)) if board is not None and board.edit is not None else None
    selected = next((take for take in of_shot if take.id == selected_id), None)
    completed = sorted(
        (take for take in of_shot if take.status == JobStatus.SUCCEEDED),
        key=lambda take: (take.finished_at, take.id),
    )
    if selected is not None and not selected.is_finished:
        return False  # the editor chose a take still on its way: wait for it
    source = selected if selected is not None and selected.status == JobStatus.SUCCEEDED else None
    source = source or (completed[0] if completed else None)
    if source is None:
        if of_shot and all(take.is_finished for take in of_shot):
            await _fail(
                store,
                job,
                scheduler_id,
                "continuity_broken",
                f"shot {shot + 1} of the board, which this take continues, has no completed take (every one "
                "failed or was cancelled); remix one of them, then this shot",
            )
        return False
    frame = await asyncio.to_thread(load_last_frame, artifacts, source.project, source.id)
    if frame is None:
        return False  # finished before its frame was stored: nothing to start from yet
    resolved = job.request.resolved
    fitted = await asyncio.to_thread(fit_to_size, Image.fromarray(frame), resolved.width, resolved.height)
    if frame_check is not None:
        try:
            verdict = await asyncio.to_thread(frame_check.check, np.asarray(fitted)[None])
        except SafetyCheckError as error:  # fails closed: nothing released, asked again next pass
            logger.warning("chained take %s waits: %s", job.id, error)
            return False
        if verdict is not None:
            record_safety_block("keyframe", verdict.category)
            await _fail(
                store,
                job,
                scheduler_id,
                "continuity_frame_blocked",
                f"the last frame of take {source.id}, which this take would start from, was blocked by the "
                f"content policy (category `{verdict.category}`); nothing was rendered",
            )
            return False
    data = await asyncio.to_thread(png_bytes, fitted)
    key = JobArtifacts(job.project, job.id).keyframe("first")
    await asyncio.to_thread(artifacts.put_bytes, key, data, PNG)
    keyframes = job.request.keyframes
    assert keyframes is not None and keyframes.first is not None  # a waiting take has its `continue`
    digest = hashlib.sha256(data).hexdigest()
    first = keyframes.first.model_copy(update={"video": source.id, "sha256": digest})
    request = job.request.model_copy(update={"keyframes": keyframes.model_copy(update={"first": first})})
    return await asyncio.to_thread(store.release_chained, job.id, request)


async def _fail(store: JobStore, job: JobRecord, scheduler_id: str, code: str, message: str) -> None:
    """Fail a waiting take that will never run (a queued job fails once claimed)."""
    claimed = await asyncio.to_thread(store.claim, job.id, scheduler_id)
    if claimed is None:
        return  # cancelled meanwhile
    if await asyncio.to_thread(store.fail, claimed.id, claimed.attempt, code, message):
        record_job_finished(claimed, "failed")
