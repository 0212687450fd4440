"""How a job moves once created: claimed by a scheduler, advanced through its stages, finished (succeeded,
failed, cancelled: each queues the job's webhook in the same transaction), requeued, deleted.

Fencing: `attempt` counts claims. A pipeline task carries the attempt it was started under; once its job
is requeued (scheduler restart) or claimed again, the task's updates no longer match and are ignored
(the methods return False), so a task of an old scheduler incarnation never overwrites a newer run.
"""

from __future__ import annotations

import builtins
import logging
import math
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Connection, func, select, update

from serve.jobs.database import Database
from serve.jobs.models import (
    PROGRESS_BANDS,
    RUNNING_STATUSES,
    CancelResult,
    EventKind,
    JobRecord,
    JobStatus,
    utcnow,
)
from serve.jobs.outbox import Outbox
from serve.jobs.projects import gpu_seconds
from serve.jobs.rows import fence, job_record, log_event, status_name
from serve.jobs.schema import jobs

logger = logging.getLogger(__name__)


class JobTransitions:
    """The state changes of jobs (one transaction each, fenced by attempt where a pipeline task calls)."""

    def __init__(self, db: Database, outbox: Outbox) -> None:
        self._db = db
        self._outbox = outbox

    def claim(self, job_id: str, scheduler_id: str) -> JobRecord | None:
        """Start a queued job: QUEUED -> ENCODING, `attempt` + 1, `claimed_by` = `scheduler_id`,
        `started_at` set on the first claim. None if it is not queued any more (another scheduler took it,
        or it was cancelled) or does not exist. Run the pipeline with the returned record's `attempt`."""
        now = utcnow()
        with self._db.write() as conn:
            row = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status == JobStatus.QUEUED)
                .values(
                    status=JobStatus.ENCODING,
                    attempt=jobs.c.attempt + 1,
                    claimed_by=scheduler_id,
                    started_at=func.coalesce(jobs.c.started_at, now),
                    updated_at=now,
                    stage_progress=0.0,
                    progress=0,
                    engine_queue_position=None,
                    eta_at=None,  # predicted afresh from this run's steps
                )
                .returning(jobs)
            ).one_or_none()
            if row is None:
                return None
            log_event(conn, job_id, "claimed", {"scheduler_id": scheduler_id, "attempt": row.attempt}, now)
        return job_record(row)

    def advance(
        self,
        job_id: str,
        attempt: int,
        status: JobStatus,
        *,
        stage_progress: float = 0.0,
        progress: int | None = None,
        timing: tuple[str, float] | None = None,
        engine_queue_position: int | None = None,
        eta_at: datetime | None = None,
    ) -> bool:
        """Report where a running job is: its (running) `status`, `stage_progress` 0..1 within that stage,
        and the overall `progress` 0..100 (default: derived from PROGRESS_BANDS). `timing` =
        (stage, seconds) is recorded in `timings`. `engine_queue_position`: the requests ahead of it while
        it waits in the stage's engine for its first step (None, the default, once it runs). `eta_at`: when
        the job is now predicted to finish (None keeps the last prediction).

        Returns False and changes nothing when the update is stale or late: `attempt` is not the job's
        current attempt, the job is not running (queued again, or finished: cancelled in the meantime,
        for instance: stop working on it), or `status` is behind the job's status. Overall progress never
        goes down. Writes a "stage" event when the status changes and a "progress" event only when the
        progress crosses a multiple of 10, so per-step updates do not flood the log.
        """
        status = JobStatus(status)
        if not status.is_running:
            raise ValueError(
                f"advance() moves a job between running stages (ENCODING..FINISHING) but got {status.name}; "
                "use succeed(), fail() or cancel() to finish a job."
            )
        if not 0.0 <= stage_progress <= 1.0:
            raise ValueError(f"`stage_progress` must be within 0..1 but is {stage_progress}.")
        if progress is not None and not 0 <= progress <= 100:
            raise ValueError(f"`progress` must be within 0..100 but is {progress}.")
        if engine_queue_position is not None and engine_queue_position < 0:
            raise ValueError(f"`engine_queue_position` must be >= 0 but is {engine_queue_position}.")
        if progress is None:
            start, end = PROGRESS_BANDS[status]
            progress = int(start + stage_progress * (end - start))
        now = utcnow()
        fenced = fence(job_id, attempt), jobs.c.status <= status
        with self._db.write() as conn:
            current = conn.execute(
                select(jobs.c.status, jobs.c.progress, jobs.c.timings).where(*fenced).with_for_update()
            ).one_or_none()
            if current is None:
                return False
            progress = max(progress, current.progress)
            values: dict[str, Any] = {
                "status": status,
                "stage_progress": stage_progress,
                "progress": progress,
                "engine_queue_position": engine_queue_position,
                "updated_at": now,
            }
            if timing is not None:
                values["timings"] = {**current.timings, timing[0]: float(timing[1])}
            if eta_at is not None:
                values["eta_at"] = eta_at
            conn.execute(update(jobs).where(*fenced).values(values))
            if status != current.status:
                stage = {
                    "status": status_name(status),
                    "from": status_name(current.status),
                    "attempt": attempt,
                }
                log_event(conn, job_id, "stage", {**stage, "progress": progress}, now)
            elif progress // 10 > current.progress // 10:
                data = {"status": status_name(status), "progress": progress, "stage_progress": stage_progress}
                log_event(conn, job_id, "progress", data, now)
        return True

    def succeed(
        self,
        job_id: str,
        attempt: int,
        *,
        artifact_uri: str,
        artifact_bytes: int,
        poster_uri: str | None = None,
        seed: int | None = None,
        timings: dict[str, float] | None = None,
    ) -> bool:
        """Finish a running job with its stored clip: SUCCEEDED, progress 100, `timings` merged into the
        recorded ones. False (nothing changed) if `attempt` is stale or the job is not running."""
        now = utcnow()
        with self._db.write() as conn:
            current = conn.execute(
                select(jobs.c.timings).where(fence(job_id, attempt)).with_for_update()
            ).one_or_none()
            if current is None:
                return False
            values: dict[str, Any] = {
                "status": JobStatus.SUCCEEDED,
                "stage_progress": 1.0,
                "progress": 100,
                "finished_at": now,
                "updated_at": now,
                "artifact_uri": artifact_uri,
                "artifact_bytes": artifact_bytes,
                "poster_uri": poster_uri,
                "timings": {**current.timings, **(timings or {})},
            }
            values["gpu_seconds"] = gpu_seconds(values["timings"])
            if seed is not None:
                values["seed"] = seed
            row = conn.execute(
                update(jobs).where(fence(job_id, attempt)).values(values).returning(jobs)
            ).one()
            data = {"attempt": attempt, "artifact_uri": artifact_uri, "artifact_bytes": artifact_bytes}
            log_event(conn, job_id, "succeeded", data, now)
            self._outbox.enqueue(conn, job_record(row), now)
        return True

    def fail(self, job_id: str, attempt: int, code: str, message: str) -> bool:
        """Finish a running job as FAILED with a machine-readable `code` and a human `message`.
        False (nothing changed) if `attempt` is stale or the job is not running. To fail a queued job
        (e.g. its deadline passed), claim it first."""
        now = utcnow()
        with self._db.write() as conn:
            timings = conn.scalar(select(jobs.c.timings).where(fence(job_id, attempt)).with_for_update())
            row = conn.execute(
                update(jobs)
                .where(fence(job_id, attempt))
                .values(
                    status=JobStatus.FAILED,
                    gpu_seconds=gpu_seconds(timings or {}),
                    finished_at=now,
                    updated_at=now,
                    error_code=code,
                    error_message=message,
                )
                .returning(jobs)
            ).one_or_none()
            if row is not None:
                log_event(conn, job_id, "failed", {"attempt": attempt, "code": code, "message": message}, now)
                self._outbox.enqueue(conn, job_record(row), now)
        return row is not None

    def cancel(self, job_id: str, *, project: str | None = None) -> CancelResult:
        """Cancel a queued or running job (a running job's pipeline notices: its next advance() returns
        False). With `project`, another project's job is NOT_FOUND. A finished job stays as it is."""
        now = utcnow()
        query = select(jobs.c.status, jobs.c.timings).where(jobs.c.id == job_id)
        if project is not None:
            query = query.where(jobs.c.project == project)
        with self._db.write() as conn:
            current = conn.execute(query.with_for_update()).one_or_none()
            if current is None:
                return CancelResult.NOT_FOUND
            if current.status.is_finished:
                return CancelResult.ALREADY_FINISHED
            row = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status < JobStatus.SUCCEEDED)
                .values(
                    status=JobStatus.CANCELLED,
                    gpu_seconds=gpu_seconds(current.timings or {}),  # the stages it completed count
                    finished_at=now,
                    updated_at=now,
                )
                .returning(jobs)
            ).one()
            log_event(conn, job_id, "cancelled", {"from": status_name(current.status)}, now)
            self._outbox.enqueue(conn, job_record(row), now)
        return CancelResult.CANCELLED

    def add_gpu_seconds(self, job_id: str, seconds: float) -> bool:
        """Count `seconds` more accelerator time on a finished job: the part of a stage that ran before the
        job was cancelled under it. False if the job is not finished."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"`seconds` must be a finite number >= 0 but is {seconds!r}.")
        with self._db.write() as conn:
            result = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status >= JobStatus.SUCCEEDED)
                .values(gpu_seconds=func.coalesce(jobs.c.gpu_seconds, 0.0) + seconds)
            )
        return result.rowcount == 1

    def mark_deleted(
        self, job_id: str, *, project: str, reason: Literal["deleted", "expired"] = "deleted"
    ) -> JobRecord | None:
        """Hide a finished job of `project` for good (its artifacts are the caller's to remove first) and
        forget its artifact keys; the job as it was, or None when there is no such finished job. `reason`:
        its user deleted it, or its project's retention did."""
        now = utcnow()
        with self._db.write() as conn:
            current = conn.execute(
                select(jobs)
                .where(jobs.c.id == job_id, jobs.c.project == project, jobs.c.deleted_at.is_(None))
                .with_for_update()
            ).one_or_none()
            if current is None or not current.status.is_finished:
                return None
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(deleted_at=now, updated_at=now, artifact_uri=None, poster_uri=None)
            )
            log_event(conn, job_id, "deleted", {"status": status_name(current.status), "reason": reason}, now)
        return job_record(current)

    def requeue(self, job_id: str, attempt: int, *, max_attempts: int = 3) -> JobStatus | None:
        """Give one running job back to the queue, e.g. when its pipeline lost a replica: as in
        requeue_in_flight(), it fails instead with "too_many_attempts" once claimed `max_attempts` times.

        Fenced like advance(): returns the job's new status (QUEUED or FAILED), or None and changes
        nothing if `attempt` is stale or the job is not running.
        """
        _check_max_attempts(max_attempts)
        query = select(jobs.c.id, jobs.c.status, jobs.c.attempt, jobs.c.claimed_by).where(
            fence(job_id, attempt)
        )
        with self._db.write() as conn:
            job = conn.execute(query.with_for_update()).one_or_none()
            return None if job is None else self._requeue_or_fail(conn, job, max_attempts, utcnow())

    def save_checkpoint(self, job_id: str, attempt: int, uri: str, *, step_index: int) -> bool:
        """Record where the running job's denoise state at the expert boundary is stored (`uri`, a key
        of the artifact store): a later attempt resumes from it. Writes a "checkpoint" event.
        Fenced like advance(): False and nothing changed if `attempt` is stale or the job is not running."""
        now = utcnow()
        with self._db.write() as conn:
            done = conn.execute(
                update(jobs).where(fence(job_id, attempt)).values(checkpoint_uri=uri, updated_at=now)
            ).rowcount
            if done:
                data = {"attempt": attempt, "uri": uri, "step_index": step_index}
                log_event(conn, job_id, "checkpoint", data, now)
        return bool(done)

    def clear_checkpoint(self, job_id: str) -> None:
        """Forget the job's checkpoint (once its clip is stored, or when it cannot be read)."""
        with self._db.write() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(checkpoint_uri=None))

    def log_event(self, job_id: str, attempt: int, kind: EventKind, data: dict[str, Any]) -> bool:
        """Add an event ("resumed", "retry", ...) to a running job's log, fenced like advance()."""
        now = utcnow()
        with self._db.write() as conn:
            current = conn.execute(
                select(jobs.c.id).where(fence(job_id, attempt)).with_for_update()
            ).one_or_none()
            if current is None:
                return False
            log_event(conn, job_id, kind, {"attempt": attempt, **data}, now)
        return True

    def requeue_in_flight(
        self, scheduler_id: str | None = None, *, max_attempts: int = 3
    ) -> builtins.list[str]:
        """Recover after a scheduler (re)start: every running job (of `scheduler_id`, or of any scheduler)
        goes back to QUEUED with progress reset, keeping its `attempt` so that updates from the old
        pipeline tasks stay fenced off. A job already claimed `max_attempts` times fails instead with
        code "too_many_attempts" (logged; visible in its events). Queued and finished jobs are untouched.

        Returns the ids of the requeued jobs, oldest first.
        """
        _check_max_attempts(max_attempts)
        now = utcnow()
        query = select(jobs.c.id, jobs.c.status, jobs.c.attempt, jobs.c.claimed_by).where(
            jobs.c.status.in_(RUNNING_STATUSES)
        )
        if scheduler_id is not None:
            query = query.where(jobs.c.claimed_by == scheduler_id)
        with self._db.write() as conn:
            in_flight = conn.execute(query.order_by(jobs.c.id).with_for_update()).all()
            outcomes = {job.id: self._requeue_or_fail(conn, job, max_attempts, now) for job in in_flight}
        requeued = [job_id for job_id, status in outcomes.items() if status == JobStatus.QUEUED]
        if requeued:
            logger.info("requeued %d in-flight jobs: %s", len(requeued), ", ".join(requeued))
        return requeued

    def _requeue_or_fail(self, conn: Connection, job: Any, max_attempts: int, now: datetime) -> JobStatus:
        """Move one running job (`job`: id, status, attempt, claimed_by; locked by the caller) back to
        QUEUED, or to FAILED once it has been claimed `max_attempts` times. Returns the new status."""
        still_running = (jobs.c.id == job.id, jobs.c.status.in_(RUNNING_STATUSES))
        data = {"from": status_name(job.status), "attempt": job.attempt, "claimed_by": job.claimed_by}
        if job.attempt >= max_attempts:
            message = f"The job was interrupted on each of its {job.attempt} attempts."
            row = conn.execute(
                update(jobs)
                .where(*still_running)
                .values(
                    status=JobStatus.FAILED,
                    finished_at=now,
                    updated_at=now,
                    error_code="too_many_attempts",
                    error_message=message,
                )
                .returning(jobs)
            ).one()
            log_event(conn, job.id, "failed", {**data, "code": "too_many_attempts", "message": message}, now)
            self._outbox.enqueue(conn, job_record(row), now)
            logger.warning("job %s failed: interrupted on all %d attempts", job.id, job.attempt)
            return JobStatus.FAILED
        conn.execute(
            update(jobs)
            .where(*still_running)
            .values(status=JobStatus.QUEUED, claimed_by=None, stage_progress=0.0, progress=0, updated_at=now)
        )
        log_event(conn, job.id, "requeued", data, now)
        return JobStatus.QUEUED


def _check_max_attempts(max_attempts: int) -> None:
    if max_attempts < 1:
        raise ValueError(f"`max_attempts` must be >= 1 but is {max_attempts}.")
