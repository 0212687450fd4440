"""JobStore: every read and state change of jobs, one short transaction each (see the package docstring)."""

from __future__ import annotations

import builtins
import logging
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection, Engine, create_engine, event, func, insert, inspect, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from serve.auth import gpu_seconds, seconds_to_utc_midnight
from serve.jobs.luts import LutStoreMixin
from serve.jobs.models import (
    PRIORITIES,
    PROGRESS_BANDS,
    RUNNING_STATUSES,
    AlreadyPromoted,
    CancelResult,
    EventKind,
    GpuQuotaExceeded,
    JobEvent,
    JobRecord,
    JobStatus,
    Priority,
    QueueFull,
    new_job_id,
    utcnow,
)
from serve.jobs.outbox import (
    WebhookDelivery,
    claim_due,
    deliveries_of,
    enqueue_webhook,
    record_attempt,
    secret_of,
)
from serve.jobs.projects import ProjectStoreMixin, gpu_seconds_today, widen_role_check
from serve.jobs.request import JobRequest
from serve.jobs.schema import (
    ADDED_JOB_COLUMNS,
    ADDED_STORYBOARD_COLUMNS,
    QUEUE_LOCK_KEY,
    SCHEMA_LOCK_KEY,
    job_events,
    jobs,
    metadata,
    storyboards,
)
from serve.jobs.storyboard import CutRecord, StoryboardEdit, StoryboardRecord, StoryboardRequest

logger = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///previz-jobs.db"
DEFAULT_RETRY_AFTER_S = 30  # Retry-After when no job has finished yet to estimate from
MAX_RETRY_AFTER_S = 600
MAX_PAGE = 1000  # most rows one list()/queued()/events() call returns


