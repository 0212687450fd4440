"""Projects: their settings (quotas and policy), their API keys, and the quota math that admission and the
store read (GPU seconds of a job and of a project's day). The repository runs one transaction each on the
shared Database."""

from __future__ import annotations

import builtins
import contextlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat
from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from pipeline.stages import accelerator_seconds
from serve.auth import (
    ADMIN_ROLES,
    ROLES,
    ApiKeyRecord,
    AuthFailure,
    Caller,
    Role,
    hash_key,
    key_id_of,
    keys_match,
    new_api_key,
)
from serve.jobs.database import Database
from serve.jobs.models import RUNNING_STATUSES, JobStatus, utcnow
from serve.jobs.schema import api_keys, jobs, projects
from serve.numbers import whole_number

# a number > 0 (each member carries the bound, so the JSON schema states it as exclusiveMinimum)
PositiveSeconds = Annotated[StrictFloat, Field(gt=0)] | whole_number(gt=0)
LAST_USED_RESOLUTION = timedelta(minutes=1)  # `last_used_at` is written at most this often per key


BOOTSTRAP_KEY_NAMES = ("bootstrap", "bootstrap (PREVIZ_API_KEY)")


class ProjectSettings(BaseModel):
    """A project's quotas and policy (`PATCH /v1/admin/projects/{name}` changes them)."""

    model_config = ConfigDict(extra="forbid")

    max_queued_jobs: whole_number(ge=1) | None = Field(
        None,
        description="Most queued videos of the project at once; beyond it 429 `project_queue_full`.",
    )
    gpu_seconds_per_day: PositiveSeconds | None = Field(
        None,
        description="Accelerator seconds the project's videos may use per UTC day; beyond it 429 "
        "`gpu_quota_exceeded` until midnight UTC.",
    )
    retention_days: whole_number(ge=1, le=3650) | None = Field(
        None,
        description="Finished videos are deleted (clip, poster and record) this many days after they "
        "finish; their `expires_at` says when. Unset: kept until deleted.",
    )
    burn_label: StrictBool = Field(
        True,
        description="Burn 'AI-generated draft' into every clip; while true, `label: false` is refused "
        "(400 `label_required`).",
    )
    default_quality: Literal["draft", "final"] | None = Field(
        None,
        description="The tier of a video that names no `quality`; unset: `draft` for `interactive` and "
        "`final` for `batch` priority.",
    )
    default_fps: Literal[16, 24, 25] | None = Field(
        None,
        description="Frame rate of the project's clips when a request names none (the edit's rate, e.g. "
        "24); unset: 16, the model's own.",
    )


@dataclass(frozen=True, slots=True)
class ProjectRecord:
    name: str
    created_at: datetime
    settings: ProjectSettings
    webhook_secret: str  # HMAC-SHA256 key of the project's webhooks


class ProjectExists(Exception):
    """create_project() found the name taken (HTTP 409)."""


class LastAdminKey(Exception):
    """revoke_key() would leave a project without a usable admin key, or the studio without a usable
    studio_admin key (HTTP 409)."""

    def __init__(self, key: ApiKeyRecord, scope: str) -> None:
        super().__init__(key.id)
        self.key = key
        self.scope = scope  # what would be left without one, for people: "project 'x'" or "the studio"


