"""How job rows are read and written, shared by the job store's repositories: the record of a row, a
new row, the event log, the attempt fence."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, update

from serve.jobs.models import RUNNING_STATUSES, EventKind, JobRecord, JobStatus, Priority, new_job_id
from serve.jobs.request import JobRequest
from serve.jobs.schema import job_events, jobs, storyboards

MAX_PAGE = 1000  # most rows one list()/queued()/events() call returns


def job_record(row: Any) -> JobRecord:
    """The record of a `jobs` row; its request is upgraded from whatever format stored it."""
    values = row._asdict()
    return JobRecord(**{**values, "request": JobRequest.from_stored(values["request"])})


def new_job_row(
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
