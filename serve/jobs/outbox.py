"""The webhook outbox: one `webhook_deliveries` row per finished job that asked for a `callback_url`.

The row is written in the same transaction as the job's final transition (succeed, fail, cancel), so a
job outcome is announced exactly once: the attempt fence lets only one transition happen. Dispatchers
(serve/webhooks.py) lease due rows, POST them and record each attempt here; the rows are the truth, so
deliveries survive restarts (an unfinished lease simply expires).

The payload's `data` is rendered by the `WebhookBody` function the outbox is given: the serve layer gives
the API's own video object (serve.http.views.video_payload), so a webhook and `GET /v1/videos/{id}` never
disagree, and this package never imports the HTTP layer.

    outbox.due(limit=32, lease_s=40)        # claim pending rows whose next attempt is due
    outbox.record_attempt(delivery.id, ok=False, status_code=500, error="HTTP 500", seconds=0.02,
                          next_attempt_at=utcnow() + timedelta(seconds=4))
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, insert, select, update

from serve.jobs.database import Database
from serve.jobs.models import JobRecord, JobStatus, new_job_id, unix, utcnow
from serve.jobs.projects import retention_of
from serve.jobs.rows import check_limit
from serve.jobs.schema import jobs, projects, webhook_deliveries

# (a finished job, its project's retention_days) -> the webhook's `data`: the API's view of the job
WebhookBody = Callable[[JobRecord, int | None], dict[str, Any]]
WebhookEvent = Literal["video.completed", "video.failed", "video.cancelled", "video.review_changed"]
DeliveryStatus = Literal["pending", "delivered", "failed"]
# final job status -> the event announcing it
EVENTS: dict[JobStatus, WebhookEvent] = {
    JobStatus.SUCCEEDED: "video.completed",
    JobStatus.FAILED: "video.failed",
    JobStatus.CANCELLED: "video.cancelled",
}


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One webhook to deliver (or delivered), detached from the database."""

    id: str  # "whd_" + 24 hex; the payload's `id` and the Previz-Delivery header
    job_id: str
    project: str  # whose webhook secret signs it
    event: WebhookEvent
    url: str
    payload: dict[str, Any]  # the JSON body, fixed when the job finished: every attempt sends the same
    status: DeliveryStatus
    attempts: int  # HTTP attempts made so far
    next_attempt_at: datetime | None  # None once delivered or failed
    leased_until: datetime | None  # a dispatcher is sending it until then
    log: list[dict[str, Any]]  # per attempt: {at (unix s), status_code, error, seconds}
    created_at: datetime
    delivered_at: datetime | None


def new_delivery_id() -> str:
    """`whd_` + the same time-ordered 24 hex as job ids."""
    return "whd_" + new_job_id().removeprefix("vid_")


