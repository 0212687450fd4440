"""The Scheduler deployment (one replica): the brain that moves jobs from the store through the stages.

It pulls queued jobs (priority class, project fair share, deadline, age), keeps at most
`max_jobs_in_flight` inside the pipeline, and writes every transition to the job store. Nothing lives
only in its memory: on (re)start it requeues the jobs a previous incarnation had claimed, and the store's
attempt fence makes any stale work of that incarnation unable to record a result. A finished job is never
run again.

Faults: a job that loses a replica goes back to the queue; the denoise state saved at the expert boundary
(serve.scheduling.checkpoints) lets its next attempt skip the high-noise expert and give the same clip.
The Finisher is retried with backoff (`finish_attempts`), then the job fails with `storage_failed` or
`finish_failed`; a run whose update the store refuses is `Superseded` and stops (serve.scheduling.faults).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from pipeline.denoise.state import initial_state
from pipeline.safety import ContentBlocked
from pipeline.spec import ModelSpec
from pipeline.stages import overall_progress
from pipeline.upscale import upscale_target_size
from serve.config import PrevizArgs
from serve.jobs import RUNNING_STATUSES, JobRecord, JobStatus
from serve.jobs.retention import RetentionSweeper
from serve.metrics import (
    REPORT_INTERVAL_S,
    QueueReporter,
    record_job_claimed,
    record_job_finished,
    record_scheduler_pass,
)
from serve.scheduling.checkpoints import CheckpointError, read_checkpoint, write_checkpoint
from serve.scheduling.eta import EtaModel
from serve.scheduling.fair_share import Candidate, pick_next
from serve.scheduling.faults import REPLICA_LOST, StageFailed, Superseded, describe, finish_with_retries
from serve.stages.payloads import (
    DenoiseCall,
    DenoiseDone,
    DenoiseProgress,
    DenoiseWaiting,
    FinishCall,
    FinishedClip,
    FrameBatch,
)
from serve.stages.transfer import PackedState, pack_state
from serve.storage import JobArtifacts, StorageError, make_store
from serve.webhooks import WebhookDispatcher, open_job_store

logger = logging.getLogger("ray.serve")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StageHandles:
    text_encoder: DeploymentHandle
    high: DeploymentHandle
    low: DeploymentHandle
    vae: DeploymentHandle
    upscaler: DeploymentHandle
    finisher: DeploymentHandle


async def stage_call(response: DeploymentResponse) -> Any:
    """Await one stage call; when the job's task is cancelled meanwhile, cancel the call on its replica
    too (a running decode, upscale or finish stops instead of finishing for nobody)."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


async def settled(work: Awaitable[T]) -> T:
    """Await `work` (a worker thread's call) to its end even when the task is cancelled meanwhile, then
    re-raise the cancel: a thread cannot be stopped, so a file it is writing lands before the run's
    clean-up looks for it, never after."""
    future = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled() and future.exception() is not None:
            logger.debug("a call settled after its task was cancelled: %r", future.exception())
        raise


class StageClock:
    """When the accelerator stage that a job's attempt is in began, so a cancel can count the part that ran
    (a finished stage's seconds come from its replica)."""

    def __init__(self) -> None:
        self._began: float | None = None

    def begin(self) -> None:
        self._began = time.perf_counter()

    def end(self) -> None:
        self._began = None

    def open_seconds(self) -> float:
        """Seconds the current stage has run so far; 0 between stages."""
        return 0.0 if self._began is None else time.perf_counter() - self._began


