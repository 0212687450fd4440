"""Step caching through the API: `cache` on a create (JSON, the openai package's form, a storyboard shot) is
validated against the bounds the OpenAPI states, stored with the job and kept by a remix."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import openai
import pytest
from pydantic import ValidationError

from pipeline.spec import (
    DEFAULT_FINAL_CACHE,
    MAX_CACHE_THRESHOLD,
    MAX_STEPS,
    RequestSpec,
    StepCacheSettings,
    describe_validation_error,
)
from serve.http.app import app
from tests.support.api_app import TINY, LocalApi, local_api

CACHE = {"threshold": 0.06, "max_skip": 2, "warmup_steps": 10}


@pytest.fixture
def api(tmp_path: Path):
    with local_api(tmp_path) as running:
        yield running


def stored_cache(api: LocalApi, video_id: str) -> tuple[StepCacheSettings | None, StepCacheSettings | None]:
    request = api.store.get(video_id).request
    return request.spec.cache, request.resolved.cache


def test_a_create_with_cache_stores_it_for_the_engine_and_a_remix_keeps_it(api: LocalApi) -> None:
    response = api.client.post("/v1/videos", json={"prompt": "a lighthouse", **TINY, "cache": CACHE})
    assert response.status_code == 201, response.text
    video = response.json()
    assert stored_cache(api, video["id"]) == (StepCacheSettings(**CACHE), StepCacheSettings(**CACHE))
    assert video["cache"] == CACHE and api.client.get(f"/v1/videos/{video['id']}").json()["cache"] == CACHE
    remix = api.client.post(f"/v1/videos/{video['id']}/remix", json={"prompt": "a lighthouse at night"})
    assert remix.status_code == 201, remix.text
    assert stored_cache(api, remix.json()["id"])[1] == StepCacheSettings(**CACHE)
    off = api.client.post("/v1/videos", json={"prompt": "a lighthouse", **TINY, "cache": None}).json()
    assert stored_cache(api, off["id"]) == (None, None) and off["cache"] is None  # null: every step runs
    remix = api.client.post(f"/v1/videos/{off['id']}/remix", json={"prompt": "a lighthouse at noon"})
    assert stored_cache(api, remix.json()["id"]) == (None, None)  # a remix runs as its source ran


def test_a_final_naming_no_cache_takes_the_final_tiers_default(api: LocalApi) -> None:
    plain = api.client.post("/v1/videos", json={"prompt": "a lighthouse", **TINY}).json()
    assert plain["quality"] == "final"  # batch priority's default tier
    assert stored_cache(api, plain["id"]) == (None, DEFAULT_FINAL_CACHE)  # not named; resolved: the default
    assert plain["cache"] == DEFAULT_FINAL_CACHE.model_dump()
    remix = api.client.post(f"/v1/videos/{plain['id']}/remix", json={"prompt": "a lighthouse at dusk"})
    assert stored_cache(api, remix.json()["id"])[1] == DEFAULT_FINAL_CACHE


@pytest.mark.parametrize(
    ("fields", "defaulted"),
    [({"quality": "draft"}, False), ({"priority": "interactive"}, True)],
)
def test_cache_on_a_draft_is_a_400_and_nothing_is_stored(
    api: LocalApi, fields: dict[str, str], defaulted: bool
) -> None:
    body = {"prompt": "a lighthouse", **TINY, **fields, "cache": CACHE}
    response = api.client.post("/v1/videos", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("cache_not_for_draft", "cache")
    assert error["message"].startswith("`cache` is for `quality: final` only")
    assert ("`quality` not named" in error["message"]) is defaulted
    assert api.client.get("/v1/videos").json()["data"] == []
    draft = api.client.post("/v1/videos", json={**body, "cache": None})  # null: allowed, as omitted
    assert draft.status_code == 201 and draft.json()["cache"] is None and draft.json()["quality"] == "draft"


def test_the_openai_package_form_sends_cache_as_bracketed_fields(api: LocalApi) -> None:
    client = openai.OpenAI(
        base_url=f"{api.client.base_url}/v1", api_key=api.admin_key, http_client=api.client
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        video = client.videos.create(
            prompt="a detective walks",
            size="96x64",
            seconds="0.5",
            extra_body={"cache": {"threshold": 0.1, "max_skip": 3}},
        )
    assert stored_cache(api, video.id)[1] == StepCacheSettings(threshold=0.1, max_skip=3, warmup_steps=0)


@pytest.mark.parametrize(
    ("cache", "code", "param"),
    [
        ({"threshold": 1.5}, "invalid_value", "cache.threshold"),
        ({"threshold": -0.1}, "invalid_value", "cache.threshold"),
        ({"threshold": "0.1"}, "invalid_type", "cache.threshold"),
        ({"threshold": True}, "invalid_type", "cache.threshold"),
        ({"threshold": 0.1, "max_skip": 101}, "invalid_value", "cache.max_skip"),
        ({"threshold": 0.1, "warmup_steps": -1}, "invalid_value", "cache.warmup_steps"),
        ({"max_skip": 2}, "missing_field", "cache.threshold"),
        ({"threshold": 0.1, "skip": 2}, "unknown_field", "cache.skip"),
        ("on", "invalid_type", "cache"),
    ],
)
def test_cache_outside_its_bounds_is_a_400_naming_the_field(
    api: LocalApi, cache: Any, code: str, param: str
) -> None:
    response = api.client.post("/v1/videos", json={"prompt": "a lighthouse", **TINY, "cache": cache})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert api.client.get("/v1/videos").json()["data"] == []  # nothing stored


def test_a_storyboard_shot_takes_a_cache_too(api: LocalApi) -> None:
    shot = {"prompt": "a lighthouse", **TINY, "cache": CACHE}
    response = api.client.post("/v1/storyboards", json={"shots": [shot]})
    assert response.status_code == 201, response.text
    video_id = response.json()["shots"][0]["videos"][0]["video_id"]
    assert stored_cache(api, video_id)[1] == StepCacheSettings(**CACHE)


def test_openapi_states_the_cache_bounds() -> None:
    components = app.openapi()["components"]["schemas"]
    cache = components["StepCache"]
    assert cache["required"] == ["threshold"] and cache["additionalProperties"] is False
    threshold = cache["properties"]["threshold"]
    assert (threshold["type"], threshold["minimum"], threshold["maximum"]) == (
        "number",
        0,
        MAX_CACHE_THRESHOLD,
    )
    for name in ("max_skip", "warmup_steps"):
        field = cache["properties"][name]
        assert (field["type"], field["minimum"], field["maximum"]) == ("integer", 0, MAX_STEPS)
    for component in ("VideoCreate", "StoryboardShot"):
        assert {"$ref": "#/components/schemas/StepCache"} in components[component]["properties"]["cache"][
            "anyOf"
        ]


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ({"threshold": 2.0}, "`cache.threshold` must be between 0 and 1 but is 2.0."),
        ({"threshold": 0.1, "max_skip": 101}, "`cache.max_skip` must be between 0 and 100 but is 101."),
        ({"threshold": 0.1, "warmup_steps": -3}, "`cache.warmup_steps` must be between 0 and 100 but is -3."),
    ],
)
def test_request_spec_refuses_cache_settings_naming_field_value_and_rule(cache: dict, message: str) -> None:
    with pytest.raises(ValidationError) as raised:
        RequestSpec(prompt="p", cache=cache)
    assert describe_validation_error(raised.value) == message
