"""One attempt of one job through its stage plan: the bookkeeping the Scheduler's pipeline would drown in.

An `AttemptRun` moves the job from stage to stage in the store (status, overall progress from the stage
table, the timing of the stage just done so its GPU seconds count at once), clocks the accelerator stage
the attempt is in (a cancel bills the part that ran), keeps the stage timings and feeds the ETA model.
Denoise progress is written at a bounded rate: the first step (it clears the engine queue position), the
last one, and otherwise at most once per `progress_interval_s`.

Every store update is fenced by the attempt: one the store refuses (the job was cancelled, or a newer
run owns it) raises `Superseded`, and the run stops spending compute on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from pipeline.stages import Stage, job_plan, overall_progress, stage
from serve.jobs import JobRecord, JobStatus, JobStore
from serve.scheduling.eta import AFTER_DENOISE, AFTER_ENCODE, EtaModel
from serve.scheduling.faults import Superseded
from serve.stages.payloads import DenoiseWaiting, FinishedClip
from serve.stages.turns import StageWaiting

logger = logging.getLogger("ray.serve")


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


class AttemptRun:
    """The bookkeeping of one attempt: enter a stage, report its progress, record its timing, succeed."""

    def __init__(self, job: JobRecord, store: JobStore, eta: EtaModel, *, progress_interval_s: float) -> None:
        self.job = job
        self.store = store
        self.eta = eta
        self.progress_interval_s = progress_interval_s
        self.clock = StageClock()
        self.timings: dict[str, float] = {}  # stage name -> seconds its replica reports, in run order
        request = job.request
        self.eta_key = (str(request.bucket), request.resolved.quality, request.finish.upscale)
        self._stage: Stage | None = None
        # the rows this job runs (an I2V job's keyframe encode too): its overall progress spreads over them
        self.plan = job_plan(has=frozenset({"keyframes"}) if request.keyframes is not None else frozenset())
        self._last_progress_write = -float("inf")  # time.monotonic() of the last step progress stored
        self.num_progress_writes = 0  # step progress updates stored (bounded by progress_interval_s)
        self.checkpoint: asyncio.Task[None] | None = None  # recording the expert-boundary checkpoint
        self._encoded_at: float | None = None  # time.perf_counter() when its embeddings came

    async def enter(self, name: str) -> None:
        """Move the job into stage `name`; the timing of the stage just done is stored with it."""
        self._stage = stage(name)
        self.clock.end()
        await self._advance(0.0, timing=next(reversed(self.timings.items()), None))

    @contextlib.asynccontextmanager
    async def clocked(self) -> AsyncIterator[None]:
        """The accelerator is working for this attempt inside the block. A block left by an exception (a
        cancel) leaves the clock open, so that the cancel can bill the part that ran."""
        self.clock.begin()
        yield
        self.clock.end()

    def record(self, name: str, seconds: float, *, observe: bool = True) -> None:
        """Stage `name` took `seconds` (as its replica measured); `observe` feeds the ETA of later jobs."""
        self.timings[name] = seconds
        if name == "encode":  # the rest of the job is timed from here (AFTER_ENCODE, on success)
            self._encoded_at = time.perf_counter()
        if observe:
            self.eta.observe(self.eta_key, name, seconds)

    async def waiting(self, num_ahead: int, seconds_left: float | None = None) -> None:
        """The request waits in its stage's replica (the text encoder's, the decoder's or the upscaler's
        line; a denoiser engine's wait is `waiting_to_denoise`) with `num_ahead` calls before it; 0: its
        turn came. A wait after the denoiser re-predicts the ETA with the wait in it: the calls ahead and
        this one at the stage's measured time, then the stages after it. A wait for the text encoder is
        predicted from `seconds_left` (the encoder's forwards until its embeddings) and the rest of the job
        as measured; with either not measured yet, no prediction."""
        eta_at = None
        if self._stage is not None and self._stage.name in AFTER_DENOISE:
            eta_at = self.eta.predict_from(self.eta_key, self._stage.name, num_ahead=num_ahead)
        elif self._stage is not None and self._stage.name == "encode" and seconds_left is not None:
            eta_at = self.eta.predict_encode_wait(self.eta_key, seconds_left=seconds_left)
        await self._advance(0.0, engine_queue_position=num_ahead or None, eta_at=eta_at)

    async def waiting_to_denoise(self, waiting: DenoiseWaiting, *, steps_left: int) -> None:
        """The request waits in a denoiser engine for its first step, `steps_left` steps of the job still to
        run: the place is stored, and the ETA re-predicted from the engine's counts and measurements (the
        work queued ahead of it, then its steps at the bucket's step time, then the later stages); with
        nothing measured there yet, the last prediction stands (none: the page says nothing is measured)."""
        eta_at = None
        if waiting.seconds_ahead is not None and waiting.seconds_per_step is not None:
            eta_at = self.eta.predict(
                self.eta_key,
                steps_left=steps_left,
                seconds_per_step=waiting.seconds_per_step,
                wait_s=waiting.seconds_ahead,
            )
        await self._advance(0.0, engine_queue_position=waiting.num_ahead or None, eta_at=eta_at)

    async def stage_result(self, stream: Any) -> Any:
        """The result of a streamed one-at-a-time stage call (decode, upscale), storing the call's place in
        its replica's line as it streams it (serve.stages.turns). When the job's task is cancelled, or the
        stream fails, the call is cancelled on its replica too."""
        try:
            async for event in stream:
                if isinstance(event, StageWaiting):
                    await self.waiting(event.num_ahead, event.seconds_left)
                else:
                    return event
        except BaseException:
            stream.cancel()
            raise
        raise RuntimeError(
            f"the {self._stage.name if self._stage else ''} call of job {self.job.id} ended without a result"
        )

    async def stepped(
        self, done: int, total: int, *, steps_left: int, seconds_per_step: float | None
    ) -> None:
        """A denoiser finished step `done` of `total` of this call; `steps_left` in the whole job."""
        if done == 1:  # stepping began (before, the request waited in the engine)
            self.clock.begin()
        now = time.monotonic()
        due = done in (1, total) or now - self._last_progress_write >= self.progress_interval_s
        if not due:
            return
        self._last_progress_write = now
        self.num_progress_writes += 1
        eta_at = None
        if seconds_per_step is not None:
            eta_at = self.eta.predict(self.eta_key, steps_left=steps_left, seconds_per_step=seconds_per_step)
        await self._advance(done / max(total, 1), eta_at=eta_at)

    async def settle_checkpoint(self, timeout_s: float = 60.0) -> None:
        """Wait (up to `timeout_s`) for the checkpoint in flight to be recorded: a requeue must find it, and
        the run's clean-up must come after its file. Its failure only costs a rerun the shortcut."""
        task, self.checkpoint = self.checkpoint, None  # settled once: a second call returns at once
        if task is None or task.cancelled():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except asyncio.CancelledError:
            if not task.done():  # the run was cancelled while waiting, not the recording: settle it later
                self.checkpoint = task
            raise
        except TimeoutError:
            task.cancel()
            logger.warning(
                "job %s: its checkpoint took over %.0f s; a rerun starts over", self.job.id, timeout_s
            )
        except Exception:
            logger.warning("job %s: recording its checkpoint failed", self.job.id, exc_info=True)

    async def succeed(self, clip: FinishedClip) -> bool:
        """Record the stored clip as the job's result; False if the store refused (cancelled meanwhile).
        The time from its embeddings to here feeds the ETA of jobs waiting for the text encoder."""
        ok = await asyncio.to_thread(
            self.store.succeed,
            self.job.id,
            self.job.attempt,
            artifact_uri=clip.key,
            artifact_bytes=clip.size_bytes,
            poster_uri=clip.poster_key,
            seed=self.job.request.resolved.seed,
            timings=self.timings,
        )
        if ok and self._encoded_at is not None:
            self.eta.observe(self.eta_key, AFTER_ENCODE, time.perf_counter() - self._encoded_at)
        return ok

    async def _advance(
        self,
        fraction: float,
        *,
        timing: tuple[str, float] | None = None,
        engine_queue_position: int | None = None,
        eta_at: datetime | None = None,
    ) -> None:
        if self._stage is None:
            raise RuntimeError("AttemptRun.enter() names the stage before any progress is reported.")
        ok = await asyncio.to_thread(
            self.store.advance,
            self.job.id,
            self.job.attempt,
            JobStatus[self._stage.status_name],
            stage_progress=fraction,
            progress=overall_progress(self._stage.name, fraction, self.plan),
            timing=timing,
            engine_queue_position=engine_queue_position,
            eta_at=eta_at,
        )
        if not ok:  # cancelled, or this run was superseded: stop spending compute on it
            raise Superseded(self.job.id, self.job.attempt)