@serve.deployment(name="Scheduler", num_replicas=1, max_ongoing_requests=1000, health_check_period_s=10)
class Scheduler:
    def __init__(
        self,
        args: PrevizArgs,
        model: ModelSpec,
        text_encoder: DeploymentHandle,
        high: DeploymentHandle,
        low: DeploymentHandle,
        vae: DeploymentHandle,
        upscaler: DeploymentHandle,
        finisher: DeploymentHandle,
    ) -> None:
        self.args = args
        self.model = model
        self.stages = StageHandles(text_encoder, high, low, vae, upscaler, finisher)
        self.store = open_job_store(args.database_url)
        self.store.create_schema()
        self.artifacts = make_store(args.storage)  # denoise checkpoints live beside the clips
        self.scheduler_id = f"scheduler-{uuid.uuid4().hex[:12]}"
        requeued = self.store.requeue_in_flight(max_attempts=args.max_attempts)
        if requeued:
            logger.info("requeued %d jobs left in flight by a previous scheduler", len(requeued))
        self._running: dict[str, tuple[str, asyncio.Task]] = {}  # job_id -> (project, task)
        self._eta = EtaModel()  # stage times measured here: the later stages of a job's ETA
        self._wake = asyncio.Event()
        self._loop_task = asyncio.get_running_loop().create_task(self._serve_forever())
        self._queue_reporter = QueueReporter()
        self._metrics_task = asyncio.get_running_loop().create_task(self._report_forever())
        # callback_url POSTs from the outbox
        self._webhooks = WebhookDispatcher(self.store, args.webhooks, public_url=args.public_url)
        self._webhooks_task = asyncio.get_running_loop().create_task(self._webhooks.run_forever())
        self._retention = RetentionSweeper(self.store, self.artifacts, args.retention_sweep_s)
        self._retention_task = asyncio.get_running_loop().create_task(self._retention.run_forever())

    async def wake(self) -> None:
        """A job was queued or cancelled: look at the queue now instead of at the next poll."""
        self._wake.set()

    async def cancel(self, job_id: str) -> bool:
        """Stop a running job's pipeline (the store already marks it cancelled, or deleted); what the run
        stored goes when it stops. A job cancelled while queued has no pipeline, but may hold a checkpoint
        of an earlier run: that goes now."""
        entry = self._running.get(job_id)
        if entry is None:  # cancelled while queued: no run will count it, so count it here
            job = await asyncio.to_thread(self.store.get, job_id)
            if job is not None and job.status == JobStatus.CANCELLED:
                record_job_finished(job, "cancelled")
            await asyncio.to_thread(self._clean_up, job_id)
            return False
        entry[1].cancel()
        return True

    async def in_flight(self) -> list[str]:
        return list(self._running)

    def check_health(self) -> None:
        if self._loop_task.done():
            raise RuntimeError(f"the scheduling loop stopped: {self._loop_task.exception()!r}")

    async def _serve_forever(self) -> None:
        while True:
            try:
                await self._start_jobs()
                record_scheduler_pass(ok=True)
            except Exception:
                logger.exception("scheduling pass failed; retrying")
                record_scheduler_pass(ok=False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.args.poll_interval_s)
            self._wake.clear()

    async def _start_jobs(self) -> None:
        free = self.args.max_jobs_in_flight - len(self._running)
        if free <= 0:
            return
        queued = await asyncio.to_thread(self.store.queued, 500)
        if not queued:
            return
        running: dict[str, int] = {}
        for project, _task in self._running.values():
            running[project] = running.get(project, 0) + 1
        candidates = [
            Candidate(job.id, job.project, job.priority, job.created_at, job.deadline) for job in queued
        ]
        for candidate in pick_next(candidates, running, free):
            job = await asyncio.to_thread(self.store.claim, candidate.job_id, self.scheduler_id)
            if job is None:  # cancelled meanwhile
                continue
            record_job_claimed(job)
            task = asyncio.get_running_loop().create_task(self._run_job(job))
            self._running[job.id] = (job.project, task)
            task.add_done_callback(lambda _t, job_id=job.id: self._job_left(job_id))

    def _job_left(self, job_id: str) -> None:
        self._running.pop(job_id, None)
        self._wake.set()
        self._webhooks.wake()  # its outcome may have queued a webhook

    async def _run_job(self, job: JobRecord) -> None:
        try:
            await self._run_attempt(job)
        finally:  # however the run ended (stored, failed, refused, cancelled, deleted): drop what it left
            await asyncio.to_thread(self._clean_up, job.id, job.attempt)

    async def _run_attempt(self, job: JobRecord) -> None:
        clock = StageClock()
        try:
            await self._pipeline(job, clock)
        except Superseded as superseded:  # cancelled, or a newer run owns the job: record nothing
            logger.info("job %s: %s; this run stops", job.id, superseded)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # cancelled by its user, or this scheduler is stopping
                logger.info("job %s cancelled while running", job.id)
                record_job_finished(job, "cancelled")
                # The GPU time of the stage it was in counts against the project's quota (a stopping
                # scheduler's jobs are requeued, not finished: add_gpu_seconds leaves those alone).
                await asyncio.to_thread(self.store.add_gpu_seconds, job.id, clock.open_seconds())
                return
            # Raised inside: a stage call was cancelled under it (a replica shutting down); never fail the
            # job for that.
            await self._requeue(job, "a stage call was cancelled")
        except ContentBlocked as error:  # the Finisher refused the clip: final, never retried
            blocked = getattr(error, "cause", error)  # Ray wraps the replica's exception
            logger.info("job %s: clip blocked by the content policy (%s)", job.id, blocked.category)
            if await asyncio.to_thread(self.store.fail, job.id, job.attempt, "content_blocked", str(blocked)):
                record_job_finished(job, "failed")
        except REPLICA_LOST as error:
            await self._requeue(job, f"lost a replica ({error})")
        except StageFailed:
            record_job_finished(job, "failed")  # the store has the code and the message already
        except Exception as error:
            logger.exception("job %s failed", job.id)
            failed = await asyncio.to_thread(
                self.store.fail, job.id, job.attempt, "pipeline_error", describe(error)
            )
            if failed:
                record_job_finished(job, "failed")

    async def _requeue(self, job: JobRecord, why: str) -> None:
        logger.warning("job %s %s; it goes back to the queue", job.id, why)
        status = await asyncio.to_thread(
            self.store.requeue, job.id, job.attempt, max_attempts=self.args.max_attempts
        )
        if status == JobStatus.FAILED:
            record_job_finished(job, "failed")

    async def _pipeline(self, job: JobRecord, clock: StageClock) -> None:
        resolved, finish = job.request.resolved, job.request.finish
        stages = self.stages
        timings: dict[str, float] = {}

        await self._advance(job, JobStatus.ENCODING, 0.0)
        started = time.perf_counter()
        prompt, negative = await asyncio.gather(
            stage_call(stages.text_encoder.encode.remote(resolved.prompt)),
            stage_call(stages.text_encoder.encode.remote(resolved.negative_prompt)),
        )
        timings["encode"] = time.perf_counter() - started

        state = pack_state(initial_state(resolved, self.model))
        bucket = str(job.request.bucket)
        eta_key = (bucket, resolved.quality, finish.upscale)
        adapters = resolved.adapters(self.model)
        experts = [
            (JobStatus.DENOISING_HIGH, stages.high, resolved.guidance_high, "denoise_high"),
            (JobStatus.DENOISING_LOW, stages.low, resolved.guidance_low, "denoise_low"),
        ]
        resumed = await self._resume(job, resolved.steps)
        if resumed is not None:  # an earlier attempt got past the high-noise expert
            state, experts = resumed, experts[1:]
        for status, handle, guidance, name in experts:
            await self._advance(job, status, 0.0, timings)
            call = DenoiseCall(
                request_id=f"{job.id}:{job.attempt}",
                state=state,
                prompt=prompt,
                negative_prompt=negative,
                guidance=guidance,
                priority=job.priority,
                deadline=job.deadline,
                quality=resolved.quality,
                adapters=adapters,
                cache=resolved.cache,
            )
            start_index = state.step_index
            stream = handle.options(stream=True).denoise.remote(call, bucket=bucket)
            try:
                async for event in stream:
                    match event:
                        case DenoiseWaiting(num_ahead=num_ahead):  # queued in the engine, not stalled
                            await self._advance(job, status, 0.0, engine_queue_position=num_ahead)
                        case DenoiseProgress(done=done, total=total, seconds_per_step=seconds):
                            if done == 1:  # stepping began (before, the request waited in the engine)
                                clock.begin()
                            eta_at = None
                            if seconds is not None:
                                steps_left = resolved.steps - (start_index + done)
                                eta_at = self._eta.predict(
                                    eta_key, steps_left=steps_left, seconds_per_step=seconds
                                )
                            await self._advance(job, status, done / max(total, 1), eta_at=eta_at)
                        case DenoiseDone():
                            state, timings[name] = event.state, event.seconds
                            clock.end()
            except BaseException:
                # Cancelled, superseded or failed before the expert's last step: take the request out of
                # the replica's engine now. Leaving the stream does not cancel it: the engine would keep
                # stepping an orphan (Ray Serve 2.60 cancels a call only through `cancel()`).
                stream.cancel()
                raise
            if status == JobStatus.DENOISING_HIGH:
                await self._checkpoint(job, state)

        await self._advance(job, JobStatus.DECODING, 0.0, timings)
        clock.begin()
        frames = await stage_call(stages.vae.decode.remote(state.latents, resolved.fps))
        timings["decode"] = frames.seconds
        self._eta.observe(eta_key, "decode", frames.seconds)
        clock.end()

        await self._advance(job, JobStatus.UPSCALING, 0.0, timings)
        width, height = upscale_target_size(finish.upscale, resolved.width, resolved.height)
        clock.begin()
        frames = await stage_call(stages.upscaler.upscale.remote(frames, width, height))
        timings["upscale"] = frames.seconds
        self._eta.observe(eta_key, "upscale", frames.seconds)
        clock.end()

        await self._advance(job, JobStatus.FINISHING, 0.0, timings)
        clip = await self._finish(
            job,
            frames,
            FinishCall(
                project=job.project,
                job_id=job.id,
                attempt=job.attempt,
                seed=resolved.seed,
                look=finish.look,
                label=finish.label,
                fps=finish.fps,
                lut=finish.lut,
                metadata={
                    "title": resolved.prompt[:200],
                    "previz_job": job.id,
                    "previz_seed": str(resolved.seed),
                },
            ),
        )
        timings["finish"] = clip.seconds
        self._eta.observe(eta_key, "finish", clip.seconds)
        succeeded = await asyncio.to_thread(
            self.store.succeed,
            job.id,
            job.attempt,
            artifact_uri=clip.key,
            artifact_bytes=clip.size_bytes,
            poster_uri=clip.poster_key,
            seed=resolved.seed,
            timings=timings,
        )
        if succeeded:
            record_job_finished(job, "succeeded", timings)

    async def _finish(self, job: JobRecord, frames: FrameBatch, call: FinishCall) -> FinishedClip:
        """The Finisher's clip, retried with backoff; after `finish_attempts` tries the job fails."""
        return await finish_with_retries(
            lambda: stage_call(self.stages.finisher.finish.remote(frames, call)),
            self.store,
            job,
            attempts=self.args.finish_attempts,
            base_s=self.args.finish_retry_base_s,
        )

    async def _resume(self, job: JobRecord, num_steps: int) -> PackedState | None:
        """The state an earlier attempt saved at the expert boundary, or None: start from scratch."""
        if job.checkpoint_uri is None:
            return None
        try:
            state = await asyncio.to_thread(read_checkpoint, self.artifacts, job.checkpoint_uri, num_steps)
        except CheckpointError as error:
            logger.warning("job %s starts from scratch: %s", job.id, error)
            return None
        data = {
            "message": "resumed from checkpoint",
            "uri": job.checkpoint_uri,
            "step_index": state.step_index,
        }
        await asyncio.to_thread(self.store.log_event, job.id, job.attempt, "resumed", data)
        logger.info("job %s attempt %d resumed from checkpoint %s", job.id, job.attempt, job.checkpoint_uri)
        return state

    async def _checkpoint(self, job: JobRecord, state: PackedState) -> None:
        """Save the state at the expert boundary, so that a rerun skips the high-noise expert (best effort:
        without it a rerun starts from scratch)."""
        key = JobArtifacts(job.project, job.id).checkpoint
        try:
            await settled(asyncio.to_thread(write_checkpoint, self.artifacts, key, state))
        except StorageError as error:
            logger.warning("job %s: no checkpoint saved, a rerun starts from scratch: %s", job.id, error)
            return
        await asyncio.to_thread(
            self.store.save_checkpoint, job.id, job.attempt, key, step_index=state.step_index
        )

    def _clean_up(self, job_id: str, attempt: int | None = None) -> None:
        """Delete what nothing will read: a finished (or deleted) job's checkpoint, and the clip and poster
        of run `attempt` unless the job recorded them as its result (the run was cancelled, superseded or
        requeued, or its job deleted, after the Finisher stored them). A requeued job keeps its checkpoint
        for its next run. Deleted jobs are read too: a DELETE that lands before the run stops must not
        leave the run's files behind. Best effort: what fails here the orphan sweep removes later."""
        try:
            current = self.store.get(job_id, include_deleted=True)
            if current is None:
                return
            keys = JobArtifacts(current.project, current.id)
            garbage = [keys.checkpoint] if current.is_finished else []
            if attempt is not None and current.artifact_uri != keys.clip(attempt):
                garbage += [keys.clip(attempt), keys.poster(attempt)]
            for key in garbage:
                self.artifacts.delete(key)
            if current.is_finished and current.checkpoint_uri is not None:
                self.store.clear_checkpoint(job_id)
        except Exception:
            logger.warning("job %s: deleting the files its run left failed", job_id, exc_info=True)

    async def _report_forever(self) -> None:
        """Refresh the jobs and queue gauges from the store (the store, not memory, is the truth)."""
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            try:
                counts, unfinished = await asyncio.to_thread(self._snapshot)
                self._queue_reporter.publish(counts, unfinished)
            except Exception:
                logger.warning("refreshing queue metrics failed", exc_info=True)

    def _snapshot(self) -> tuple[dict[JobStatus, int], list[JobRecord]]:
        unfinished = self.store.queued(1000) + self.store.list(statuses=RUNNING_STATUSES, limit=1000)
        return self.store.count_by_status(), unfinished

    async def _advance(
        self,
        job: JobRecord,
        status: JobStatus,
        fraction: float,
        timings: dict[str, float] | None = None,
        *,
        engine_queue_position: int | None = None,
        eta_at: datetime | None = None,
    ) -> None:
        """Move the job on. Entering a stage with `timings` stores the last one (the stage just done), so the
        GPU seconds of a running job's finished stages count against its project's quota at once."""
        last = next(reversed(timings.items())) if timings else None
        ok = await asyncio.to_thread(
            self.store.advance,
            job.id,
            job.attempt,
            status,
            stage_progress=fraction,
            progress=overall_progress(status.stage_row.name, fraction),
            timing=last,
            engine_queue_position=engine_queue_position,
            eta_at=eta_at,
        )
        if not ok:  # cancelled, or this run was superseded: stop spending compute on it
            raise Superseded(job.id, job.attempt)
