"""The durable job store: every video job, its state machine and its event log, in SQL.

SQLite (one file, WAL) by default, PostgreSQL by URL. Several processes open the same database at once
(the Ingress and the Scheduler replicas), so nothing here caches rows: every state change is one short
transaction whose UPDATE is conditional on the state it expects (`status = QUEUED`, `attempt = :attempt`)
and writes its event row in that same transaction. Methods return frozen records, never live rows.

    store = open_job_store("sqlite:///previz-jobs.db")   # serve.webhooks: JobStore(url, webhook_body=...)
    store.create_schema()
    job, created = store.create("dune", "interactive", request, idempotency_key="shot-12")  # a JobRequest
    job = store.claim(job.id, "scheduler-0")                   # QUEUED -> ENCODING, attempt 1
    store.advance(job.id, job.attempt, JobStatus.DENOISING_HIGH, stage_progress=0.5)
    store.succeed(job.id, job.attempt, artifact_uri="s3://clips/vid_....mp4", artifact_bytes=812_331)

The store is a Database (database.py) shared by small repositories (jobs, transitions, storyboards,
projects, luts, outbox) under the JobStore façade (store.py), whose methods are theirs. Stored JSON is
typed and versioned (JobRequest, StoryboardRecord): rows of earlier formats are upgraded on read.

Fencing: `attempt` counts claims. A pipeline task carries the attempt it was started under; once its job
is requeued (scheduler restart) or claimed again, the task's updates no longer match and are ignored
(the methods return False), so a task of an old scheduler incarnation never overwrites a newer run.

Locking: on SQLite every writing transaction starts with BEGIN IMMEDIATE (one writer at a time, the
others wait up to `busy_timeout_s`); on PostgreSQL (READ COMMITTED) rows are locked with
SELECT ... FOR UPDATE and bounded creates serialise on a transaction-level advisory lock.
"""

from serve.jobs.models import (
    PROGRESS_BANDS,
    RUNNING_STATUSES,
    AlreadyPromoted,
    ApiState,
    CancelResult,
    EventKind,
    GpuQuotaExceeded,
    JobEvent,
    JobRecord,
    JobStatus,
    Priority,
    QueueFull,
    new_job_id,
    new_storyboard_id,
)
from serve.jobs.request import JobRequest
from serve.jobs.store import DEFAULT_URL, JobStore
from serve.jobs.storyboard import CutRecord, StoryboardEdit, StoryboardRecord, StoryboardRequest

__all__ = [
    "AlreadyPromoted",
    "DEFAULT_URL",
    "PROGRESS_BANDS",
    "RUNNING_STATUSES",
    "ApiState",
    "CancelResult",
    "CutRecord",
    "EventKind",
    "GpuQuotaExceeded",
    "JobEvent",
    "JobRecord",
    "JobRequest",
    "JobStatus",
    "JobStore",
    "Priority",
    "QueueFull",
    "StoryboardEdit",
    "StoryboardRecord",
    "StoryboardRequest",
    "new_job_id",
    "new_storyboard_id",
]