class Outbox:
    """The webhook deliveries of finished jobs: queued inside the finishing transaction, then leased,
    attempted and recorded by the dispatchers."""

    def __init__(self, db: Database, webhook_body: WebhookBody) -> None:
        self._db = db
        self._webhook_body = webhook_body

    def enqueue(
        self, conn: Connection, job: JobRecord, now: datetime, event: WebhookEvent | None = None
    ) -> None:
        """Inside the transaction that just finished `job` (or changed its review: `event`
        `video.review_changed`): queue its webhook, if it asked for one."""
        url = job.request.callback_url
        if not url:
            return
        delivery_id = new_delivery_id()
        event = event or EVENTS[job.status]
        payload = {
            "id": delivery_id,
            "type": event,
            "created_at": unix(now),
            "data": self._webhook_body(job, retention_of(conn, job.project)),
        }
        conn.execute(
            insert(webhook_deliveries).values(
                id=delivery_id,
                job_id=job.id,
                event=event,
                url=url,
                payload=payload,
                status="pending",
                attempts=0,
                next_attempt_at=now,
                leased_until=None,
                log=[],
                created_at=now,
                delivered_at=None,
            )
        )

    def due(self, limit: int = 32, lease_s: float = 60.0) -> builtins.list[WebhookDelivery]:
        """Claim up to `limit` pending deliveries whose next attempt is due, leased for `lease_s`: no other
        caller gets them until the lease ends or record_attempt() is called."""
        check_limit(limit)
        if lease_s <= 0:
            raise ValueError(f"`lease_s` must be > 0 but is {lease_s}.")
        with self._db.write() as conn:
            return _claim_due(conn, utcnow(), limit, lease_s)

    def record_attempt(
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
        with self._db.write() as conn:
            return _record_attempt(
                conn,
                delivery_id,
                utcnow(),
                ok=ok,
                status_code=status_code,
                error=error,
                seconds=seconds,
                next_attempt_at=next_attempt_at,
            )

    def deliveries(self, job_id: str) -> builtins.list[WebhookDelivery]:
        """The job's webhook deliveries, oldest first (none if it asked for no callback)."""
        with self._db.read() as conn:
            return _deliveries_of(conn, job_id)

    def secret(self, project: str) -> str | None:
        """The project's webhook signing secret, or None when the project has no row."""
        with self._db.read() as conn:
            return _secret_of(conn, project)


def _claim_due(conn: Connection, now: datetime, limit: int, lease_s: float) -> list[WebhookDelivery]:
    """Lease up to `limit` pending deliveries due at `now` (oldest due first) until now + `lease_s`.

    The caller's transaction serialises claims: BEGIN IMMEDIATE on SQLite; on PostgreSQL the rows are
    locked FOR UPDATE SKIP LOCKED, so concurrent claimers take disjoint rows without waiting."""
    query = (
        select(webhook_deliveries.c.id)
        .where(
            webhook_deliveries.c.status == "pending",
            webhook_deliveries.c.next_attempt_at <= now,
            (webhook_deliveries.c.leased_until.is_(None)) | (webhook_deliveries.c.leased_until <= now),
        )
        .order_by(webhook_deliveries.c.next_attempt_at, webhook_deliveries.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = list(conn.scalars(query))
    if not ids:
        return []
    conn.execute(
        update(webhook_deliveries)
        .where(webhook_deliveries.c.id.in_(ids))
        .values(leased_until=now + timedelta(seconds=lease_s))
    )
    return _deliveries(conn, webhook_deliveries.c.id.in_(ids))


def _record_attempt(
    conn: Connection,
    delivery_id: str,
    now: datetime,
    *,
    ok: bool,
    status_code: int | None,
    error: str | None,
    seconds: float,
    next_attempt_at: datetime | None,
) -> WebhookDelivery | None:
    """Append one attempt to a pending delivery and move it on: delivered when `ok`, pending again at
    `next_attempt_at`, or failed for good when there is no next attempt. None if it is not pending."""
    current = conn.execute(
        select(webhook_deliveries.c.log)
        .where(webhook_deliveries.c.id == delivery_id, webhook_deliveries.c.status == "pending")
        .with_for_update()
    ).one_or_none()
    if current is None:
        return None
    entry = {"at": round(now.timestamp(), 3), "status_code": status_code, "error": error, "seconds": seconds}
    values: dict[str, Any] = {
        "attempts": webhook_deliveries.c.attempts + 1,
        "log": [*current.log, entry],
        "leased_until": None,
        "next_attempt_at": None,
    }
    if ok:
        values.update(status="delivered", delivered_at=now)
    elif next_attempt_at is None:
        values.update(status="failed")
    else:
        values.update(next_attempt_at=next_attempt_at)
    conn.execute(update(webhook_deliveries).where(webhook_deliveries.c.id == delivery_id).values(values))
    return _deliveries(conn, webhook_deliveries.c.id == delivery_id)[0]


def _deliveries_of(conn: Connection, job_id: str) -> list[WebhookDelivery]:
    """A job's deliveries, oldest first."""
    return _deliveries(conn, webhook_deliveries.c.job_id == job_id)


def _secret_of(conn: Connection, project: str) -> str | None:
    return conn.scalar(select(projects.c.webhook_secret).where(projects.c.name == project))


def _deliveries(conn: Connection, where: Any) -> list[WebhookDelivery]:
    query = (
        select(webhook_deliveries, jobs.c.project)
        .join(jobs, jobs.c.id == webhook_deliveries.c.job_id)
        .where(where)
        .order_by(webhook_deliveries.c.id)
    )
    return [WebhookDelivery(**row._asdict()) for row in conn.execute(query)]
