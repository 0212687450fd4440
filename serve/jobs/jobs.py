"""The job store's jobs as rows to create and read: a create (bounded by the queues and quotas, idempotent
by key, linked to the draft it promotes), pages and counts for the API and the Scheduler, the event log.
How a running job moves from stage to stage is serve/jobs/transitions.py."""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, case, func, insert, select, update

from pipeline.priority import PRIORITY_RANK
from serve.jobs.bounds import check_room
from serve.jobs.database import Database
from serve.jobs.models import (
    PRIORITIES,
    RUNNING_STATUSES,
    AlreadyPromoted,
    InFlight,
    JobEvent,
    JobRecord,
    JobStatus,
    Priority,
    QueuedJob,
    QueueView,
    utcnow,
)
from serve.jobs.request import JobRequest
from serve.jobs.rows import (
    MAX_PAGE,
    check_limit,
    count_board_job,
    create_once,
    job_record,
    log_event,
    new_job_row,
)
from serve.jobs.schema import job_events, jobs, storyboards
from serve.jobs.storyboard import StoryboardRecord
from serve.jobs.takes import next_takes, shot_of


class JobRepository:
    """Creating and reading jobs (one transaction each)."""

    def __init__(self, db: Database) -> None:
        self._db = db

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
        job_id: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Queue a new job and return `(job, True)`. With `promotes` (a draft's id), the draft's
        `promoted_to` is set to the new job in the same transaction; AlreadyPromoted, and nothing written,
        when it was set already (two promotes of one take cannot both win). `job_id`: the id to use, drawn
        beforehand with `new_job_id` (its keyframes are stored under it before the row exists).

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
        row = new_job_row(project, priority, request, dict(labels or {}), now, job_id) | {
            "idempotency_key": idempotency_key,
            "deadline": deadline,
            "storyboard_id": storyboard_id,
        }

        def write(conn: Connection) -> JobRecord:
            check_room(
                self._db, conn, project, 1, now, max_queued, max_queued_per_project, gpu_seconds_per_day
            )
            take = None
            if storyboard_id is not None:  # a take added to a board later (a remix or a promote)
                count_board_job(conn, storyboard_id)  # first: it locks the board row for next_takes
                (take,) = next_takes(conn, storyboard_id, [shot_of(request)])
            job = job_record(conn.execute(insert(jobs).values({**row, "take": take}).returning(jobs)).one())
            log_event(conn, job.id, "created", {"priority": priority, "bucket": job.bucket}, now)
            if promotes is not None:
                _link_promotion(conn, promotes, job.id)
            return job

        return create_once(self._db, project, idempotency_key, _by_idempotency_key, write)

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
        with self._db.read() as conn:
            row = conn.execute(query).one_or_none()
        return None if row is None else job_record(row)

    def list(
        self,
        *,
        project: str | None = None,
        statuses: Iterable[JobStatus] | None = None,
        storyboard_id: str | None = None,
        review: str | None = None,
        after: str | None = None,
        limit: int = 50,
        order: Literal["asc", "desc"] = "desc",
    ) -> builtins.list[JobRecord]:
        """One page of jobs ordered by id (= creation time), newest first by default.

        `after` is the cursor: the last id of the previous page; the next page holds the ids after it
        in `order`. Filters combine with AND; `statuses` is any collection of JobStatus; `review` is a
        review status (serve.jobs.reviews; `pending` is a take whose review was never set).
        """
        if order not in ("asc", "desc"):
            raise ValueError(f"`order` must be 'asc' or 'desc' but is {order!r}.")
        check_limit(limit)
        query = select(jobs).where(jobs.c.deleted_at.is_(None))
        if project is not None:
            query = query.where(jobs.c.project == project)
        if statuses is not None:
            query = query.where(jobs.c.status.in_([JobStatus(status) for status in statuses]))
        if storyboard_id is not None:
            query = query.where(jobs.c.storyboard_id == storyboard_id)
        if review is not None:
            query = query.where(jobs.c.review.is_(None) if review == "pending" else jobs.c.review == review)
        if after is not None:
            query = query.where(jobs.c.id < after if order == "desc" else jobs.c.id > after)
        query = query.order_by(jobs.c.id.desc() if order == "desc" else jobs.c.id.asc()).limit(limit)
        with self._db.read() as conn:
            return [job_record(row) for row in conn.execute(query)]

    def queue_position(self, job: JobRecord) -> int:
        """How many queued jobs are ahead of a queued `job`: every queued interactive job before a batch
        one, and the older ones of its own priority (what the Scheduler's pick looks at first)."""
        query = (
            select(func.count()).select_from(jobs).where(jobs.c.status == JobStatus.QUEUED, self._ahead(job))
        )
        with self._db.read() as conn:
            return int(conn.scalar(query) or 0)

    def queue_view(self, job: JobRecord, recent: int = 16) -> QueueView:
        """The counted inputs of a queued `job`'s wait (serve.scheduling.queue_wait): the jobs ahead of it
        (the same ones `queue_position` counts) with their buckets, the jobs in flight with their ETAs, and
        per bucket involved the mean claim-to-finish time of its `recent` latest first-attempt successes."""
        ahead = self._ahead(job)
        with self._db.read() as conn:
            buckets = tuple(
                conn.scalars(
                    select(jobs.c.bucket)
                    .where(jobs.c.status == JobStatus.QUEUED, ahead)
                    .order_by(jobs.c.id)
                    .limit(MAX_PAGE)
                )
            )
            running = select(jobs.c.priority, jobs.c.bucket, jobs.c.started_at, jobs.c.eta_at).where(
                jobs.c.status.in_(RUNNING_STATUSES)
            )
            in_flight = tuple(InFlight(*row) for row in conn.execute(running))
            run_seconds = {}
            for bucket in {job.bucket, *buckets, *(slot.bucket for slot in in_flight)}:
                rows = conn.execute(
                    select(jobs.c.started_at, jobs.c.finished_at)
                    .where(
                        jobs.c.bucket == bucket,
                        jobs.c.status == JobStatus.SUCCEEDED,
                        jobs.c.attempt == 1,
                        jobs.c.started_at.is_not(None),
                    )
                    .order_by(jobs.c.id.desc())
                    .limit(recent)
                ).all()
                if rows:
                    spans = [(end - start).total_seconds() for start, end in rows]
                    run_seconds[bucket] = sum(spans) / len(spans)
        return QueueView(len(buckets), buckets, in_flight, run_seconds)

    def _ahead(self, job: JobRecord) -> ColumnElement[bool]:
        """Which queued jobs the Scheduler's pick looks at before `job`: every interactive job before a
        batch one, and the older ones of its own priority; never a chained take still waiting for its
        predecessor's take (the pick skips it, as `queued_candidates` does, until it is released)."""
        ahead = (jobs.c.priority == job.priority) & (jobs.c.id < job.id)
        ahead = ahead | (jobs.c.priority == "interactive") if job.priority == "batch" else ahead
        return ahead & jobs.c.continues_shot.is_(None)

    def queued(self, limit: int = 200) -> builtins.list[JobRecord]:
        """Queued jobs, oldest first: the scheduler's candidates (it applies priority and fair share)."""
        check_limit(limit)
        query = select(jobs).where(jobs.c.status == JobStatus.QUEUED).order_by(jobs.c.id).limit(limit)
        with self._db.read() as conn:
            return [job_record(row) for row in conn.execute(query)]

    def queued_candidates(self, limit: int = 500) -> builtins.list[QueuedJob]:
        """The claim loop's view of the queue: only the columns the fair-share policy reads (no request JSON
        is loaded or validated). The `limit` rows are taken by priority class first, then in turns across
        projects (each project's first job, then each one's second, ...; within a project by deadline, then
        age), so neither an interactive job nor a small project hides behind a deep batch backlog."""
        check_limit(limit)
        rank = case(PRIORITY_RANK, value=jobs.c.priority, else_=len(PRIORITY_RANK)).label("rank")
        turn = (
            func.row_number()
            .over(
                partition_by=(jobs.c.project, jobs.c.priority),
                order_by=(jobs.c.deadline.is_(None), jobs.c.deadline, jobs.c.id),
            )
            .label("turn")
        )
        columns = jobs.c.id, jobs.c.project, jobs.c.priority, jobs.c.created_at, jobs.c.deadline
        ready = (jobs.c.status == JobStatus.QUEUED) & jobs.c.continues_shot.is_(None)  # not a waiting chain
        queue = select(*columns, rank, turn).where(ready).subquery()
        query = (
            select(queue.c.id, queue.c.project, queue.c.priority, queue.c.created_at, queue.c.deadline)
            .order_by(queue.c.rank, queue.c.turn, queue.c.id)
            .limit(limit)
        )
        with self._db.read() as conn:
            return [QueuedJob(*row) for row in conn.execute(query)]

    def count_by_status(self, project: str | None = None) -> dict[JobStatus, int]:
        """Number of jobs in each status (every status present, zeros included), for metrics and quotas."""
        query = select(jobs.c.status, func.count()).group_by(jobs.c.status)
        if project is not None:
            query = query.where(jobs.c.project == project)
        counts = dict.fromkeys(JobStatus, 0)
        with self._db.read() as conn:
            counts.update({status: count for status, count in conn.execute(query)})
        return counts

    def running_by_project(self) -> dict[str, int]:
        """project -> number of jobs claimed and not finished (the fair-share input); idle projects absent."""
        query = (
            select(jobs.c.project, func.count())
            .where(jobs.c.status.in_(RUNNING_STATUSES))
            .group_by(jobs.c.project)
        )
        with self._db.read() as conn:
            return {project: count for project, count in conn.execute(query)}

    def events(self, job_id: str, *, after_id: int = 0, limit: int = MAX_PAGE) -> builtins.list[JobEvent]:
        """The job's events with id > `after_id`, oldest first (poll with the last id seen to stream)."""
        check_limit(limit)
        query = (
            select(job_events)
            .where(job_events.c.job_id == job_id, job_events.c.id > after_id)
            .order_by(job_events.c.id)
            .limit(limit)
        )
        with self._db.read() as conn:
            return [JobEvent(**row._asdict()) for row in conn.execute(query)]

    def waiting_chained(self, limit: int = 100) -> builtins.list[JobRecord]:
        """Queued chained takes that still wait for their predecessor shot's take, oldest first."""
        check_limit(limit)
        query = (
            select(jobs)
            .where(jobs.c.status == JobStatus.QUEUED, jobs.c.continues_shot.is_not(None))
            .order_by(jobs.c.id)
            .limit(limit)
        )
        with self._db.read() as conn:
            return [job_record(row) for row in conn.execute(query)]

    def release_chained(self, job_id: str, request: JobRequest) -> bool:
        """A waiting chained take may run now: its request (first keyframe stored) replaces the old and it
        joins the claimable queue. False when it is no longer a queued, waiting take (cancelled meanwhile)."""
        now = utcnow()
        with self._db.write() as conn:
            released = conn.execute(
                update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.status == JobStatus.QUEUED,
                    jobs.c.continues_shot.is_not(None),
                )
                .values(request=request.to_stored(), continues_shot=None, updated_at=now)
            ).rowcount
            if released:
                first = request.keyframes.first if request.keyframes is not None else None
                log_event(conn, job_id, "chained", {"from": first.video if first else None}, now)
        return bool(released)

    def create_promotions(
        self,
        project: str,
        promotions: builtins.list[tuple[str, Priority, JobRequest, dict[str, Any]]],
        *,
        max_queued: int | None = None,
        max_queued_per_project: int | None = None,
        gpu_seconds_per_day: float | None = None,
        job_ids: builtins.list[str | None] | None = None,
    ) -> builtins.list[JobRecord]:
        """Queue one final-tier job per (draft id, priority, request, labels) in ONE transaction, each
        linked to its draft (`promoted_to`): all or nothing (QueueFull, GpuQuotaExceeded, AlreadyPromoted).
        `job_ids`: per promotion, an id drawn beforehand (its keyframes are stored under it) or None."""
        if not promotions:
            raise ValueError("`promotions` must name at least one draft.")
        now = utcnow()
        created = []
        with self._db.write() as conn:
            check_room(
                self._db,
                conn,
                project,
                len(promotions),
                now,
                max_queued,
                max_queued_per_project,
                gpu_seconds_per_day,
            )
            ids = job_ids if job_ids is not None else [None] * len(promotions)
            for (source_id, priority, job_request, labels), job_id in zip(promotions, ids, strict=True):
                if priority not in PRIORITIES:
                    raise ValueError(f"`priority` must be 'interactive' or 'batch' but is {priority!r}.")
                row = new_job_row(project, priority, job_request, labels, now, job_id)
                board_id = job_request.storyboard.id if job_request.storyboard is not None else None
                take = None
                if board_id is not None:  # the final take is a new take of its draft's shot
                    count_board_job(conn, board_id)  # first: it locks the board row for next_takes
                    (take,) = next_takes(conn, board_id, [shot_of(job_request)])
                values = {**row, "storyboard_id": board_id, "take": take}
                job = job_record(conn.execute(insert(jobs).values(values).returning(jobs)).one())
                log_event(conn, job.id, "created", {"priority": priority, "bucket": job.bucket}, now)
                _link_promotion(conn, source_id, job.id)
                created.append(job)
        return created

    def expired(self, project: str, finished_before: datetime, limit: int = 100) -> builtins.list[JobRecord]:
        """The project's finished, not yet deleted jobs that finished before `finished_before` (oldest
        first): what its retention deletes."""
        check_limit(limit)
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
        with self._db.read() as conn:
            return [job_record(row) for row in conn.execute(query)]

    def artifact_owners(self, ids: Iterable[str]) -> tuple[dict[str, JobRecord], dict[str, StoryboardRecord]]:
        """The jobs (deleted ones included) and boards among `ids`: who owns the files the orphan sweep
        finds (`<project>/<id>/...`). An id that is neither is in neither map."""
        ids = sorted(set(ids))
        with self._db.read() as conn:
            found_jobs = {
                row.id: job_record(row) for row in conn.execute(select(jobs).where(jobs.c.id.in_(ids)))
            }
            boards = {
                row.id: StoryboardRecord.from_row(row._asdict())
                for row in conn.execute(select(storyboards).where(storyboards.c.id.in_(ids)))
            }
        return found_jobs, boards


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


def _by_idempotency_key(conn: Connection, project: str, key: str) -> JobRecord | None:
    query = select(jobs).where(jobs.c.project == project, jobs.c.idempotency_key == key)
    row = conn.execute(query).one_or_none()
    return None if row is None else job_record(row)
