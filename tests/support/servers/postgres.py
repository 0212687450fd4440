"""A real PostgreSQL server for tests: the one at $PREVIZ_TEST_POSTGRES_URL (default: the local one).

Nothing is started here: dev machines and CI run PostgreSQL on 127.0.0.1:5432 (trust auth). A test session
creates throwaway databases `previz_test_<random>` on it and drops them at the end:

    def test_x(postgres_server):
        url = postgres_server.create_database()  # postgresql+psycopg://postgres@127.0.0.1:5432/previz_test_1a2b...
        url = postgres_server.create_schema(url)  # the same database, a fresh empty schema on the search_path

An unreachable server fails the tests that need it (it does not skip them).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import OperationalError

ENV_VAR = "PREVIZ_TEST_POSTGRES_URL"
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CONNECT_TIMEOUT_S = 5


class PostgresServer:
    """A reachable PostgreSQL server and the throwaway databases this test session made on it."""

    def __init__(self, url: str) -> None:
        self.url = _with_psycopg(make_url(url))  # where CREATE/DROP DATABASE are issued
        self._admin: Engine = create_engine(
            self.url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": CONNECT_TIMEOUT_S}
        )
        self._databases: list[str] = []  # created by this session, dropped by close()

    def check(self) -> None:
        """Raise RuntimeError with a fix if the server cannot be reached or refuses CREATE DATABASE."""
        where = self.url.render_as_string(hide_password=True)
        try:
            with self._admin.connect() as conn:
                can_create = conn.scalar(
                    text("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")
                )
        except OperationalError as error:
            raise RuntimeError(
                f"PostgreSQL is not reachable at {where}: {error.orig}. Start it (CI and dev machines run "
                f"one on 127.0.0.1:5432) or point ${ENV_VAR} at one, e.g. postgresql+psycopg://user@host/db."
            ) from None
        if not can_create:
            raise RuntimeError(f"The role of {where} may not create databases; the tests need CREATEDB.")

    def create_database(self) -> str:
        """A new empty database; returns its URL (password included)."""
        name = f"previz_test_{secrets.token_hex(6)}"
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self._databases.append(name)
        return self.url.set(database=name).render_as_string(hide_password=False)

    def create_schema(self, database_url: str) -> str:
        """A new empty schema in the database at `database_url`; returns a URL whose connections use it
        (first on their search_path), so unqualified tables land there and nowhere else."""
        name = f"t_{secrets.token_hex(6)}"
        url = make_url(database_url)
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE SCHEMA "{name}"'))
        finally:
            engine.dispose()
        return url.update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(
            hide_password=False
        )

    def close(self) -> None:
        """Drop this session's databases (disconnecting leftover clients) and close the admin pool."""
        with self._admin.connect() as conn:
            for name in self._databases:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self._databases.clear()
        self._admin.dispose()


def _with_psycopg(url: URL) -> URL:
    """`postgresql://` means psycopg 3 here (SQLAlchemy's default driver, psycopg2, is not installed)."""
    return url.set(drivername="postgresql+psycopg") if url.drivername == "postgresql" else url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The PostgreSQL server of $PREVIZ_TEST_POSTGRES_URL for the whole session; tests isolate themselves
    with `create_database()` / `create_schema()`. Unreachable: the requesting tests fail with the fix."""
    server = PostgresServer(os.environ.get(ENV_VAR, DEFAULT_URL))
    problem: str | None = None
    try:
        server.check()
    except RuntimeError as error:
        problem = str(error)
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    yield server
    server.close()
