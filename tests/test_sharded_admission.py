"""Shape rules of sharded experts at admission: a size whose video tokens do not divide by the deployed
Ulysses degree is refused at create time (400 `size_not_shardable`, naming the size and the allowed ones),
and `GET /v1/models` shows each expert's degree and the sizes it accepts. In-process API app, tiny model
(2 heads; tokens = latent frames x height/16 x width/16: 80x80 at 0.5 s is 3 x 5 x 5 = 75, odd)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from serve.app import build_app
from serve.sharding import ExpertsSettings, ParallelSettings, ShapeRules, model_num_heads, placement_options
from tests.support.api_app import TINY, local_api

ODD = {"prompt": "a crane move over rooftops", "size": "80x80", "seconds": "0.5", "steps": 4}  # 75 tokens
PRESETS_81F = ["832x480", "480x832", "1280x720", "720x1280"]  # 21 x 30 x 52 = 32,760 tokens: even
HIGH_U2 = {"high": {"parallel": {"ulysses": 2}}}

# (name, experts, path, body, status, code, param, words in the message)
CASES: list[tuple[str, dict, str, dict[str, Any], int, str | None, str | None, list[str]]] = [
    (
        "odd tokens, high Ulysses 2",
        HIGH_U2,
        "/v1/videos",
        ODD,
        400,
        "size_not_shardable",
        "size",
        ["80x80", "75 video tokens", "Ulysses degree 2", "high-noise", *PRESETS_81F[:1]],
    ),
    (
        "odd tokens, low Ulysses 2",
        {"low": {"parallel": {"ulysses": 2}}},
        "/v1/videos",
        ODD,
        400,
        "size_not_shardable",
        "size",
        ["80x80", "low-noise"],
    ),
    (
        "even tokens at 0.25 s (2 latent frames)",
        HIGH_U2,
        "/v1/videos",
        {**ODD, "seconds": "0.25"},
        201,
        None,
        None,
        [],
    ),
    ("the tests' 96x64 clip", HIGH_U2, "/v1/videos", {"prompt": "a pier", **TINY}, 201, None, None, []),
    (
        "CFG parallel pads rows: any size",
        {"high": {"parallel": {"cfg": 2}}},
        "/v1/videos",
        ODD,
        201,
        None,
        None,
        [],
    ),
    ("unsharded: any size", {}, "/v1/videos", ODD, 201, None, None, []),
    (
        "one storyboard shot unshardable",
        HIGH_U2,
        "/v1/storyboards",
        {"shots": [{"prompt": "a pier", **TINY}, ODD]},
        400,
        "size_not_shardable",
        "shots.1.size",
        ["80x80"],
    ),
]


@pytest.mark.parametrize(
    ("experts", "path", "body", "status", "code", "param", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_create_refuses_sizes_the_deployed_degree_cannot_split(
    tmp_path: Path,
    experts: dict,
    path: str,
    body: dict[str, Any],
    status: int,
    code: str | None,
    param: str | None,
    words: list[str],
) -> None:
    with local_api(tmp_path, experts=experts) as api:
        response = api.client.post(path, json=body)
        assert response.status_code == status, response.text
        if status == 201:
            return
        error = response.json()["error"]
        assert (error["code"], error["param"]) == (code, param)
        for word in words:
            assert word in error["message"], (word, error["message"])
        assert api.store.list() == []  # refused whole: nothing queued, no board


def test_a_remix_of_a_video_made_before_sharding_is_refused_at_its_size(tmp_path: Path) -> None:
    with local_api(tmp_path) as api:
        source = api.client.post("/v1/videos", json=ODD)
        assert source.status_code == 201, source.text
        # The experts were redeployed with Ulysses 2 since: the remix keeps the source's 80x80 size.
        api.state.shapes = ShapeRules(
            ExpertsSettings.model_validate(HIGH_U2), "tiny", api.state.model, api.state.args.model_cache_dir
        )
        remix = api.client.post(f"/v1/videos/{source.json()['id']}/remix", json={"prompt": "in the rain"})
        assert remix.status_code == 400, remix.text
        error = remix.json()["error"]
        assert (error["code"], error["param"]) == ("size_not_shardable", "resolution")
        assert "80x80" in error["message"]
        assert len(api.store.list()) == 1


def test_models_list_shows_each_experts_degree_and_accepted_sizes(tmp_path: Path) -> None:
    with local_api(tmp_path, experts={"high": {"parallel": {"ulysses": 2, "cfg": 2}}}) as api:
        response = api.client.get("/v1/models")
        assert response.status_code == 200, response.text
        experts = response.json()["data"][0]["experts"]
        assert experts["high"] == {
            "deployment": "HighNoiseDenoiser",
            "ulysses": 2,
            "cfg": 2,
            "gpus_per_replica": 4,
            "token_multiple": 2,
            "accepted_sizes": PRESETS_81F,
            "tiers": ["draft", "final"],  # a rank group serves the draft tier, LoRAs and caching too
            "loras": True,
            "step_cache": True,
        }
        assert experts["low"]["gpus_per_replica"] == 1 and experts["low"]["accepted_sizes"] == PRESETS_81F
        schema = api.client.get("/openapi.json").json()["components"]["schemas"]
        assert set(schema["ExpertParallel"]["properties"]) == set(experts["high"])
        assert "experts" in schema["ServedModel"]["required"]


def test_a_degree_the_models_heads_do_not_divide_is_a_config_error() -> None:
    with pytest.raises(ValueError, match=r"experts.high.parallel.ulysses.*2 attention heads.*degree 4.*1, 2"):
        build_app({"experts": {"high": {"parallel": {"ulysses": 4}}}})
    with pytest.raises(ValidationError, match="cfg"):
        ParallelSettings(cfg=3)
    with pytest.raises(ValidationError, match="ulysses"):
        ParallelSettings(ulysses=0)


def test_heads_are_read_from_a_diffusers_folder_config(tmp_path: Path) -> None:
    (tmp_path / "transformer_2").mkdir()
    (tmp_path / "transformer_2" / "config.json").write_text(json.dumps({"num_attention_heads": 40}))
    assert model_num_heads(str(tmp_path), "low", tmp_path) == 40
    with pytest.raises(FileNotFoundError, match="transformer/config.json"):
        model_num_heads(str(tmp_path), "high", tmp_path)


def test_a_sharded_replica_reserves_one_bundle_per_rank_strictly_packed() -> None:
    assert placement_options(ParallelSettings(), "cuda") == {}
    gpu = placement_options(ParallelSettings(ulysses=4, cfg=2), "cuda")
    assert gpu == {
        "placement_group_bundles": [{"GPU": 1, "CPU": 1}] * 8,
        "placement_group_strategy": "STRICT_PACK",
    }
    assert (
        placement_options(ParallelSettings(ulysses=2), "cpu")["placement_group_bundles"] == [{"CPU": 1}] * 2
    )
