"""The job store's LUT looks: each project's named .cube LUTs, one row each (the file itself is in the
artifact store)."""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, insert, select, update

from serve.jobs.database import Database
from serve.jobs.models import utcnow
from serve.jobs.schema import luts


@dataclass(frozen=True, slots=True)
class LutRecord:
    """One registered look."""

    project: str
    name: str
    key: str  # the .cube file in the artifact store
    sha256: str  # of the file's bytes
    size: int  # LUT_3D_SIZE
    interpolation: str  # tetrahedral | trilinear
    created_at: datetime


class LutRepository:
    """A project's registered LUT looks, by name."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def put(
        self, project: str, name: str, *, key: str, sha256: str, size: int, interpolation: str
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

    def delete(self, project: str, name: str) -> LutRecord | None:
        """Unregister a look (None if there was none); its file stays for the jobs admitted with it."""
        record = self.get(project, name)
        if record is not None:
            with self._db.write() as conn:
                conn.execute(delete(luts).where(luts.c.project == project, luts.c.name == name))
        return record