class JobStore(ProjectStoreMixin, LutStoreMixin):
    """All reads and state changes of jobs. Thread-safe and multi-process-safe; holds only an engine."""

    def __init__(self, url: str = DEFAULT_URL, *, busy_timeout_s: float = 30.0) -> None:
        """Connect lazily to `url`: `sqlite:///path.db` (file; its folder is created) or
        `postgresql+psycopg://user@host/db` (`postgresql://` means psycopg 3 too).

        `busy_timeout_s`: how long a SQLite writer waits for another one before failing.
        """
        self._engine = _create_engine(url, busy_timeout_s)
        self.backend: Literal["sqlite", "postgresql"] = self._engine.dialect.name  # type: ignore[assignment]
        # Writers: SQLite takes the write lock at BEGIN, so a read-then-write transaction never fails
        # half-way with SQLITE_BUSY; readers use plain BEGIN (WAL readers do not block the writer).
        self._writer = self._engine.execution_options(previz_sqlite_begin="BEGIN IMMEDIATE")

    def create_schema(self) -> None:
        """Create the tables and indexes that do not exist yet, and add what a database of an earlier
        version lacks: nullable columns (ADDED_JOB_COLUMNS) and key roles. Idempotent, and safe when the
        Ingress and the Scheduler call it at the same time."""
        with self._write() as conn:
            if self.backend == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK_KEY)))
            metadata.create_all(conn)
            for table, added in ((jobs, ADDED_JOB_COLUMNS), (storyboards, ADDED_STORYBOARD_COLUMNS)):
                present = {column["name"] for column in inspect(conn).get_columns(table.name)}
                for name in added:
                    if name not in present:
                        kind = table.c[name].type.compile(dialect=conn.dialect)
                        conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {name} {kind}"))
            widen_role_check(conn)

    def close(self) -> None:
        """Close the pooled connections (the store can still be used afterwards: it reconnects)."""
        self._engine.dispose()

    # -- creating and reading ---------------------------------------------------------------------------

    def create(
        self,
        project: str,
        priority: Priority,
        request: JobRequest,
        *,
        idempotency_key: str | None = None,
        labels: dict[str, Any] | None = None,
        deadline: datetime | None = None,
        storyboard_id: str | None = None,
        max_queued: int | None = None,
        max_queued_per_project: int | None = None,
        gpu_seconds_per_day: float | None = None,
        promotes: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Queue a new job and return `(job, True)`. With `promotes` (a draft's id), the draft's
        `promoted_to` is set to the new job in the same transaction; AlreadyPromoted, and nothing written,
        when it was set already (two promotes of one take cannot both win).

        With an `idempotency_key` already used by this project, return `(existing job, False)` instead
        and write nothing (whatever the bounds say: a retried request is not a new job). Concurrent
        creates with the same key make one job: the unique (project, idempotency_key) constraint decides.

        `max_queued` bounds the QUEUED jobs of all projects, `max_queued_per_project` those of `project`;
        a create that would exceed either raises QueueFull and writes nothing. A bound holds against
        concurrent bounded creates (their count and insert are serialised); creates that pass no bound
        are not held back and can push the queue past it.
        """
        if priority not in PRIORITIES:
            raise ValueError(f"`priority` must be 'interactive' or 'batch' but is {priority!r}.")
        if not project:
            raise ValueError("`project` must be a non-empty string.")
        if deadline is not None and deadline.tzinfo is None:
            raise ValueError(f"`deadline` must be timezone-aware but is naive ({deadline.isoformat()}).")
        for name, bound in (("max_queued", max_queued), ("max_queued_per_project", max_queued_per_project)):
            if bound is not None and bound < 0:
                raise ValueError(f"`{name}` must be >= 0 but is {bound}.")
        now = utcnow()
        row = _new_job_row(project, priority, request, dict(labels or {}), now) | {
            "idempotency_key": idempotency_key,
            "deadline": deadline,
            "storyboard_id": storyboard_id,
        }
        try:
            with self._write() as conn:
                if idempotency_key is not None:
                    existing = _by_idempotency_key(conn, project, idempotency_key)
                    if existing is not None:
                        return existing, False
                self._check_room(
                    conn, project, 1, now, max_queued, max_queued_per_project, gpu_seconds_per_day
                )
                job = _record(conn.execute(insert(jobs).values(row).returning(jobs)).one())
                if storyboard_id is not None:  # a take added to a board later (a remix or a promote)
                    _count_board_job(conn, storyboard_id)
                _log_event(conn, job.id, "created", {"priority": priority, "bucket": job.bucket}, now)
                if promotes is not None:
                    _link_promotion(conn, promotes, job.id)
        except IntegrityError:
            # Lost a race on (project, idempotency_key): the winner's job is committed by now.
            if idempotency_key is None:
                raise
            with self._read() as conn:
                existing = _by_idempotency_key(conn, project, idempotency_key)
            if existing is None:
                raise
            return existing, False
        return job, True

    def get(
        self, job_id: str, *, project: str | None = None, include_deleted: bool = False
    ) -> JobRecord | None:
        """The job, or None; with `project`, a job of another project is None too (no existence leak).
        A deleted job is None, unless `include_deleted` (what cleans up after it needs its row)."""
        query = select(jobs).where(jobs.c.id == job_id)
        if not include_deleted:
            query = query.where(jobs.c.deleted_at.is_(None))
        if project is not None:
            query = query.where(jobs.c.project == project)
        with self._read() as conn:
            row = conn.execute(query).one_or_none()
        return None if row is None else _record(row)

    def list(
        self,
        *,
        project: str | None = None,
        statuses: Iterable[JobStatus] | None = None,
        storyboard_id: str | None = None,
        after: str | None = None,
        limit: int = 50,
        order: Literal["asc", "desc"] = "desc",
    ) -> builtins.list[JobRecord]:
        """One page of jobs ordered by id (= creation time), newest first by default.

        `after` is the cursor: the last id of the previous page; the next page holds the ids after it
        in `order`. Filters combine with AND; `statuses` is any collection of JobStatus.
        """
        if order not in ("asc", "desc"):
            raise ValueError(f"`order` must be 'asc' or 'desc' but is {order!r}.")
        _check_limit(limit)
        query = select(jobs).where(jobs.c.deleted_at.is_(None))
        if project is not None:
            query = query.where(jobs.c.project == project)
        if statuses is not None:
            query = query.where(jobs.c.status.in_([JobStatus(status) for status in statuses]))
        if storyboard_id is not None:
            query = query.where(jobs.c.storyboard_id == storyboard_id)
        if after is not None:
            query = query.where(jobs.c.id < after if order == "desc" else jobs.c.id > after)
        query = query.order_by(jobs.c.id.desc() if order == "desc" else jobs.c.id.asc()).limit(limit)
        with self._read() as conn:
            return [_record(row) for row in conn.execute(query)]

    def queue_position(self, job: JobRecord) -> int:
        """How many queued jobs are ahead of a queued `job`: every queued interactive job before a batch
        one, and the older ones of its own priority (what the Scheduler's pick looks at first)."""
        ahead = (jobs.c.priority == job.priority) & (jobs.c.id < job.id)
        if job.priority == "batch":
            ahead = ahead | (jobs.c.priority == "interactive")
        query = select(func.count()).select_from(jobs).where(jobs.c.status == JobStatus.QUEUED, ahead)
        with self._read() as conn:
            return int(conn.scalar(query) or 0)

    def queued(self, limit: int = 200) -> builtins.list[JobRecord]:
        """Queued jobs, oldest first: the scheduler's candidates (it applies priority and fair share)."""
        _check_limit(limit)
        query = select(jobs).where(jobs.c.status == JobStatus.QUEUED).order_by(jobs.c.id).limit(limit)
        with self._read() as conn:
            return [_record(row) for row in conn.execute(query)]

    def count_by_status(self, project: str | None = None) -> dict[JobStatus, int]:
        """Number of jobs in each status (every status present, zeros included), for metrics and quotas."""
        query = select(jobs.c.status, func.count()).group_by(jobs.c.status)
        if project is not None:
            query = query.where(jobs.c.project == project)
        counts = dict.fromkeys(JobStatus, 0)
        with self._read() as conn:
            counts.update({status: count for status, count in conn.execute(query)})
        return counts

    def running_by_project(self) -> dict[str, int]:
        """project -> number of jobs claimed and not finished (the fair-share input); idle projects absent."""
        query = (
            select(jobs.c.project, func.count())
            .where(jobs.c.status.in_(RUNNING_STATUSES))
            .group_by(jobs.c.project)
        )
        with self._read() as conn:
            return {project: count for project, count in conn.execute(query)}

    def events(self, job_id: str, *, after_id: int = 0, limit: int = MAX_PAGE) -> builtins.list[JobEvent]:
        """The job's events with id > `after_id`, oldest first (poll with the last id seen to stream)."""
        _check_limit(limit)
        query = (
            select(job_events)
            .where(job_events.c.job_id == job_id, job_events.c.id > after_id)
            .order_by(job_events.c.id)
            .limit(limit)
        )
        with self._read() as conn:
            return [JobEvent(**row._asdict()) for row in conn.execute(query)]

    # -- storyboards --------------------------------------------------------------------------------------

    def create_storyboard(
        self,
        storyboard_id: str,
        project: str,
        title: str | None,
        request: StoryboardRequest,
        videos: builtins.list[tuple[Priority, JobRequest, dict[str, Any]]],
        *,
        idempotency_key: str | None = None,
        max_queued: int | None = None,
        max_queued_per_project: int | None = None,
        gpu_seconds_per_day: float | None = None,
    ) -> tuple[StoryboardRecord, bool]:
        """Store a storyboard and queue all its `videos` (priority, request, labels) in ONE
        transaction, as jobs of `project` with this `storyboard_id`; return `(storyboard, True)`.

        All or nothing: when the jobs would push a queue past `max_queued` / `max_queued_per_project`,
        raise QueueFull and write nothing. An `idempotency_key` already used for a storyboard of this
        project returns `(existing storyboard, False)` and writes nothing.
        """
        if not videos:
            raise ValueError("A storyboard needs at least one video.")
        for priority, *_ in videos:
            if priority not in PRIORITIES:
                raise ValueError(f"`priority` must be 'interactive' or 'batch' but is {priority!r}.")
        now = utcnow()
        board = {
            "id": storyboard_id,
            "project": project,
            "title": title,
            "request": request.to_stored(),
            "num_jobs": len(videos),
            "idempotency_key": idempotency_key,
            "created_at": now,
        }
        try:
            with self._write() as conn:
                if idempotency_key is not None:
                    existing = _storyboard_by_idempotency_key(conn, project, idempotency_key)
                    if existing is not None:
                        return existing, False
                self._check_room(
                    conn, project, len(videos), now, max_queued, max_queued_per_project, gpu_seconds_per_day
                )
                record = StoryboardRecord.from_row(
                    conn.execute(insert(storyboards).values(board).returning(storyboards)).one()._asdict()
                )
                for priority, job_request, labels in videos:
                    row = _new_job_row(project, priority, job_request, labels, now)
                    conn.execute(insert(jobs).values({**row, "storyboard_id": storyboard_id}))
                    _log_event(
                        conn, row["id"], "created", {"priority": priority, "bucket": row["bucket"]}, now
                    )
        except IntegrityError:
            if idempotency_key is None:
                raise
            with self._read() as conn:
                existing = _storyboard_by_idempotency_key(conn, project, idempotency_key)
            if existing is None:
                raise
            return existing, False
        return record, True

    def list_storyboards(
        self, project: str, *, after: str | None = None, limit: int = 50
    ) -> builtins.list[StoryboardRecord]:
        """One page of the project's storyboards, newest first; `after`: the last id of the previous page."""
        _check_limit(limit)
        query = select(storyboards).where(storyboards.c.project == project)
        if after is not None:
            query = query.where(storyboards.c.id < after)
        query = query.order_by(storyboards.c.id.desc()).limit(limit)
        with self._read() as conn:
            return [StoryboardRecord.from_row(row._asdict()) for row in conn.execute(query)]

    def create_promotions(
        self,
        project: str,
        promotions: builtins.list[tuple[str, Priority, JobRequest, dict[str, Any]]],
        *,
        max_queued: int | None = None,
        max_queued_per_project: int | None = None,
        gpu_seconds_per_day: float | None = None,
    ) -> builtins.list[JobRecord]:
        """Queue one final-tier job per (draft id, priority, request, labels) in ONE transaction, each
        linked to its draft (`promoted_to`): all or nothing (QueueFull, GpuQuotaExceeded, AlreadyPromoted)."""
        if not promotions:
            raise ValueError("`promotions` must name at least one draft.")
        now = utcnow()
        created = []
        with self._write() as conn:
            self._check_room(
                conn, project, len(promotions), now, max_queued, max_queued_per_project, gpu_seconds_per_day
            )
            for source_id, priority, job_request, labels in promotions:
                if priority not in PRIORITIES:
                    raise ValueError(f"`priority` must be 'interactive' or 'batch' but is {priority!r}.")
                row = _new_job_row(project, priority, job_request, labels, now)
                board_id = job_request.storyboard.id if job_request.storyboard is not None else None
                job = _record(
                    conn.execute(
                        insert(jobs).values({**row, "storyboard_id": board_id}).returning(jobs)
                    ).one()
                )
                if board_id is not None:  # the final take joins its draft's shot on the board
                    _count_board_job(conn, board_id)
                _log_event(conn, job.id, "created", {"priority": priority, "bucket": job.bucket}, now)
                _link_promotion(conn, source_id, job.id)
                created.append(job)
        return created

    def get_storyboard(self, storyboard_id: str) -> StoryboardRecord | None:
        with self._read() as conn:
            row = conn.execute(select(storyboards).where(storyboards.c.id == storyboard_id)).one_or_none()
        return None if row is None else StoryboardRecord.from_row(row._asdict())

    def update_storyboard(
        self, storyboard_id: str, *, edit: StoryboardEdit | None = None, cut: CutRecord | None = None
    ) -> StoryboardRecord | None:
        """Store the board's edit (selected takes, shot order) and/or its latest cut; None if no board."""
        changes = {
            name: value.model_dump(mode="json")
            for name, value in (("edit", edit), ("cut", cut))
            if value is not None
        }
        with self._write() as conn:
            if changes:
                conn.execute(update(storyboards).where(storyboards.c.id == storyboard_id).values(changes))
            row = conn.execute(select(storyboards).where(storyboards.c.id == storyboard_id)).one_or_none()
        return None if row is None else StoryboardRecord.from_row(row._asdict())

    def save_cut(self, storyboard_id: str, cut: CutRecord, video_ids: Iterable[str]) -> bool:
        """Store a freshly rendered cut of the takes `video_ids` as the board's cut, unless one of those
        takes was deleted meanwhile (or the board was): then False and nothing changes. The takes' rows are
        share-locked, so a delete of one commits either before (this refuses) or after (it finds the cut)."""
        ids = sorted(set(video_ids))
        with self._write() as conn:
            alive = conn.execute(
                select(jobs.c.id)
                .where(jobs.c.id.in_(ids), jobs.c.deleted_at.is_(None))
                .with_for_update(read=True)
            ).all()
            if len(alive) != len(ids):
                return False
            done = conn.execute(
                update(storyboards)
                .where(storyboards.c.id == storyboard_id)
                .values(cut=cut.model_dump(mode="json"))
            ).rowcount
        return bool(done)

    def replace_cut(self, storyboard_id: str, cut_id: str, cut: CutRecord | None) -> bool:
        """Replace the board's cut `cut_id` by `cut` (None: the board has no cut any more): marking it
        stale, or deleting it. False, nothing changed, when the board's cut is not `cut_id` any more."""
        with self._write() as conn:
            current = conn.execute(
                select(storyboards.c.cut).where(storyboards.c.id == storyboard_id).with_for_update()
            ).one_or_none()
            if current is None or current.cut is None or current.cut.get("id") != cut_id:
                return False
            stored = None if cut is None else cut.model_dump(mode="json")
            conn.execute(update(storyboards).where(storyboards.c.id == storyboard_id).values(cut=stored))
        return True

    def delete_storyboard(self, storyboard_id: str, *, project: str) -> StoryboardRecord | None:
        """Remove the board of `project` (its cut's files are the caller's to remove); the videos it still
        has become videos of no board. The board as it was, or None when there is no such board."""
        with self._write() as conn:
            row = conn.execute(
                select(storyboards)
                .where(storyboards.c.id == storyboard_id, storyboards.c.project == project)
                .with_for_update()
            ).one_or_none()
            if row is None:
                return None
            conn.execute(update(jobs).where(jobs.c.storyboard_id == storyboard_id).values(storyboard_id=None))
            conn.execute(storyboards.delete().where(storyboards.c.id == storyboard_id))
        return StoryboardRecord.from_row(row._asdict())

    def artifact_owners(self, ids: Iterable[str]) -> tuple[dict[str, JobRecord], dict[str, StoryboardRecord]]:
        """The jobs (deleted ones included) and boards among `ids`: who owns the files the orphan sweep
        finds (`<project>/<id>/...`). An id that is neither is in neither map."""
        ids = sorted(set(ids))
        with self._read() as conn:
            found_jobs = {
                row.id: _record(row) for row in conn.execute(select(jobs).where(jobs.c.id.in_(ids)))
            }
            boards = {
                row.id: StoryboardRecord.from_row(row._asdict())
                for row in conn.execute(select(storyboards).where(storyboards.c.id.in_(ids)))
            }
        return found_jobs, boards

    # -- state changes ------------------------------------------------------------------------------------

    def claim(self, job_id: str, scheduler_id: str) -> JobRecord | None:
        """Start a queued job: QUEUED -> ENCODING, `attempt` + 1, `claimed_by` = `scheduler_id`,
        `started_at` set on the first claim. None if it is not queued any more (another scheduler took it,
        or it was cancelled) or does not exist. Run the pipeline with the returned record's `attempt`."""
        now = utcnow()
        with self._write() as conn:
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
            _log_event(conn, job_id, "claimed", {"scheduler_id": scheduler_id, "attempt": row.attempt}, now)
        return _record(row)

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
        fence = _fence(job_id, attempt), jobs.c.status <= status
        with self._write() as conn:
            current = conn.execute(
                select(jobs.c.status, jobs.c.progress, jobs.c.timings).where(*fence).with_for_update()
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
            conn.execute(update(jobs).where(*fence).values(values))
            if status != current.status:
                stage = {"status": _name(status), "from": _name(current.status), "attempt": attempt}
                _log_event(conn, job_id, "stage", {**stage, "progress": progress}, now)
            elif progress // 10 > current.progress // 10:
                data = {"status": _name(status), "progress": progress, "stage_progress": stage_progress}
                _log_event(conn, job_id, "progress", data, now)
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
        with self._write() as conn:
            current = conn.execute(
                select(jobs.c.timings).where(_fence(job_id, attempt)).with_for_update()
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
                update(jobs).where(_fence(job_id, attempt)).values(values).returning(jobs)
            ).one()
            data = {"attempt": attempt, "artifact_uri": artifact_uri, "artifact_bytes": artifact_bytes}
            _log_event(conn, job_id, "succeeded", data, now)
            enqueue_webhook(conn, _record(row), now)
        return True

    def fail(self, job_id: str, attempt: int, code: str, message: str) -> bool:
        """Finish a running job as FAILED with a machine-readable `code` and a human `message`.
        False (nothing changed) if `attempt` is stale or the job is not running. To fail a queued job
        (e.g. its deadline passed), claim it first."""
        now = utcnow()
        with self._write() as conn:
            timings = conn.scalar(select(jobs.c.timings).where(_fence(job_id, attempt)).with_for_update())
            row = conn.execute(
                update(jobs)
                .where(_fence(job_id, attempt))
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
                _log_event(
                    conn, job_id, "failed", {"attempt": attempt, "code": code, "message": message}, now
                )
                enqueue_webhook(conn, _record(row), now)
        return row is not None

    def cancel(self, job_id: str, *, project: str | None = None) -> CancelResult:
        """Cancel a queued or running job (a running job's pipeline notices: its next advance() returns
        False). With `project`, another project's job is NOT_FOUND. A finished job stays as it is."""
        now = utcnow()
        query = select(jobs.c.status, jobs.c.timings).where(jobs.c.id == job_id)
        if project is not None:
            query = query.where(jobs.c.project == project)
        with self._write() as conn:
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
            _log_event(conn, job_id, "cancelled", {"from": _name(current.status)}, now)
            enqueue_webhook(conn, _record(row), now)
        return CancelResult.CANCELLED

    def expired(self, project: str, finished_before: datetime, limit: int = 100) -> builtins.list[JobRecord]:
        """The project's finished, not yet deleted jobs that finished before `finished_before` (oldest
        first): what its retention deletes."""
        _check_limit(limit)
        query = (
            select(jobs)
            .where(
                jobs.c.project == project,
                jobs.c.deleted_at.is_(None),
                jobs.c.status >= JobStatus.SUCCEEDED,
                jobs.c.finished_at < finished_before,
            )
            .order_by(jobs.c.finished_at)
            .limit(limit)
        )
        with self._read() as conn:
            return [_record(row) for row in conn.execute(query)]

    def add_gpu_seconds(self, job_id: str, seconds: float) -> bool:
        """Count `seconds` more accelerator time on a finished job: the part of a stage that ran before the
        job was cancelled under it. False if the job is not finished."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"`seconds` must be a finite number >= 0 but is {seconds!r}.")
        with self._write() as conn:
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
        with self._write() as conn:
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
            _log_event(conn, job_id, "deleted", {"status": _name(current.status), "reason": reason}, now)
        return _record(current)

    def requeue(self, job_id: str, attempt: int, *, max_attempts: int = 3) -> JobStatus | None:
        """Give one running job back to the queue, e.g. when its pipeline lost a replica: as in
        requeue_in_flight(), it fails instead with "too_many_attempts" once claimed `max_attempts` times.

        Fenced like advance(): returns the job's new status (QUEUED or FAILED), or None and changes
        nothing if `attempt` is stale or the job is not running.
        """
        _check_max_attempts(max_attempts)
        query = select(jobs.c.id, jobs.c.status, jobs.c.attempt, jobs.c.claimed_by).where(
            _fence(job_id, attempt)
        )
        with self._write() as conn:
            job = conn.execute(query.with_for_update()).one_or_none()
            return None if job is None else _requeue_or_fail(conn, job, max_attempts, utcnow())

    def save_checkpoint(self, job_id: str, attempt: int, uri: str, *, step_index: int) -> bool:
        """Record where the running job's denoise state at the expert boundary is stored (`uri`, a key
        of the artifact store): a later attempt resumes from it. Writes a "checkpoint" event.
        Fenced like advance(): False and nothing changed if `attempt` is stale or the job is not running."""
        now = utcnow()
        with self._write() as conn:
            done = conn.execute(
                update(jobs).where(_fence(job_id, attempt)).values(checkpoint_uri=uri, updated_at=now)
            ).rowcount
            if done:
                data = {"attempt": attempt, "uri": uri, "step_index": step_index}
                _log_event(conn, job_id, "checkpoint", data, now)
        return bool(done)

    def clear_checkpoint(self, job_id: str) -> None:
        """Forget the job's checkpoint (once its clip is stored, or when it cannot be read)."""
        with self._write() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(checkpoint_uri=None))

    def log_event(self, job_id: str, attempt: int, kind: EventKind, data: dict[str, Any]) -> bool:
        """Add an event ("resumed", "retry", ...) to a running job's log, fenced like advance()."""
        now = utcnow()
        with self._write() as conn:
            current = conn.execute(
                select(jobs.c.id).where(_fence(job_id, attempt)).with_for_update()
            ).one_or_none()
            if current is None:
                return False
            _log_event(conn, job_id, kind, {"attempt": attempt, **data}, now)
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
        with self._write() as conn:
            in_flight = conn.execute(query.order_by(jobs.c.id).with_for_update()).all()
            outcomes = {job.id: _requeue_or_fail(conn, job, max_attempts, now) for job in in_flight}
        requeued = [job_id for job_id, status in outcomes.items() if status == JobStatus.QUEUED]
        if requeued:
            logger.info("requeued %d in-flight jobs: %s", len(requeued), ", ".join(requeued))
        return requeued

    # -- webhook outbox (see serve/jobs/outbox.py) -------------------------------------------------------

    def due_webhooks(self, limit: int = 32, lease_s: float = 60.0) -> builtins.list[WebhookDelivery]:
        """Claim up to `limit` pending deliveries whose next attempt is due, leased for `lease_s`: no other
        caller gets them until the lease ends or record_webhook_attempt() is called."""
        _check_limit(limit)
        if lease_s <= 0:
            raise ValueError(f"`lease_s` must be > 0 but is {lease_s}.")
        with self._write() as conn:
            return claim_due(conn, utcnow(), limit, lease_s)

    def record_webhook_attempt(
        self,
        delivery_id: str,
        *,
        ok: bool,
        status_code: int | None,
        error: str | None,
        seconds: float,
        next_attempt_at: datetime | None,
    ) -> WebhookDelivery | None:
        """Log one attempt: `ok` -> delivered; else pending again at `next_attempt_at`, or failed for good
        when it is None. Returns the updated delivery, or None if it was not pending (nothing changed)."""
        if next_attempt_at is not None and next_attempt_at.tzinfo is None:
            raise ValueError(
                f"`next_attempt_at` must be timezone-aware but is {next_attempt_at.isoformat()}."
            )
        with self._write() as conn:
            return record_attempt(
                conn,
                delivery_id,
                utcnow(),
                ok=ok,
                status_code=status_code,
                error=error,
                seconds=seconds,
                next_attempt_at=next_attempt_at,
            )

    def webhook_deliveries(self, job_id: str) -> builtins.list[WebhookDelivery]:
        """The job's webhook deliveries, oldest first (none if it asked for no callback)."""
        with self._read() as conn:
            return deliveries_of(conn, job_id)

    def webhook_secret(self, project: str) -> str | None:
        """The project's webhook signing secret, or None when the project has no row."""
        with self._read() as conn:
            return secret_of(conn, project)

    # -- internals ----------------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One writing transaction: commit on exit, roll back on an exception."""
        with self._writer.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.begin() as conn:
            yield conn

    def _check_room(
        self,
        conn: Connection,
        project: str,
        num_new: int,
        now: datetime,
        max_queued: int | None,
        max_queued_per_project: int | None,
        gpu_seconds_per_day: float | None,
    ) -> None:
        """Raise QueueFull unless `num_new` more queued jobs fit both queue bounds, and GpuQuotaExceeded once
        the project used its GPU seconds of today. With any bound set on PostgreSQL, first serialise
        bounded creates until commit: the count and the insert that follows see every row committed before
        (READ COMMITTED takes a fresh snapshot per statement)."""
        if max_queued is None and max_queued_per_project is None and gpu_seconds_per_day is None:
            return
        if self.backend == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(QUEUE_LOCK_KEY)))
        queued = select(func.count()).select_from(jobs).where(jobs.c.status == JobStatus.QUEUED)
        if max_queued is not None and conn.scalar(queued) + num_new > max_queued:
            raise QueueFull(_retry_after_s(conn), "global", max_queued)
        if (
            max_queued_per_project is not None
            and conn.scalar(queued.where(jobs.c.project == project)) + num_new > max_queued_per_project
        ):
            raise QueueFull(_retry_after_s(conn), "project", max_queued_per_project)
        if gpu_seconds_per_day is not None:
            used = gpu_seconds_today(conn, project, now)
            if used >= gpu_seconds_per_day:
                raise GpuQuotaExceeded(project, used, gpu_seconds_per_day, seconds_to_utc_midnight(now))


def _new_job_row(
    project: str,
    priority: Priority,
    request: JobRequest,
    labels: dict[str, Any],
    now: datetime,
) -> dict[str, Any]:
    """A fresh QUEUED job row; create() adds its idempotency key, deadline and storyboard."""
    return {
        "id": new_job_id(),
        "project": project,
        "priority": priority,
        "request": request.to_stored(),
        "bucket": str(request.bucket),
        "status": JobStatus.QUEUED,
        "stage_progress": 0.0,
        "progress": 0,
        "attempt": 0,
        "claimed_by": None,
        "created_at": now,
        "started_at": None,
        "finished_at": None,
        "updated_at": now,
        "timings": {},
        "error_code": None,
        "error_message": None,
        "artifact_uri": None,
        "artifact_bytes": None,
        "idempotency_key": None,
        "labels": dict(labels),
        "seed": None,
        "deadline": None,
        "storyboard_id": None,
        "gpu_seconds": None,
        "checkpoint_uri": None,
        "poster_uri": None,
        "deleted_at": None,
        "promoted_to": None,
        "eta_at": None,
    }


def _link_promotion(conn: Connection, source_id: str, job_id: str) -> None:
    """Point the draft `source_id` at its promoted job; AlreadyPromoted (rolling the create back) when it
    points somewhere already or is gone."""
    linked = conn.execute(
        update(jobs)
        .where(jobs.c.id == source_id, jobs.c.promoted_to.is_(None), jobs.c.deleted_at.is_(None))
        .values(promoted_to=job_id)
    )
    if linked.rowcount != 1:
        current = conn.scalar(select(jobs.c.promoted_to).where(jobs.c.id == source_id))
        raise AlreadyPromoted(source_id, current)


def _count_board_job(conn: Connection, storyboard_id: str) -> None:
    conn.execute(
        update(storyboards)
        .where(storyboards.c.id == storyboard_id)
        .values(num_jobs=storyboards.c.num_jobs + 1)
    )


def _storyboard_by_idempotency_key(conn: Connection, project: str, key: str) -> StoryboardRecord | None:
    query = select(storyboards).where(storyboards.c.project == project, storyboards.c.idempotency_key == key)
    row = conn.execute(query).one_or_none()
    return None if row is None else StoryboardRecord.from_row(row._asdict())


def _create_engine(url: str, busy_timeout_s: float) -> Engine:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, pool_pre_ping=True)
    if backend != "sqlite":
        raise ValueError(
            f"The job store runs on SQLite or PostgreSQL but got a {backend!r} URL; "
            "use sqlite:///path/jobs.db or postgresql+psycopg://user@host:5432/db."
        )
    if parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory":
        raise ValueError(
            f"The job store needs a SQLite file shared by all processes but {url!r} is in memory; "
            "use sqlite:///path/jobs.db."
        )
    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed)
    busy_timeout_ms = int(busy_timeout_s * 1000)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN (below) instead of the sqlite3 module, which would defer it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        _enable_wal(cursor, busy_timeout_s)  # readers and one writer concurrently
        cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: a power loss can only drop the tail
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("previz_sqlite_begin", "BEGIN"))

    return engine


