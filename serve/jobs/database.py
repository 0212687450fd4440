"""The job store's database: one SQLAlchemy engine (SQLite file in WAL mode, or PostgreSQL), its
transactions and its schema. Every repository (jobs, storyboards, projects, LUTs, the webhook outbox)
runs its statements in the transactions this object hands out; nothing here knows what a job is.

Locking: on SQLite every writing transaction starts with BEGIN IMMEDIATE (one writer at a time, the
others wait up to `busy_timeout_s`); on PostgreSQL (READ COMMITTED) rows are locked with
SELECT ... FOR UPDATE and bounded creates serialise on a transaction-level advisory lock (`serialise`).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection, Engine, create_engine, event, func, inspect, select, text
from sqlalchemy.engine import make_url

from serve.jobs.schema import (
    ADDED_JOB_COLUMNS,
    ADDED_STORYBOARD_COLUMNS,
    SCHEMA_LOCK_KEY,
    jobs,
    metadata,
    storyboards,
    widen_role_check,
)

logger = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///previz-jobs.db"


class Database:
    """One database's engine and transactions. Thread-safe and multi-process-safe; holds only an engine."""

    def __init__(self, url: str = DEFAULT_URL, *, busy_timeout_s: float = 30.0) -> None:
        """Connect lazily to `url`: `sqlite:///path.db` (file; its folder is created) or
        `postgresql+psycopg://user@host/db` (`postgresql://` means psycopg 3 too).

        `busy_timeout_s`: how long a SQLite writer waits for another one before failing.
        """
        self._engine = _create_engine(url, busy_timeout_s)
        self.backend: Literal["sqlite", "postgresql"] = self._engine.dialect.name  # type: ignore[assignment]
        # Writers: SQLite takes the write lock at BEGIN, so a read-then-write transaction never fails
        # half-way with SQLITE_BUSY; readers use plain BEGIN (WAL readers do not block the writer).
        self._writer = self._engine.execution_options(previz_sqlite_begin="BEGIN IMMEDIATE")

    def create_schema(self) -> None:
        """Create the tables and indexes that do not exist yet, and add what a database of an earlier
        version lacks: nullable columns (ADDED_JOB_COLUMNS) and key roles. Idempotent, and safe when the
        Ingress and the Scheduler call it at the same time."""
        with self.write() as conn:
            self.serialise(conn, SCHEMA_LOCK_KEY)
            metadata.create_all(conn)
            for table, added in ((jobs, ADDED_JOB_COLUMNS), (storyboards, ADDED_STORYBOARD_COLUMNS)):
                present = {column["name"] for column in inspect(conn).get_columns(table.name)}
                for name in added:
                    if name not in present:
                        kind = table.c[name].type.compile(dialect=conn.dialect)
                        conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {name} {kind}"))
            widen_role_check(conn)

    def close(self) -> None:
        """Close the pooled connections (the database can still be used afterwards: it reconnects)."""
        self._engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One writing transaction: commit on exit, roll back on an exception."""
        with self._writer.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """One reading transaction (WAL readers do not wait for the writer)."""
        with self._engine.begin() as conn:
            yield conn

    def serialise(self, conn: Connection, key: int) -> None:
        """On PostgreSQL, hold the advisory lock `key` until `conn`'s transaction ends, so transactions
        that take it run one at a time (on SQLite every writer already does)."""
        if self.backend == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(key)))


def _create_engine(url: str, busy_timeout_s: float) -> Engine:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, pool_pre_ping=True)
    if backend != "sqlite":
        raise ValueError(
            f"The job store runs on SQLite or PostgreSQL but got a {backend!r} URL; "
            "use sqlite:///path/jobs.db or postgresql+psycopg://user@host:5432/db."
        )
    if parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory":
        raise ValueError(
            f"The job store needs a SQLite file shared by all processes but {url!r} is in memory; "
            "use sqlite:///path/jobs.db."
        )
    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed)
    busy_timeout_ms = int(busy_timeout_s * 1000)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN (below) instead of the sqlite3 module, which would defer it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        _enable_wal(cursor, busy_timeout_s)  # readers and one writer concurrently
        cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: a power loss can only drop the tail
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("previz_sqlite_begin", "BEGIN"))

    return engine


def _enable_wal(cursor: sqlite3.Cursor, timeout_s: float) -> None:
    """Switch the database file to WAL (persistent; a no-op once done). The first switch needs the file
    to itself and SQLite reports "locked" at once instead of waiting, e.g. when the Ingress and the
    Scheduler open a new file at the same moment: retry until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    if mode != "wal":  # e.g. a network file system: still correct, but readers wait for writers
        logger.warning("SQLite job store runs in journal mode %r: WAL is not available here", mode)
