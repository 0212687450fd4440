"""Shape rules of sharded experts at admission: a size whose video tokens do not divide by the deployed
Ulysses degree is refused at create time (400 `size_not_shardable`, naming the size and the allowed ones),
and `GET /v1/models` shows each expert's degree and the sizes it accepts. In-process API app, tiny model
(2 heads; tokens = latent frames x height/16 x width/16: 80x80 at 0.5 s is 3 x 5 x 5 = 75, odd)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve.app import build_app
from serve.sharding import ParallelSettings, model_num_heads, placement_options


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