def _enable_wal(cursor: sqlite3.Cursor, timeout_s: float) -> None:
    """Switch the database file to WAL (persistent; a no-op once done). The first switch needs the file
    to itself and SQLite reports "locked" at once instead of waiting, e.g. when the Ingress and the
    Scheduler open a new file at the same moment: retry until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    if mode != "wal":  # e.g. a network file system: still correct, but readers wait for writers
        logger.warning("SQLite job store runs in journal mode %r: WAL is not available here", mode)


def _requeue_or_fail(conn: Connection, job: Any, max_attempts: int, now: datetime) -> JobStatus:
    """Move one running job (`job`: id, status, attempt, claimed_by; locked by the caller) back to
    QUEUED, or to FAILED once it has been claimed `max_attempts` times. Returns the new status."""
    still_running = (jobs.c.id == job.id, jobs.c.status.in_(RUNNING_STATUSES))
    data = {"from": _name(job.status), "attempt": job.attempt, "claimed_by": job.claimed_by}
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
        _log_event(conn, job.id, "failed", {**data, "code": "too_many_attempts", "message": message}, now)
        enqueue_webhook(conn, _record(row), now)
        logger.warning("job %s failed: interrupted on all %d attempts", job.id, job.attempt)
        return JobStatus.FAILED
    conn.execute(
        update(jobs)
        .where(*still_running)
        .values(status=JobStatus.QUEUED, claimed_by=None, stage_progress=0.0, progress=0, updated_at=now)
    )
    _log_event(conn, job.id, "requeued", data, now)
    return JobStatus.QUEUED


def _fence(job_id: str, attempt: int) -> Any:
    """The rows a pipeline task of `attempt` may still change: its job, this attempt, running."""
    return (jobs.c.id == job_id) & (jobs.c.attempt == attempt) & jobs.c.status.in_(RUNNING_STATUSES)


def _log_event(conn: Connection, job_id: str, kind: EventKind, data: dict[str, Any], at: datetime) -> None:
    conn.execute(insert(job_events).values(job_id=job_id, at=at, kind=kind, data=data))


def _by_idempotency_key(conn: Connection, project: str, key: str) -> JobRecord | None:
    query = select(jobs).where(jobs.c.project == project, jobs.c.idempotency_key == key)
    row = conn.execute(query).one_or_none()
    return None if row is None else _record(row)


def _retry_after_s(conn: Connection) -> int:
    """When a queue slot is likely to free: mean run time of recent successes / jobs running now."""
    recent = conn.execute(
        select(jobs.c.started_at, jobs.c.finished_at)
        .where(jobs.c.status == JobStatus.SUCCEEDED)
        .order_by(jobs.c.id.desc())
        .limit(20)
    ).all()
    runs = [(finished - started).total_seconds() for started, finished in recent if started and finished]
    if not runs:
        return DEFAULT_RETRY_AFTER_S
    running = conn.scalar(select(func.count()).select_from(jobs).where(jobs.c.status.in_(RUNNING_STATUSES)))
    estimate = sum(runs) / len(runs) / max(1, running or 0)
    return min(MAX_RETRY_AFTER_S, max(1, math.ceil(estimate)))


def _record(row: Any) -> JobRecord:
    values = row._asdict()
    return JobRecord(**{**values, "request": JobRequest.from_stored(values["request"])})


def _name(status: JobStatus) -> str:
    """How event data names a status: the JobStatus member name (JobStatus[name] reads it back)."""
    return status.name


def _check_max_attempts(max_attempts: int) -> None:
    if max_attempts < 1:
        raise ValueError(f"`max_attempts` must be >= 1 but is {max_attempts}.")


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"`limit` must be within 1..{MAX_PAGE} but is {limit}.")
