"""How job rows are read and written, shared by the job store's repositories: the record of a row, a
new row, the event log, the attempt fence."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, insert, update
from sqlalchemy.exc import IntegrityError

from serve.jobs.database import Database
from serve.jobs.models import RUNNING_STATUSES, EventKind, JobRecord, JobStatus, Priority, new_job_id
from serve.jobs.request import JobRequest
from serve.jobs.schema import job_events, jobs, storyboards

Record = TypeVar("Record")
MAX_PAGE = 1000  # most rows one list()/queued()/events() call returns


def job_record(row: Any) -> JobRecord:
    """The record of a `jobs` row; its request is upgraded from whatever format stored it."""
    values = row._asdict()
    return JobRecord(**{**values, "request": JobRequest.from_stored(values["request"])})


def continued_shot(request: JobRequest) -> int | None:
    """The board shot a chained take waits for (its first keyframe is `continue` and not yet stored)."""
    first = request.keyframes.first if request.keyframes is not None else None
    return first.shot if first is not None and first.kind == "continue" and first.sha256 is None else None


def new_job_row(
    project: str,
    priority: Priority,
    request: JobRequest,
    labels: dict[str, Any],
    now: datetime,
    job_id: str | None = None,
) -> dict[str, Any]:
    """A fresh QUEUED job row; create() adds its idempotency key, deadline and storyboard. `job_id`: an id
    drawn beforehand (`new_job_id`), for a job whose keyframes are stored before its row exists."""
    return {
        "id": job_id or new_job_id(),
        "continues_shot": continued_shot(request),
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
        "take": None,
    }


def count_board_job(conn: Connection, storyboard_id: str) -> None:
    """One more job on the board (a take added after it was created)."""
    conn.execute(
        update(storyboards)
        .where(storyboards.c.id == storyboard_id)
        .values(num_jobs=storyboards.c.num_jobs + 1)
    )


def fence(job_id: str, attempt: int) -> Any:
    """The rows a pipeline task of `attempt` may still change: its job, this attempt, running."""
    return (jobs.c.id == job_id) & (jobs.c.attempt == attempt) & jobs.c.status.in_(RUNNING_STATUSES)


def log_event(conn: Connection, job_id: str, kind: EventKind, data: dict[str, Any], at: datetime) -> None:
    conn.execute(insert(job_events).values(job_id=job_id, at=at, kind=kind, data=data))


def status_name(status: JobStatus) -> str:
    """How event data names a status: the JobStatus member name (JobStatus[name] reads it back)."""
    return status.name


def check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"`limit` must be within 1..{MAX_PAGE} but is {limit}.")


def create_once(
    db: Database,
    project: str,
    idempotency_key: str | None,
    find: Callable[[Connection, str, str], Record | None],
    write: Callable[[Connection], Record],
) -> tuple[Record, bool]:
    """`(write(conn), True)` in one writing transaction, unless `idempotency_key` already names a record
    of `project` (`find` looks it up): then `(that record, False)` and nothing written. Concurrent creates
    with one key make one record: the unique (project, idempotency_key) constraint decides, and the loser
    returns the winner's, committed by then."""
    try:
        with db.write() as conn:
            if idempotency_key is not None:
                existing = find(conn, project, idempotency_key)
                if existing is not None:
                    return existing, False
            return write(conn), True
    except IntegrityError:
        if idempotency_key is None:
            raise
        with db.read() as conn:
            existing = find(conn, project, idempotency_key)
        if existing is None:
            raise
        return existing, False