class ProjectRepository:
    """Projects, API keys, and the per-project usage that quotas read."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create_project(self, name: str, settings: ProjectSettings | None = None) -> ProjectRecord:
        """A new project with a fresh webhook secret; ProjectExists if `name` is taken."""
        row = {
            "name": name,
            "created_at": utcnow(),
            "settings": (settings or ProjectSettings()).model_dump(),
            "webhook_secret": secrets.token_hex(32),
        }
        try:
            with self._db.write() as conn:
                if conn.execute(select(projects.c.name).where(projects.c.name == name)).first():
                    raise ProjectExists(name)
                conn.execute(insert(projects).values(row))
        except IntegrityError:
            raise ProjectExists(name) from None
        return _project(row)

    def get_project(self, name: str) -> ProjectRecord | None:
        with self._db.read() as conn:
            row = conn.execute(select(projects).where(projects.c.name == name)).one_or_none()
        return None if row is None else _project(row._asdict())

    def list_projects(self) -> builtins.list[ProjectRecord]:
        with self._db.read() as conn:
            return [
                _project(row._asdict()) for row in conn.execute(select(projects).order_by(projects.c.name))
            ]

    def update_project(self, name: str, changes: dict[str, Any]) -> ProjectRecord | None:
        """Merge `changes` (ProjectSettings fields) into the settings; None if no such project."""
        with self._db.write() as conn:
            row = conn.execute(
                select(projects).where(projects.c.name == name).with_for_update()
            ).one_or_none()
            if row is None:
                return None
            settings = ProjectSettings.model_validate({**row.settings, **changes})
            conn.execute(
                update(projects).where(projects.c.name == name).values(settings=settings.model_dump())
            )
        return _project({**row._asdict(), "settings": settings.model_dump()})

    def create_key(
        self, project: str, role: Role = "member", name: str | None = None, *, key: str | None = None
    ) -> tuple[ApiKeyRecord, str]:
        """A new key of `project` (which must exist): `(record, key)`; the key is not stored, only its hash.
        `key` sets the key instead of generating one (an operator's PREVIZ_API_KEY)."""
        if role not in ROLES:
            raise ValueError(f"`role` must be one of {', '.join(ROLES)} but is {role!r}.")
        if key is None:
            _, key = new_api_key()
        row = {
            "id": key_id_of(key),
            "project": project,
            "role": role,
            "key_hash": hash_key(key),
            "name": name,
            "created_at": utcnow(),
            "revoked_at": None,
            "last_used_at": None,
        }
        with self._db.write() as conn:
            conn.execute(insert(api_keys).values(row))
        return _key(row), key

    def list_keys(self, project: str) -> builtins.list[ApiKeyRecord]:
        query = select(api_keys).where(api_keys.c.project == project).order_by(api_keys.c.created_at)
        with self._db.read() as conn:
            return [_key(row._asdict()) for row in conn.execute(query)]

    def get_key(self, key_id: str) -> ApiKeyRecord | None:
        with self._db.read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one_or_none()
        return None if row is None else _key(row._asdict())

    def revoke_key(self, key_id: str) -> ApiKeyRecord | None:
        """Revoke a key for good (idempotent: the first revocation time stays); None if no such key.
        LastAdminKey if it is the last usable admin key of its project or studio_admin key of the studio."""
        now = utcnow()
        with self._db.write() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one_or_none()
            if row is None:
                return None
            if row.revoked_at is None and row.role in ADMIN_ROLES:
                _refuse_last_admin(conn, _key(row._asdict()))
            conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one()
        return _key(row._asdict())

    def rotate_key(self, key_id: str) -> tuple[ApiKeyRecord, str] | None:
        """Replace a usable key by a new one of the same project, role and name, and revoke the old one, in
        one transaction: `(new record, new key)`; None if no usable key has that id."""
        now = utcnow()
        with self._db.write() as conn:
            row = conn.execute(
                select(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .with_for_update()
            ).one_or_none()
            if row is None:
                return None
            new_id, key = new_api_key()
            fresh = {
                "id": new_id,
                "project": row.project,
                "role": row.role,
                "key_hash": hash_key(key),
                "name": row.name,
                "created_at": now,
                "revoked_at": None,
                "last_used_at": None,
            }
            conn.execute(insert(api_keys).values(fresh))
            conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=now))
        return _key(fresh), key

    def authenticate(self, key: str) -> Caller | AuthFailure:
        """The caller a key stands for, or why not: "unknown" (no such key) or "revoked"."""
        key_id = key_id_of(key)
        with self._db.read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one_or_none()
        if row is None or not keys_match(key, row.key_hash):
            return "unknown"
        if row.revoked_at is not None:
            return "revoked"
        now = utcnow()
        if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
            with self._db.write() as conn:
                conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(last_used_at=now))
        return Caller(project=row.project, role=row.role, key_id=row.id)

    def ensure_default_project(self, name: str = "default", key: str | None = None) -> str | None:
        """Bootstrap: make sure project `name` exists and the studio has a studio_admin key. With `key`
        (PREVIZ_API_KEY), that key becomes a studio_admin key of the project unless it is stored already.
        Without one, a studio_admin key is generated only when the studio has no usable one. Returns a
        key generated now (show it once), else None.

        A database of an earlier version knew no studio_admin role: its bootstrap keys (admin keys of
        `name` that the bootstrap made) become studio_admin keys, so the operator's key keeps managing
        every project."""
        if self.get_project(name) is None:
            with contextlib.suppress(ProjectExists):  # another process bootstrapped it meanwhile
                self.create_project(name)
        with self._db.write() as conn:
            if not _studio_admin_keys(conn):
                conn.execute(
                    update(api_keys)
                    .where(
                        api_keys.c.project == name,
                        api_keys.c.role == "admin",
                        api_keys.c.name.in_(BOOTSTRAP_KEY_NAMES),
                        api_keys.c.revoked_at.is_(None),
                    )
                    .values(role="studio_admin")
                )
        if key is not None:
            stored = self.get_key(key_id_of(key))
            if stored is None:
                self.create_key(name, "studio_admin", BOOTSTRAP_KEY_NAMES[1], key=key)
            return None
        with self._db.read() as conn:
            if _studio_admin_keys(conn):
                return None
        return self.create_key(name, "studio_admin", BOOTSTRAP_KEY_NAMES[0])[1]

    def gpu_seconds_today(self, project: str, *, now: datetime | None = None) -> float:
        """Accelerator seconds of the project's jobs that finished since 00:00 UTC today."""
        with self._db.read() as conn:
            return gpu_seconds_today(conn, project, now or datetime.now(UTC))


