"""Schemathesis explores the app's own OpenAPI (bodies, queries, headers, paths) and finds no 5xx."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from serve.http.app import app
from tests.api_app import local_api

schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module")
def running_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The admin key of the app's "default" project: requests get past authentication."""
    with local_api(tmp_path_factory.mktemp("schemathesis")) as api:
        yield api.admin_key


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_the_schema_allows_gets_a_server_error(case, running_api: str) -> None:
    response = case.call(headers={"Authorization": f"Bearer {running_api}"})
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert set(response.json()) == {"error"}, response.text[:500]
