"""The job store's projects and API keys (a mixin of JobStore: the same engine, one transaction each)."""

from __future__ import annotations

import builtins
import contextlib
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from serve.auth import (
    ROLES,
    ApiKeyRecord,
    AuthFailure,
    Caller,
    ProjectRecord,
    ProjectSettings,
    Role,
    hash_key,
    key_id_of,
    keys_match,
    new_api_key,
)
from serve.jobs.models import JobStatus, utcnow
from serve.jobs.schema import api_keys, jobs, projects

LAST_USED_RESOLUTION = timedelta(minutes=1)  # `last_used_at` is written at most this often per key


class ProjectExists(Exception):
    """create_project() found the name taken (HTTP 409)."""


class ProjectStoreMixin:
    """Projects, API keys, and the per-project usage that quotas read."""

    _read: Any  # provided by JobStore: context managers yielding one transaction's Connection
    _write: Any

    def create_project(self, name: str, settings: ProjectSettings | None = None) -> ProjectRecord:
        """A new project with a fresh webhook secret; ProjectExists if `name` is taken."""
        row = {
            "name": name,
            "created_at": utcnow(),
            "settings": (settings or ProjectSettings()).model_dump(),
            "webhook_secret": secrets.token_hex(32),
        }
        try:
            with self._write() as conn:
                if conn.execute(select(projects.c.name).where(projects.c.name == name)).first():
                    raise ProjectExists(name)
                conn.execute(insert(projects).values(row))
        except IntegrityError:
            raise ProjectExists(name) from None
        return _project(row)

    def get_project(self, name: str) -> ProjectRecord | None:
        with self._read() as conn:
            row = conn.execute(select(projects).where(projects.c.name == name)).one_or_none()
        return None if row is None else _project(row._asdict())

    def list_projects(self) -> builtins.list[ProjectRecord]:
        with self._read() as conn:
            return [
                _project(row._asdict()) for row in conn.execute(select(projects).order_by(projects.c.name))
            ]

    def update_project(self, name: str, changes: dict[str, Any]) -> ProjectRecord | None:
        """Merge `changes` (ProjectSettings fields) into the settings; None if no such project."""
        with self._write() as conn:
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
            raise ValueError(f"`role` must be 'member' or 'admin' but is {role!r}.")
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
        with self._write() as conn:
            conn.execute(insert(api_keys).values(row))
        return _key(row), key

    def list_keys(self, project: str) -> builtins.list[ApiKeyRecord]:
        query = select(api_keys).where(api_keys.c.project == project).order_by(api_keys.c.created_at)
        with self._read() as conn:
            return [_key(row._asdict()) for row in conn.execute(query)]

    def get_key(self, key_id: str) -> ApiKeyRecord | None:
        with self._read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one_or_none()
        return None if row is None else _key(row._asdict())

    def revoke_key(self, key_id: str) -> ApiKeyRecord | None:
        """Revoke a key for good (idempotent: the first revocation time stays); None if no such key."""
        now = utcnow()
        with self._write() as conn:
            conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one_or_none()
        return None if row is None else _key(row._asdict())

    def authenticate(self, key: str) -> Caller | AuthFailure:
        """The caller a key stands for, or why not: "unknown" (no such key) or "revoked"."""
        key_id = key_id_of(key)
        with self._read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one_or_none()
        if row is None or not keys_match(key, row.key_hash):
            return "unknown"
        if row.revoked_at is not None:
            return "revoked"
        now = utcnow()
        if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
            with self._write() as conn:
                conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(last_used_at=now))
        return Caller(project=row.project, role=row.role, key_id=row.id)

    def ensure_default_project(self, name: str = "default", key: str | None = None) -> str | None:
        """Bootstrap: make sure project `name` exists with an admin key. With `key` (PREVIZ_API_KEY), that
        key becomes an admin key of the project unless it is stored already. Without one, an admin key is
        generated only when the project has no usable admin key. Returns a key generated now (show it
        once), else None."""
        if self.get_project(name) is None:
            with contextlib.suppress(ProjectExists):  # another process bootstrapped it meanwhile
                self.create_project(name)
        if key is not None:
            stored = self.get_key(key_id_of(key))
            if stored is None:
                self.create_key(name, "admin", "bootstrap (PREVIZ_API_KEY)", key=key)
            return None
        if any(k.role == "admin" and k.revoked_at is None for k in self.list_keys(name)):
            return None
        return self.create_key(name, "admin", "bootstrap")[1]

    def gpu_seconds_today(self, project: str, *, now: datetime | None = None) -> float:
        """Accelerator seconds of the project's jobs that finished since 00:00 UTC today."""
        with self._read() as conn:
            return gpu_seconds_today(conn, project, now or datetime.now(UTC))


def gpu_seconds_today(conn: Connection, project: str, now: datetime) -> float:
    """Accelerator seconds of the project's jobs that finished since 00:00 UTC of `now`'s day."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    query = select(func.coalesce(func.sum(jobs.c.gpu_seconds), 0.0)).where(
        jobs.c.project == project,
        jobs.c.status >= JobStatus.SUCCEEDED,
        jobs.c.finished_at >= midnight,
    )
    return float(conn.scalar(query) or 0.0)


def _project(row: dict[str, Any]) -> ProjectRecord:
    return ProjectRecord(
        name=row["name"],
        created_at=row["created_at"],
        settings=ProjectSettings.model_validate(row["settings"]),
        webhook_secret=row["webhook_secret"],
    )


def _key(row: dict[str, Any]) -> ApiKeyRecord:
    return ApiKeyRecord(**{field: row[field] for field in ApiKeyRecord.__slots__})
