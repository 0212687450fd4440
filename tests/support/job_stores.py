"""A job store on each backend for the store-level tests: a fresh SQLite file, a fresh PostgreSQL schema.

tests/conftest.py exports these fixtures to every test module; a module may define its own `store`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve.jobs import JobStore
from serve.webhooks import open_job_store
from tests.support.servers.postgres import PostgresServer


@pytest.fixture(scope="module")
def postgres_database(postgres_server: PostgresServer) -> str:
    """One throwaway database per test module; each test gets its own schema in it."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database of each backend (a fresh SQLite file, a fresh PostgreSQL schema)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'jobs.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_schema(request.getfixturevalue("postgres_database"))


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    """An empty job store at `store_url`, its tables created."""
    store = open_job_store(store_url)
    store.create_schema()
    yield store
    store.close()


def copy_of_database(database_file: Path, tmp_path: Path) -> tuple[JobStore, str]:
    """A copy of a committed SQLite database (an earlier version's), opened and upgraded by today's store,
    and its URL; the committed file stays as it is."""
    path = tmp_path / database_file.name
    shutil.copy(database_file, path)
    url = f"sqlite:///{path}"
    store = open_job_store(url)
    store.create_schema()
    return store, url
