"""Quality tiers, LoRA adapters and promoting a take, through the HTTP API (in-process app, real SQLite
store, no Ray): defaults by priority and project, adapters checked at create time, both links stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.spec import DEFAULT_FINAL_CACHE
from serve.http.app import app
from serve.jobs import JobStatus
from tests.support.api_app import TINY, LocalApi, http_server, local_api
from tests.support.cli_run import previz

ADAPTERS = {
    "loras": [
        {"name": "noir", "source": "/srv/loras/noir"},  # shared
        {"name": "heist-hero", "source": "/srv/loras/hero", "project": "heist"},
    ]
}


@pytest.fixture
def api(tmp_path: Path):
    with local_api(tmp_path, adapters=ADAPTERS) as running:
        yield running


def post(api: LocalApi, path: str = "/v1/videos", project: str | None = None, **fields: Any):
    client = api.client_for(project) if project else api.client
    return client.post(path, json={"prompt": "a rooftop chase at dusk", **TINY, **fields})


def created(response) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    return response.json()


def test_quality_defaults_to_draft_for_interactive_and_final_for_batch(api: LocalApi) -> None:
    interactive = created(post(api, priority="interactive"))
    batch = created(post(api, priority="batch"))
    assert (interactive["quality"], batch["quality"]) == ("draft", "final")
    assert created(post(api, priority="batch", quality="draft"))["quality"] == "draft"
    stored = {job.id: job.request.resolved for job in api.store.list()}
    assert stored[interactive["id"]].quality == "draft"
    assert stored[batch["id"]].guidance_high == 4.0


def test_the_projects_default_quality_wins_over_the_priority(api: LocalApi) -> None:
    response = api.client.patch("/v1/admin/projects/default", json={"default_quality": "final"})
    assert response.status_code == 200, response.text
    assert response.json()["settings"]["default_quality"] == "final"
    assert created(post(api, priority="interactive"))["quality"] == "final"
    assert created(post(api, priority="interactive", quality="draft"))["quality"] == "draft"
    api.client.patch("/v1/admin/projects/default", json={"default_quality": None})
    assert created(post(api, priority="interactive"))["quality"] == "draft"


def test_a_draft_without_steps_runs_the_recipes_four_steps_and_no_cfg(api: LocalApi) -> None:
    fields = {key: value for key, value in TINY.items() if key != "steps"}
    response = api.client.post("/v1/videos", json={"prompt": "a rooftop chase", "quality": "draft", **fields})
    video = created(response)
    assert video["steps"] == 4
    (job,) = api.store.list()
    assert (job.request.resolved.guidance_high, job.request.resolved.guidance_low) == (1.0, 1.0)
    assert job.request.resolved.adapters(api.state.model) == (("distill", 1.0),)


def test_unknown_adapter_is_a_400_and_nothing_is_stored(api: LocalApi) -> None:
    for loras, param in (
        ([{"name": "nobody"}], "loras.0.name"),
        ([{"name": "noir"}, {"name": "noir", "weight": 0.5}], "loras.1.name"),
        ([{"name": "distill"}], "loras.0.name"),
        ([{"name": "heist-hero"}], "loras.0.name"),  # another project's own
    ):
        response = post(api, loras=loras)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "unknown_adapter"
        assert response.json()["error"]["param"] == param
    assert api.store.list() == []


def test_a_project_uses_its_own_and_shared_adapters(api: LocalApi) -> None:
    video = created(
        post(api, project="heist", loras=[{"name": "heist-hero", "weight": 0.7}, {"name": "noir"}])
    )
    assert video["loras"] == [{"name": "heist-hero", "weight": 0.7}, {"name": "noir", "weight": 1.0}]
    (job,) = api.store.list()
    assert job.request.resolved.adapters(api.state.model) == (("heist-hero", 0.7), ("noir", 1.0))


def test_promote_makes_the_final_take_with_the_drafts_seed_prompt_and_size_linked_both_ways(
    api: LocalApi,
) -> None:
    draft = created(post(api, priority="interactive", seed=4242, loras=[{"name": "noir", "weight": 0.5}]))
    response = api.client.post(f"/v1/videos/{draft['id']}/promote", json={})
    final = created(response)
    assert final["quality"] == "final" and final["promoted_from"] == draft["id"]
    assert (final["seed"], final["prompt"], final["size"], final["seconds"]) == (
        draft["seed"],
        draft["prompt"],
        draft["size"],
        draft["seconds"],
    )
    assert final["steps"] == 40 and final["priority"] == "batch"
    assert final["loras"] == draft["loras"]
    assert draft["cache"] is None and final["cache"] == DEFAULT_FINAL_CACHE.model_dump()  # the tiers' own
    assert api.client.get(f"/v1/videos/{draft['id']}").json()["promoted_to"] == final["id"]
    again = api.client.post(f"/v1/videos/{draft['id']}/promote", json={})
    assert (again.status_code, again.json()["error"]["code"]) == (409, "already_promoted")
    of_final = api.client.post(f"/v1/videos/{final['id']}/promote", json={})
    assert (of_final.status_code, of_final.json()["error"]["code"]) == (409, "not_a_draft")
    assert len(api.store.list()) == 2


def test_promote_can_change_size_upscale_and_look(api: LocalApi) -> None:
    draft = created(post(api, quality="draft"))
    body = {"size": "128x64", "upscale": "720p", "look": "film", "priority": "interactive"}
    final = created(api.client.post(f"/v1/videos/{draft['id']}/promote", json=body))
    assert (final["size"], final["upscale"], final["look"], final["priority"]) == (
        "128x64",
        "720p",
        "film",
        "interactive",
    )
    assert final["seed"] == draft["seed"]
    uncached = created(post(api, quality="draft", seed=7))
    final = created(api.client.post(f"/v1/videos/{uncached['id']}/promote", json={"cache": None}))
    assert final["cache"] is None and final["quality"] == "final"  # null: every step runs


def test_storyboard_promote_makes_every_chosen_take_final_or_none(api: LocalApi) -> None:
    board = api.client.post(
        "/v1/storyboards",
        json={
            "priority": "interactive",
            "shots": [{"prompt": "1A: the vault door", **TINY}, {"prompt": "1B: the guard turns", **TINY}],
            "variants": {"seeds": 2},
        },
    )
    assert board.status_code == 201, board.text
    takes = [shot["videos"][1]["video_id"] for shot in board.json()["shots"]]
    assert all(video["quality"] == "draft" for shot in board.json()["shots"] for video in shot["videos"])
    cache = {"threshold": 0.1, "max_skip": 1, "warmup_steps": 2}
    response = api.client.post(
        f"/v1/storyboards/{board.json()['id']}/promote", json={"video_ids": takes, "cache": cache}
    )
    assert response.status_code == 201, response.text
    finals = response.json()["data"]
    assert all(video["cache"] == cache for video in finals)
    assert [video["promoted_from"] for video in finals] == takes
    for take, final in zip(takes, finals, strict=True):
        draft = api.client.get(f"/v1/videos/{take}").json()
        assert draft["promoted_to"] == final["id"] and final["seed"] == draft["seed"]
    # one already promoted: the whole promote is refused and nothing new is stored
    count = len(api.store.list())
    other = board.json()["shots"][0]["videos"][0]["video_id"]
    refused = api.client.post(
        f"/v1/storyboards/{board.json()['id']}/promote", json={"video_ids": [other, takes[0]]}
    )
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "already_promoted")
    assert len(api.store.list()) == count
    assert api.client.get(f"/v1/videos/{other}").json()["promoted_to"] is None


def test_remix_inherits_the_tier_and_loras(api: LocalApi) -> None:
    draft = created(post(api, quality="draft", loras=[{"name": "noir"}]))
    remix = created(api.client.post(f"/v1/videos/{draft['id']}/remix", json={"prompt": "the same, at night"}))
    assert (remix["quality"], remix["loras"]) == ("draft", draft["loras"])


def test_a_deployment_without_the_distill_lora_serves_final_only(tmp_path: Path) -> None:
    with local_api(tmp_path, adapters={"draft_lora": None}) as api:
        assert created(post(api, priority="interactive"))["quality"] == "final"
        response = post(api, quality="draft")
        assert (response.status_code, response.json()["error"]["code"]) == (400, "tier_unavailable")
        tiers = api.client.get("/v1/models").json()["data"][0]["tiers"]
        assert set(tiers) == {"final"}


def test_models_list_the_tiers_and_the_callers_adapters(api: LocalApi) -> None:
    served = api.client.get("/v1/models").json()["data"][0]
    assert served["tiers"]["draft"]["steps"] == 4 and served["tiers"]["final"]["steps"] == 40
    assert [adapter["name"] for adapter in served["adapters"]] == ["noir"]
    heist = api.client_for("heist").get("/v1/models").json()["data"][0]
    assert [adapter["name"] for adapter in heist["adapters"]] == ["noir", "heist-hero"]


def test_cli_submits_a_draft_with_a_lora_promotes_it_and_sets_the_projects_default_quality(
    api: LocalApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with http_server() as url:
        monkeypatch.setenv("PREVIZ_API_KEY", api.admin_key)
        monkeypatch.setenv("PREVIZ_SERVER", url)
        code, out, err = previz(
            ["submit", "a rooftop chase", "--size", "96x64", "--seconds", "0.5", "--quality", "draft",
             "--lora", "noir=0.5"],
            monkeypatch, capsys,
        )  # fmt: skip
        assert code == 0, err
        draft_id = out.split()[0]
        code, out, err = previz(["promote", draft_id, "--look", "film"], monkeypatch, capsys)
        assert code == 0, err
        final = api.store.get(out.split()[0])
        assert final.request.promoted_from == draft_id and final.request.resolved.quality == "final"
        assert final.request.finish.look == "film" and final.status == JobStatus.QUEUED
        assert api.store.get(draft_id).promoted_to == final.id
        code, out, err = previz(["promote", draft_id], monkeypatch, capsys)
        assert code == 2 and "already_promoted" in err
        code, out, err = previz(
            ["admin", "project", "update", "default", "--default-quality", "final"], monkeypatch, capsys
        )
        assert code == 0 and "default quality final" in out, err
        assert api.store.get_project("default").settings.default_quality == "final"


def test_sharded_experts_serve_drafts_style_loras_and_caching_as_unsharded_ones(tmp_path: Path) -> None:
    with local_api(tmp_path, experts={"high": {"parallel": {"ulysses": 2}}}, adapters=ADAPTERS) as api:
        assert api.state.args.serves_draft
        assert created(post(api, priority="interactive", size="128x64"))["quality"] == "draft"
        styled = created(post(api, size="128x64", quality="final", loras=[{"name": "noir"}]))
        assert styled["quality"] == "final" and styled["loras"] == [{"name": "noir", "weight": 1.0}]
        served = api.client.get("/v1/models").json()["data"][0]
        assert list(served["tiers"]) == ["draft", "final"] and "noir" in {
            a["name"] for a in served["adapters"]
        }
        high = served["experts"]["high"]
        assert (high["ulysses"], high["tiers"], high["loras"], high["step_cache"]) == (
            2,
            ["draft", "final"],
            True,
            True,
        )


def test_a_form_sends_loras_as_one_json_part_as_the_schema_declares_or_a_part_per_item(api: LocalApi) -> None:
    """A lone part holding a JSON list is the whole list: the document declares that encoding, so a client
    never sends `[[]]` as a part per item (`[]`), which the server would read as an empty list."""
    multipart = app.openapi()["paths"]["/v1/videos"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert multipart["encoding"]["loras"] == {"contentType": "application/json"}
    client = api.client_for("heist")
    loras = [{"name": "noir", "weight": 0.5}, {"name": "heist-hero", "weight": 1.0}]
    for parts in ([json.dumps(loras)], [json.dumps(lora) for lora in loras]):
        fields = [
            ("prompt", "a vault"),
            ("size", "96x64"),
            ("seconds", "0.5"),
            *(("loras", p) for p in parts),
        ]
        response = client.post("/v1/videos", files=[(name, (None, value)) for name, value in fields])
        assert created(response)["loras"] == loras
    for part in ("[[]]", "[null]"):  # what the declared encoding sends for those lists: refused
        fields = [("prompt", "a vault"), ("size", "96x64"), ("seconds", "0.5"), ("loras", part)]
        refused = client.post("/v1/videos", files=[(name, (None, value)) for name, value in fields])
        assert (refused.status_code, refused.json()["error"]["param"]) == (400, "loras.0"), part
