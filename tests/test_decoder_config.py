"""The decoder settings: a dtype per deployment, a memory bound, a fast decoder for drafts only, and a rank
group per replica (`decoder.parallel`)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from pipeline.vae_memory import MEMORY_MARGIN
from serve.config import DecoderSettings, PrevizArgs
from serve.stages import decoder


def test_defaults_decode_every_tier_with_the_full_vae_in_the_device_dtype() -> None:
    settings = PrevizArgs().decoder
    assert (settings.dtype, settings.draft, settings.final, settings.max_memory_bytes) == (
        "auto",
        "vae",
        "vae",
        None,
    )
    assert DecoderSettings(max_memory_gib=1.5).max_memory_bytes == 3 * 2**29


def test_a_config_that_gives_finals_the_fast_decoder_is_refused() -> None:
    with pytest.raises(ValidationError, match="finals always decode with the full VAE"):
        PrevizArgs.model_validate({"decoder": {"final": "fast"}})


def test_builtin_fast_decoder_weights_exist_for_the_presets_only(tmp_path) -> None:
    assert PrevizArgs.model_validate({"model": "small", "decoder": {"draft": "fast"}}).decoder.draft == "fast"
    with pytest.raises(ValidationError, match="needs TAEHV's published taew2_1.pth"):
        PrevizArgs.model_validate(
            {"model": str(tmp_path), "adapters": {"draft_lora": None}, "decoder": {"draft": "fast"}}
        )
    weights = str(tmp_path / "taew2_1.pth")
    args = PrevizArgs.model_validate(
        {"model": str(tmp_path), "decoder": {"draft": "fast", "fast_weights": weights}}
    )
    assert args.decoder.fast_weights == weights


@pytest.mark.parametrize("ranks", [0, 9])
def test_a_decoder_rank_group_outside_one_node_is_refused(ranks: int) -> None:
    with pytest.raises(
        ValidationError, match=f"`decoder.parallel` must be 1 to 8 but is {ranks}: a decoder's"
    ):
        PrevizArgs.model_validate({"decoder": {"parallel": ranks}})


@pytest.mark.parametrize(("device", "bundle"), [("cuda", {"GPU": 1, "CPU": 1}), ("cpu", {"CPU": 1})])
def test_a_parallel_decoder_reserves_a_bundle_per_rank_on_one_node(device: str, bundle: dict) -> None:
    args = PrevizArgs.model_validate({"device": device, "decoder": {"parallel": 4}})
    options = decoder.default_options(args)
    assert options["placement_group_bundles"] == [bundle] * 4
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert "placement_group_bundles" not in decoder.default_options(PrevizArgs(device=device))


def test_a_rank_group_plans_for_its_largest_block_and_leaves_what_does_not_fit_to_one_device() -> None:
    from pipeline.vae_memory import estimate_bytes
    from pipeline.vae_parallel import block_plan
    from tests.test_vae import preset_vae

    config, shape = preset_vae("tiny").config, (16, 3, 9, 13)  # 2 x 2 blocks over 4, the largest 5 x 7
    block = estimate_bytes(config, (16, 3, 5, 7), torch.float32)
    plan = block_plan(config, shape, torch.float32, 4, None)
    assert (plan.mode, plan.estimate_bytes) == ("full", block)
    assert block_plan(config, shape, torch.float32, 4, int(block / MEMORY_MARGIN) + 1) is not None
    assert block_plan(config, shape, torch.float32, 4, block // 2) is None  # one device decodes, tiled
    assert block_plan(config, (16, 3, 1, 3), torch.float32, 4, None) is None  # 1 x 3 latents: no split


def app_config(decoder: dict, entry: dict) -> dict:
    return {"name": "previz", "args": {"decoder": decoder}, "deployments": [{"name": "VAEDecoder", **entry}]}


def test_a_deploy_file_states_a_parallel_decoders_gpus_as_a_bundle_per_rank() -> None:
    from serve.cli.launch import check_layout

    two = [{"GPU": 1, "CPU": 2}, {"GPU": 1, "CPU": 1}]
    check_layout(app_config({"parallel": 2}, {"placement_group_bundles": two}))
    check_layout(app_config({}, {"ray_actor_options": {"num_gpus": 0.5}}))  # one rank: no bundles needed
    with pytest.raises(
        ValueError, match="`decoder.parallel: 2` gives each VAEDecoder replica 2 ranks, a GPU"
    ):
        check_layout(app_config({"parallel": 2}, {"ray_actor_options": {"num_gpus": 1}}))
    with pytest.raises(
        ValueError, match="lists 2 `placement_group_bundles` but `decoder.parallel` gives its"
    ):
        check_layout(app_config({"parallel": 4}, {"placement_group_bundles": two}))
