"""The Scheduler's cut jobs: claim queued cuts, have a Finisher replica render each (streamed progress), and
record the outcome in the job store, fenced by the cut's attempt like a video's run.

- Progress: after each shot the replica stores, the cut's progress and ETA (the mean shot time so far
  times the shots left) are written; a write the store refuses (cancelled, or a newer run owns the cut)
  stops the run, which records nothing.
- A lost Finisher replica (REPLICA_LOST): the lost attempt's files are deleted and the cut goes back to
  the queue, a later attempt renders it again, so one cut remains; after `max_attempts` claims it fails
  with `too_many_attempts`.
- Cancel (`cancel`): the render call is cancelled on its replica (it stops at its next shot) and the
  files the run stored are deleted. A scheduler that stops leaves its cuts running in the store; the next
  one requeues them (`requeue_in_flight`) and deletes what their interrupted attempts stored (a failing
  store leaves it to the orphan sweep, serve.jobs.retention: a board's files other than its cut's).
- Failure: `take_deleted` when a take's clip is gone (its video was deleted after the cut was asked for),
  else `cut_failed`; what the run stored is deleted.
- Success: the cut becomes the board's in the transaction that finishes the job; the cut it replaced is
  deleted (serve.jobs.deletion, or the orphan sweep when the store fails).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from ray.serve.handle import DeploymentHandle

from serve.jobs import JobStore
from serve.jobs.cuts import STALE_RUN, CutJob
from serve.jobs.deletion import delete_keys_or_leave_to_sweep
from serve.jobs.models import utcnow
from serve.metrics import record_cut_finished
from serve.scheduling.faults import REPLICA_LOST, Superseded, describe
from serve.stages.payloads import CutCall, CutProgress, CutRendered
from serve.storage import ArtifactNotFoundError, ArtifactStore

logger = logging.getLogger("ray.serve")


class CutRunner:
    """The cut jobs one Scheduler runs: at most `max_in_flight` at once."""

    def __init__(
        self,
        store: JobStore,
        artifacts: ArtifactStore,
        finisher: DeploymentHandle,
        scheduler_id: str,
        *,
        max_in_flight: int,
        max_attempts: int,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.finisher = finisher
        self.scheduler_id = scheduler_id
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self._running: dict[str, asyncio.Task[None]] = {}  # cut id -> its run
        self._cancelled: set[str] = set()  # cut ids whose run was cancelled by `cancel` (not by a stop)

    def requeue_in_flight(self) -> list[str]:
        """At start: the cuts a previous scheduler left running go back to the queue (or fail after
        `max_attempts`), and what their interrupted attempts stored is deleted now rather than by the
        orphan sweep a day later (unless it is its board's cut); the ids of the cuts interrupted."""
        interrupted = self.store.requeue_cuts_in_flight(max_attempts=self.max_attempts)
        for cut in interrupted:
            self._drop_files(cut)
        return [cut.id for cut in interrupted]

    @property
    def in_flight(self) -> list[str]:
        return list(self._running)

    async def start(self) -> None:
        """Claim queued cuts, oldest first, while there is room."""
        room = self.max_in_flight - len(self._running)
        if room <= 0:
            return
        for cut_id in await asyncio.to_thread(self.store.queued_cuts, room):
            cut = await asyncio.to_thread(self.store.claim_cut, cut_id, self.scheduler_id)
            if cut is None:  # cancelled meanwhile
                continue
            task = asyncio.get_running_loop().create_task(self._run(cut))
            self._running[cut.id] = task
            task.add_done_callback(lambda _t, cut_id=cut.id: self._running.pop(cut_id, None))

    async def settle(self) -> None:
        """Wait until the cuts running now have ended (however they end)."""
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    def cancel(self, cut_id: str) -> bool:
        """Stop the cut's run (the store marks it cancelled already); False when none runs here."""
        task = self._running.get(cut_id)
        if task is None:
            return False
        self._cancelled.add(cut_id)
        task.cancel()
        return True

    async def _run(self, cut: CutJob) -> None:
        """Render the cut and record how its run ended (the store, the cuts-by-outcome metric)."""
        render_seconds = None
        try:
            outcome, render_seconds = await self._render(cut)
        except Superseded as superseded:
            logger.info("cut %s: %s; this run stops", cut.id, superseded)
            await self._drop_files_unless_served(cut)
            now = await asyncio.to_thread(self.store.get_cut, cut.id)
            outcome = "cancelled" if now is not None and now.status == "cancelled" else "superseded"
        except asyncio.CancelledError:
            if cut.id in self._cancelled:
                self._cancelled.discard(cut.id)
                logger.info("cut %s cancelled while rendering", cut.id)
                await self._drop_files_unless_served(cut)
                record_cut_finished(cut.project, "cancelled")
                return
            raise  # the scheduler is stopping: its successor requeues the cut
        except REPLICA_LOST as error:
            logger.warning("cut %s lost its Finisher replica (%s); it goes back to the queue", cut.id, error)
            status = await asyncio.to_thread(
                self.store.requeue_cut, cut.id, cut.attempt, max_attempts=self.max_attempts
            )
            outcome = {"queued": "requeued", "failed": "failed"}.get(status or "", "superseded")
            await self._drop_files_unless_served(cut)
        except ArtifactNotFoundError as error:  # a take's clip went with its video before it was read
            message = f"a take of the cut was deleted before it rendered: {error}"
            failed = await asyncio.to_thread(
                self.store.fail_cut, cut.id, cut.attempt, "take_deleted", message
            )
            outcome = "failed" if failed else "superseded"
            await self._drop_files_unless_served(cut)
        except Exception as error:
            logger.exception("cut %s failed", cut.id)
            failed = await asyncio.to_thread(
                self.store.fail_cut, cut.id, cut.attempt, "cut_failed", describe(error)
            )
            outcome = "failed" if failed else "superseded"
            await self._drop_files_unless_served(cut)
        record_cut_finished(cut.project, outcome, render_seconds)

    async def _render(self, cut: CutJob) -> tuple[str, float | None]:
        """Run the render and record its cut; (how the run ended, the render's seconds when recorded)."""
        call = CutCall(cut.id, cut.attempt, cut.project, cut.storyboard_id, cut.request)
        stream = self.finisher.options(stream=True).render_cut.remote(call)
        try:
            async for event in stream:
                match event:
                    case CutProgress(done=done, total=total, seconds=seconds):
                        eta_at = utcnow() + timedelta(seconds=seconds / done * (total - done) if done else 0)
                        advanced = await asyncio.to_thread(
                            self.store.advance_cut, cut.id, cut.attempt, progress=done / total, eta_at=eta_at
                        )
                        if not advanced:
                            raise Superseded(cut.id, cut.attempt)
                    case CutRendered(cut=record, seconds=seconds):
                        outcome = await asyncio.to_thread(self.store.succeed_cut, cut.id, cut.attempt, record)
                        if not outcome.stored:
                            logger.info(
                                "cut %s rendered in %.1f s, not recorded: %s",
                                cut.id,
                                seconds,
                                outcome.refused,
                            )
                            await self._drop_files_unless_served(cut)
                            # the store failed it (`take_deleted`), unless another run or a cancel ended it
                            return ("superseded" if outcome.refused == STALE_RUN else "failed"), None
                        logger.info("cut %s rendered in %.1f s", cut.id, seconds)
                        if outcome.replaced is not None:
                            await asyncio.to_thread(
                                delete_keys_or_leave_to_sweep,
                                self.artifacts,
                                outcome.replaced.keys,
                                "a replaced cut",
                            )
                        return "succeeded", seconds
        except BaseException:
            stream.cancel()  # out of the replica too: the render stops at its next shot
            raise
        raise RuntimeError(f"the render of cut {cut.id} ended without its cut")

    async def _drop_files_unless_served(self, cut: CutJob) -> None:
        await asyncio.to_thread(self._drop_files, cut)

    def _drop_files(self, cut: CutJob) -> None:
        """Delete what this attempt stored, unless it is the board's cut (its files are named by attempt,
        so a stale attempt's files go while the attempt that was recorded keeps its own)."""
        board = self.store.get_storyboard(cut.storyboard_id)
        if board is not None and board.cut is not None and board.cut.key in cut.keys:
            return
        delete_keys_or_leave_to_sweep(self.artifacts, cut.keys, f"cut {cut.id}")
