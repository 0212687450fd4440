"""The job store's tables (SQLAlchemy Core): `jobs`, one row per job, and `job_events`, its log.

Statuses are stored as integers so SQL can compare stages; timestamps come back timezone-aware UTC on
both backends; JSON columns are JSONB on PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    Connection,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    inspect,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from serve.jobs.models import JobStatus


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out on both backends (SQLite keeps naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"Timestamps must be timezone-aware but {value.isoformat()} is naive.")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class StatusType(TypeDecorator[JobStatus]):
    """JobStatus stored as its integer, so SQL can compare stages (`status < SUCCEEDED`)."""

    impl = SmallInteger
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Any) -> int | None:
        return None if value is None else int(JobStatus(value))

    def process_result_value(self, value: int | None, dialect: Any) -> JobStatus | None:
        return None if value is None else JobStatus(value)


JSONDoc = JSON().with_variant(JSONB(), "postgresql")
metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("project", String(200), nullable=False),
    Column("priority", String(16), nullable=False),
    Column("request", JSONDoc, nullable=False),
    Column("bucket", String(64), nullable=False),
    Column("status", StatusType, nullable=False),
    Column("stage_progress", Float, nullable=False),
    Column("progress", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("claimed_by", String(200)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("timings", JSONDoc, nullable=False),
    Column("error_code", String(64)),
    Column("error_message", Text),
    Column("artifact_uri", Text),
    Column("artifact_bytes", BigInteger),
    Column("idempotency_key", String(255)),
    Column("labels", JSONDoc, nullable=False),
    Column("seed", BigInteger),
    Column("deadline", UTCDateTime),
    Column("storyboard_id", String(200), index=True),
    # Accelerator seconds the job spent (denoise, decode, upscale), written when it finishes: GPU quotas.
    Column("gpu_seconds", Float),
    # Denoise state saved at the expert boundary (key in the artifact store): a rerun resumes from it.
    Column("checkpoint_uri", Text),
    # The clip's JPEG poster frame (key in the artifact store), written with the clip.
    Column("poster_uri", Text),
    # Set when a finished job is deleted (DELETE /v1/videos/{id}): the row stays for quotas and audit.
    Column("deleted_at", UTCDateTime),
    # While a running job waits in its stage replica's queue (a denoiser engine before its first step, the
    # decoder's or upscaler's line): how many requests are ahead of it (the API shows it as `queued` with
    # this queue position and `waiting_for` its stage). Every advance() rewrites it.
    Column("engine_queue_position", Integer),
    # The final-tier job promoted from this draft (POST /v1/videos/{id}/promote); set once, in the
    # transaction that creates it (the promoted job's request names its draft: `promoted_from`).
    Column("promoted_to", String(40)),
    # When the running job is predicted to finish, re-predicted after each denoising step from the step
    # times measured for its bucket and tier (the API shows `eta_seconds`).
    Column("eta_at", UTCDateTime),
    # The take's number within its board's shot, 1, 2, ... in creation order (a promoted final is a new
    # take); set in the transaction that creates the job, never reused. None: a video of no board.
    Column("take", Integer),
    # The take's review (serve.jobs.reviews): approved | rejected | needs-changes; None: pending. Who set it
    # last (the API key's name, else its id) and when; each change is also in the job's event log.
    Column("review", String(16)),
    Column("review_by", String(200)),
    Column("review_at", UTCDateTime),
    # A chained shot's take (`continue` on a board): the index of the board's shot it continues. While set,
    # the job waits (queued, never claimed); the Scheduler clears it once it stored the predecessor take's
    # last frame as the job's first keyframe (serve.scheduling.continuity).
    Column("continues_shot", Integer),
    UniqueConstraint("project", "idempotency_key", name="uq_jobs_project_idempotency_key"),
    Index("ix_jobs_status_id", "status", "id"),  # queued(), counts, requeue
    Index("ix_jobs_project_id", "project", "id"),  # list(project=...) pages
    CheckConstraint("priority IN ('interactive', 'batch')", name="ck_jobs_priority"),
    CheckConstraint("progress BETWEEN 0 AND 100", name="ck_jobs_progress"),
)

# Nullable columns added to `jobs` after its first release: create_schema() adds the ones an older database
# lacks (ALTER TABLE ... ADD COLUMN), so a store made by an earlier version keeps working.
ADDED_JOB_COLUMNS: tuple[str, ...] = (
    "poster_uri",
    "deleted_at",
    "engine_queue_position",
    "promoted_to",
    "eta_at",
    "take",
    "review",
    "review_by",
    "review_at",
    "continues_shot",
)

job_events = Table(
    "job_events",
    metadata,
    # INTEGER PRIMARY KEY AUTOINCREMENT on SQLite: ids are never reused, so stream cursors stay valid.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("job_id", String(40), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("data", JSONDoc, nullable=False),
    Index("ix_job_events_job_id_id", "job_id", "id"),
    sqlite_autoincrement=True,
)

storyboards = Table(
    "storyboards",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("project", String(200), nullable=False),
    Column("title", String(200)),
    Column("request", JSONDoc, nullable=False),
    Column("num_jobs", Integer, nullable=False),
    Column("idempotency_key", String(255)),
    Column("created_at", UTCDateTime, nullable=False),
    # The editor's choices: {"order": [shot index, ...] | null, "takes": {"<shot index>": video id}}.
    Column("edit", JSONDoc),
    # The last cut rendered from them (serve.jobs.storyboard.CutRecord as JSON): its mp4, clips and rate.
    Column("cut", JSONDoc),
    UniqueConstraint("project", "idempotency_key", name="uq_storyboards_project_idempotency_key"),
)

# Nullable columns added to `storyboards` after its first release (added by create_schema like the jobs').
ADDED_STORYBOARD_COLUMNS: tuple[str, ...] = ("edit", "cut")

take_notes = Table(
    "take_notes",
    metadata,
    # Review notes on a take (POST /v1/videos/{id}/notes), oldest first; they go with the take's row.
    Column("id", String(40), primary_key=True),  # "note_" + 24 hex; sorts by creation time
    Column("job_id", String(40), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("author", String(200), nullable=False),  # the API key's name (its id when it has none)
    Column("key_id", String(40), nullable=False),  # the key that wrote it (audit)
    Column("text", Text, nullable=False),
    Column("frame", Integer),  # at the take's own delivered rate, 0-based; None: the whole take
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_take_notes_job_id_id", "job_id", "id"),
)

cut_jobs = Table(
    "cut_jobs",
    metadata,
    # A storyboard's cut as a durable job (serve.jobs.cuts): the Scheduler claims it and the Finisher renders
    # it; on success its CutRecord becomes the board's `cut` in the same transaction.
    Column("id", String(40), primary_key=True),  # "cut_" + 16 hex: also the id of the cut it renders
    Column("storyboard_id", String(40), nullable=False),
    Column("project", String(200), nullable=False),
    Column("status", String(16), nullable=False),  # queued | running | succeeded | failed | cancelled
    Column("progress", Float, nullable=False),  # 0..1: clips rendered / clips
    Column("attempt", Integer, nullable=False),  # claims so far: the fence of every update
    Column("claimed_by", String(200)),
    Column("request", JSONDoc, nullable=False),  # serve.jobs.cuts.CutRequest: the takes, rate, size, slates
    Column("error_code", String(64)),
    Column("error_message", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("eta_at", UTCDateTime),  # predicted end while running, from the clips done so far
    Index("ix_cut_jobs_storyboard_id", "storyboard_id", "id"),
    Index("ix_cut_jobs_status_id", "status", "id"),
    CheckConstraint(
        "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="ck_cut_jobs_status"
    ),
)

projects = Table(
    "projects",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("created_at", UTCDateTime, nullable=False),
    # Quotas and policy: {"max_queued_jobs": int|None, "gpu_seconds_per_day": float|None,
    # "burn_label": bool}; absent keys mean the defaults.
    Column("settings", JSONDoc, nullable=False),
    Column("webhook_secret", String(128), nullable=False),  # HMAC-SHA256 key of this project's webhooks
)

luts = Table(
    "luts",
    metadata,
    # A project's named .cube looks; the file lives in the artifact store under `key` (its sha256 in the
    # name, so a job keeps the version it was admitted with when the name is re-registered).
    Column("project", String(64), ForeignKey("projects.name", ondelete="CASCADE"), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("key", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("size", Integer, nullable=False),  # LUT_3D_SIZE
    Column("interpolation", String(16), nullable=False),  # tetrahedral | trilinear
    Column("created_at", UTCDateTime, nullable=False),
    CheckConstraint("interpolation IN ('tetrahedral', 'trilinear')", name="ck_luts_interpolation"),
)

# A database of an earlier version checks `role IN ('member', 'admin')`: create_schema replaces it.
ROLE_CHECK = "role IN ('member', 'admin', 'studio_admin')"

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),  # public part of the key, safe to log and show
    Column("project", String(64), ForeignKey("projects.name", ondelete="CASCADE"), nullable=False),
    Column("role", String(16), nullable=False),
    Column("key_hash", String(128), nullable=False),  # sha256 of the key; the key is never stored
    Column("name", String(200)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime),
    Column("last_used_at", UTCDateTime),
    Index("ix_api_keys_project", "project"),
    CheckConstraint(ROLE_CHECK, name="ck_api_keys_role"),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    # One row per (job, event) to deliver: written in the transaction that finishes the job (an outbox).
    Column("id", String(40), primary_key=True),  # "whd_" + 24 hex, sorts by creation; Previz-Delivery
    Column("job_id", String(40), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("event", String(64), nullable=False),  # video.completed | video.failed | video.cancelled
    Column("url", Text, nullable=False),
    Column("payload", JSONDoc, nullable=False),
    Column("status", String(16), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UTCDateTime),
    Column("leased_until", UTCDateTime),  # a dispatcher owns the row until then
    Column("log", JSONDoc, nullable=False),  # [{at, status_code, error, seconds}] per attempt
    Column("created_at", UTCDateTime, nullable=False),
    Column("delivered_at", UTCDateTime),
    Index("ix_webhook_deliveries_job_id", "job_id"),
    Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),
)

# Keys of PostgreSQL transaction-level advisory locks (any int64; these spell ASCII tags).
SCHEMA_LOCK_KEY = int.from_bytes(b"pvz-schm")
QUEUE_LOCK_KEY = int.from_bytes(b"pvz-queu")


def widen_role_check(conn: Connection) -> None:
    """Replace the role check of an earlier version's `api_keys` (member, admin) by ROLE_CHECK. SQLite
    cannot alter a constraint, so there the table is copied into one made by today's schema."""
    checks = inspect(conn).get_check_constraints("api_keys")
    if any("studio_admin" in check["sqltext"] for check in checks):
        return
    if conn.dialect.name == "postgresql":
        conn.execute(text("ALTER TABLE api_keys DROP CONSTRAINT IF EXISTS ck_api_keys_role"))
        conn.execute(text(f"ALTER TABLE api_keys ADD CONSTRAINT ck_api_keys_role CHECK ({ROLE_CHECK})"))
        return
    columns = ", ".join(column.name for column in api_keys.columns)
    conn.execute(text("ALTER TABLE api_keys RENAME TO api_keys_before_roles"))
    conn.execute(text("DROP INDEX IF EXISTS ix_api_keys_project"))
    api_keys.create(conn)
    conn.execute(text(f"INSERT INTO api_keys ({columns}) SELECT {columns} FROM api_keys_before_roles"))
    conn.execute(text("DROP TABLE api_keys_before_roles"))
