"""Schemathesis explores the app's own OpenAPI (bodies, queries, headers, paths) with every one of its
response-conformance checks: no 5xx, status codes, content types, headers and bodies as documented, the
`Allow` header of a 405, schema-invalid requests refused, and schema-valid ones accepted — except for the
documented 400s of deployment and project rules (`RULES_BEYOND_SCHEMA`) and the content policy's 422."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from pipeline.spec import MAX_DURATION_S, MAX_SIDE, MIN_DURATION_S, MIN_SIDE
from serve.http.app import app
from serve.http.errors import RULES_BEYOND_SCHEMA
from serve.http.openapi import SECONDS_TEXT_PATTERN, SIZE_PATTERN
from serve.http.schemas import SECONDS_TEXT
from tests.support.api_app import local_api

schema = schemathesis.openapi.from_asgi("/openapi.json", app)
ACCEPTED = range(200, 400)
# a schema-valid request may still be refused for who asks or for the state it meets, never for its shape
REFUSED_FOR_STATE = {401, 403, 404, 409, 429}


@pytest.fixture(scope="module")
def running_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The admin key of the app's "default" project: requests get past authentication."""
    with local_api(tmp_path_factory.mktemp("schemathesis")) as api:
        yield api.admin_key


def schema_valid_requests_are_accepted(ctx: object, response: schemathesis.Response, case: schemathesis.Case):
    """schemathesis' `positive_data_acceptance`, but a documented runtime refusal is no failure."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return None
    status = response.status_code
    if status in ACCEPTED or status in REFUSED_FOR_STATE:
        return None
    error = response.json().get("error", {})
    if (status, error.get("code")) == (422, "content_blocked") or (
        status == 400 and error.get("code") in RULES_BEYOND_SCHEMA
    ):
        return None
    raise AssertionError(
        f"a request the schema allows was refused: {case.method} {case.path} -> {status}: "
        + response.text[:300]
    )


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_answers_as_its_schema_says(case: schemathesis.Case, running_api: str) -> None:
    response = case.call_and_validate(
        headers={"Authorization": f"Bearer {running_api}"},
        excluded_checks=[positive_data_acceptance],
        additional_checks=[schema_valid_requests_are_accepted],
    )
    if response.status_code >= 400:
        assert set(response.json()) == {"error"}, response.text[:500]


@pytest.mark.parametrize(
    "text",
    [
        *(f"{value / 100:g}" for value in range(0, 1300, 5)),
        *(
            "0.25",
            "0.250",
            "0.2499",
            "10.0",
            "10.01",
            "00.5",
            "05",
            "+5",
            "5e0",
            "1_0",
            " 5",
            ".5",
            "5.",
            "0",
        ),
    ],
)
def test_the_seconds_pattern_is_the_plain_numbers_in_range(text: str) -> None:
    accepted = bool(SECONDS_TEXT.match(text)) and MIN_DURATION_S <= float(text) <= MAX_DURATION_S
    assert bool(re.match(SECONDS_TEXT_PATTERN, text)) == accepted


@pytest.mark.parametrize("side", [0, 16, 31, 32, 40, 48, 96, 100, 1904, 1920, 1936, 2000, 10000])
def test_the_size_pattern_is_the_multiples_of_16_in_range(side: int) -> None:
    accepted = side % 16 == 0 and MIN_SIDE <= side <= MAX_SIDE
    assert bool(re.match(SIZE_PATTERN, f"{side}x{side}")) == accepted
    assert bool(re.match(SIZE_PATTERN, f"0{side}x{side}")) is False
