"""Shared fixtures: real servers (and the Ray cluster) started once per test session."""

from collections.abc import Iterator

import pytest

from tests.cluster import Cluster, previz_cluster
from tests.job_stores import postgres_database, store, store_url
from tests.servers.fixtures import s3_server
from tests.servers.postgres import postgres_server

__all__ = ["cluster", "postgres_database", "postgres_server", "s3_server", "store", "store_url"]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3_server) -> Iterator[Cluster]:
    """The Previz app on one local Ray instance for the whole session."""
    with previz_cluster(tmp_path_factory.mktemp("cluster"), s3_server) as running:
        yield running