def gpu_seconds_today(conn: Connection, project: str, now: datetime) -> float:
    """Accelerator seconds the project used since 00:00 UTC of `now`'s day: those of its jobs that finished
    then (cancelled ones included, with the work done before the cancel), plus the stages its running jobs
    have completed so far (in-flight work counts before it has left)."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    finished = select(func.coalesce(func.sum(jobs.c.gpu_seconds), 0.0)).where(
        jobs.c.project == project,
        jobs.c.status >= JobStatus.SUCCEEDED,
        jobs.c.finished_at >= midnight,
    )
    running = select(jobs.c.timings).where(jobs.c.project == project, jobs.c.status.in_(RUNNING_STATUSES))
    in_flight = sum(gpu_seconds(timings or {}) for timings in conn.scalars(running))
    return float(conn.scalar(finished) or 0.0) + in_flight


def retention_of(conn: Connection, project: str) -> int | None:
    """The project's `retention_days` (None: keep finished videos until deleted)."""
    settings = conn.scalar(select(projects.c.settings).where(projects.c.name == project))
    return ProjectSettings.model_validate(settings or {}).retention_days


def _studio_admin_keys(conn: Connection) -> builtins.list[str]:
    query = select(api_keys.c.id).where(api_keys.c.role == "studio_admin", api_keys.c.revoked_at.is_(None))
    return list(conn.scalars(query))


def _refuse_last_admin(conn: Connection, key: ApiKeyRecord) -> None:
    """LastAdminKey unless another usable key keeps `key`'s project (and, for a studio_admin key, the
    studio) administered. The rows read are locked (PostgreSQL), so two revocations cannot both pass."""
    usable = api_keys.c.revoked_at.is_(None)
    project_admins = select(api_keys.c.id).where(
        usable, api_keys.c.project == key.project, api_keys.c.role.in_(ADMIN_ROLES)
    )
    if list(conn.scalars(project_admins.with_for_update())) == [key.id]:
        raise LastAdminKey(key, f"project {key.project!r}")
    if key.role == "studio_admin":
        studio_admins = select(api_keys.c.id).where(usable, api_keys.c.role == "studio_admin")
        if list(conn.scalars(studio_admins.with_for_update())) == [key.id]:
            raise LastAdminKey(key, "the studio")


def _project(row: dict[str, Any]) -> ProjectRecord:
    return ProjectRecord(
        name=row["name"],
        created_at=row["created_at"],
        settings=ProjectSettings.model_validate(row["settings"]),
        webhook_secret=row["webhook_secret"],
    )


def _key(row: dict[str, Any]) -> ApiKeyRecord:
    return ApiKeyRecord(**{field: row[field] for field in ApiKeyRecord.__slots__})


def gpu_seconds(timings: dict[str, float]) -> float:
    """Accelerator seconds of one job's run, from its stage timings."""
    return accelerator_seconds(timings)


def seconds_to_utc_midnight(now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((midnight - now).total_seconds() + 0.999))
