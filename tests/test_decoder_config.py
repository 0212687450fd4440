"""The decoder settings: a dtype per deployment, a memory bound, and a fast decoder for drafts only."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve.config import DecoderSettings, PrevizArgs


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
