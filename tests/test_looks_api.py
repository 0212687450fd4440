"""`GET /v1/looks` (issue 28): the composer's look field offers the project's LUTs, read with any key of
the project; another project's LUTs are not among them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.api_app import LocalApi, local_api
from tests.test_editorial_api import warm_cube


@pytest.fixture
def api(tmp_path: Path) -> Iterator[LocalApi]:
    with local_api(tmp_path) as running:
        yield running


def test_a_member_reads_the_builtin_looks_and_its_projects_luts(api: LocalApi) -> None:
    assert (
        api.client.put("/v1/admin/projects/default/luts/warm", json={"cube": warm_cube()}).status_code == 201
    )
    member = api.client_with(api.key_for("default", "member"))
    looks = member.get("/v1/looks").json()["data"]
    assert looks == [
        {"name": "none", "kind": "builtin"},
        {"name": "film", "kind": "builtin"},
        {"name": "warm", "kind": "lut"},
    ]
    other = api.client_with(api.key_for("other", "member")).get("/v1/looks").json()["data"]
    assert [look["name"] for look in other] == ["none", "film"]
    assert api.client_with(None).get("/v1/looks").status_code == 401
