"""Admission bounds checked inside a create's transaction: the queue bounds (all projects, one project)
and a project's GPU seconds of the day."""

from __future__ import annotations

import math
from datetime import datetime

from sqlalchemy import Connection, func, select

from serve.jobs.database import Database
from serve.jobs.models import RUNNING_STATUSES, GpuQuotaExceeded, JobStatus, QueueFull
from serve.jobs.projects import gpu_seconds_today, seconds_to_utc_midnight
from serve.jobs.schema import QUEUE_LOCK_KEY, jobs

DEFAULT_RETRY_AFTER_S = 30  # Retry-After when no job has finished yet to estimate from
MAX_RETRY_AFTER_S = 600


def check_room(
    db: Database,
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
    db.serialise(conn, QUEUE_LOCK_KEY)
    queued = select(func.count()).select_from(jobs).where(jobs.c.status == JobStatus.QUEUED)
    if max_queued is not None and conn.scalar(queued) + num_new > max_queued:
        raise QueueFull(retry_after_s(conn), "global", max_queued)
    if (
        max_queued_per_project is not None
        and conn.scalar(queued.where(jobs.c.project == project)) + num_new > max_queued_per_project
    ):
        raise QueueFull(retry_after_s(conn), "project", max_queued_per_project)
    if gpu_seconds_per_day is not None:
        used = gpu_seconds_today(conn, project, now)
        if used >= gpu_seconds_per_day:
            raise GpuQuotaExceeded(project, used, gpu_seconds_per_day, seconds_to_utc_midnight(now))


def retry_after_s(conn: Connection) -> int:
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
