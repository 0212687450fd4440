"""Shared fixtures: real servers (and the Ray cluster) started once per test session."""

from collections.abc import Iterator

import pytest

from tests.support.cluster import Cluster, previz_cluster
from tests.support.job_stores import postgres_database, store, store_url
from tests.support.servers.fixtures import s3_server
from tests.support.servers.postgres import postgres_server

__all__ = ["cluster", "postgres_database", "postgres_server", "s3_server", "store", "store_url"]


# marker -> the session fixtures whose real server it means; a test using one (directly or through another
# fixture) gets the marker, so `pytest -m "not cluster"` or `-m "not postgres and not s3"` selects by need.
SERVER_MARKERS: dict[str, tuple[str, ...]] = {
    "postgres": ("postgres_server", "postgres_database"),
    "s3": ("s3_server",),
    "cluster": ("cluster",),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("store_url") == "postgresql":
            fixtures.add("postgres_server")
        for marker, needs in SERVER_MARKERS.items():
            if fixtures.intersection(needs) and marker not in item.keywords:
                item.add_marker(marker)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3_server) -> Iterator[Cluster]:
    """The Previz app on one local Ray instance for the whole session."""
    with previz_cluster(tmp_path_factory.mktemp("cluster"), s3_server) as running:
        yield running
