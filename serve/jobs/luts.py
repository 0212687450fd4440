"""The job store's LUT looks: each project's named .cube LUTs, one row each (the file itself is in the
artifact store)."""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, insert, select, update

from pipeline.lut import Interpolation
from serve.jobs.database import Database
from serve.jobs.models import JobStatus, utcnow
from serve.jobs.request import JobRequest
from serve.jobs.schema import jobs, luts


@dataclass(frozen=True, slots=True)
class LutRecord:
    """One registered look."""

    project: str
    name: str
    key: str  # the .cube file in the artifact store
    sha256: str  # of the file's bytes
    size: int  # LUT_3D_SIZE
    interpolation: Interpolation
    created_at: datetime


class LutRepository:
    """A project's registered LUT looks, by name."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def put(
        self, project: str, name: str, *, key: str, sha256: str, size: int, interpolation: Interpolation
    ) -> tuple[LutRecord, bool]:
        """Register (or replace) `project`'s look `name`: `(record, created)`, created False on a
        replacement. The previous file is the caller's to delete once no job needs it."""
        row = {
            "key": key,
            "sha256": sha256,
            "size": size,
            "interpolation": interpolation,
            "created_at": utcnow(),
        }
        where = (luts.c.project == project, luts.c.name == name)
        with self._db.write() as conn:
            exists = conn.execute(select(luts.c.name).where(*where).with_for_update()).first() is not None
            if exists:
                conn.execute(update(luts).where(*where).values(row))
            else:
                conn.execute(insert(luts).values({"project": project, "name": name, **row}))
        return LutRecord(project=project, name=name, **row), not exists

    def get(self, project: str, name: str) -> LutRecord | None:
        with self._db.read() as conn:
            row = conn.execute(
                select(luts).where(luts.c.project == project, luts.c.name == name)
            ).one_or_none()
        return None if row is None else LutRecord(**row._asdict())

    def list(self, project: str) -> builtins.list[LutRecord]:
        query = select(luts).where(luts.c.project == project).order_by(luts.c.name)
        with self._db.read() as conn:
            return [LutRecord(**row._asdict()) for row in conn.execute(query)]

    def keys_in_use(self, project: str) -> set[str]:
        """The LUT files of `project` something still needs: its registered looks' files, and those of its
        unfinished jobs (each keeps the version it was admitted with, also once replaced or unregistered)."""
        with self._db.read() as conn:
            query = select(luts.c.key).where(luts.c.project == project)
            registered = {row.key for row in conn.execute(query)}
            unfinished = conn.execute(
                select(jobs.c.request).where(jobs.c.project == project, jobs.c.status < JobStatus.SUCCEEDED)
            ).all()
        admitted = {JobRequest.from_stored(row.request).finish.lut for row in unfinished}
        return registered | {ref.key for ref in admitted if ref is not None}

    def delete(self, project: str, name: str) -> LutRecord | None:
        """Unregister a look (None if there was none); its file stays for the jobs admitted with it, until
        the orphan sweep (serve.jobs.retention) finds none needs it."""
        record = self.get(project, name)
        if record is not None:
            with self._db.write() as conn:
                conn.execute(delete(luts).where(luts.c.project == project, luts.c.name == name))
        return record
