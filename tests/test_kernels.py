"""Per-expert attention backend, regional compile and warm-up (pipeline.denoise.kernels, serve.sharding),
on the tiny model on this CPU."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from pydantic import ValidationError

from pipeline.denoise.forward import GuidedInput, guided_forward
from pipeline.denoise.kernels import attention_backends_of, compile_blocks, set_attention_backend, warm_up
from pipeline.determinism import make_batch_invariant
from pipeline.weights import build_preset
from serve.config import PrevizArgs
from serve.sharding import ExpertSettings, ExpertsSettings, WarmupBucket, check_degrees
from serve.stages.shard_worker import load_expert

LATENTS = (16, 3, 8, 12)  # 96x64 at 0.5 s


def guided_input(transformer) -> GuidedInput:
    generator = torch.Generator().manual_seed(5)
    text = torch.randn((512, transformer.config.text_dim), generator=generator)
    return GuidedInput(
        latents=torch.randn(LATENTS, generator=generator),
        timestep=torch.tensor(900),
        cond=text,
        uncond=torch.zeros_like(text),
        guidance=4.0,
    )


def test_a_backend_applies_to_its_model_only_and_leaves_the_process_default() -> None:
    tiny = build_preset("tiny")
    before = _AttentionBackendRegistry.get_active_backend()[0]
    reference = guided_forward(tiny.transformer, [guided_input(tiny.transformer)])[0]
    set_attention_backend(tiny.transformer, "_native_math")
    assert attention_backends_of(tiny.transformer) == {"_native_math"}
    assert attention_backends_of(tiny.transformer_2) == {"default"}  # the other expert of the process
    assert _AttentionBackendRegistry.get_active_backend()[0] == before
    math = guided_forward(tiny.transformer, [guided_input(tiny.transformer)])[0]
    set_attention_backend(tiny.transformer, "native")
    assert attention_backends_of(tiny.transformer) == {"native"}
    native = guided_forward(tiny.transformer, [guided_input(tiny.transformer)])[0]
    assert torch.equal(native, reference)  # native is torch SDPA, the default
    assert float((math - reference).abs().max()) <= 1e-5


def test_an_unknown_backend_is_a_config_error_listing_the_known_ones() -> None:
    with pytest.raises(
        ValidationError, match=r"`attention_backend` must be one of .*native.*but is 'flash4real'"
    ):
        ExpertSettings(attention_backend="flash4real")
    assert ExpertSettings(attention_backend="_native_cudnn").attention_backend == "_native_cudnn"


def test_a_replica_loads_its_expert_with_the_configured_backend() -> None:
    args = PrevizArgs(device="cpu", experts={"low": {"attention_backend": "_native_math"}})
    _, low = load_expert(args, "low")
    _, high = load_expert(args, "high")
    assert (attention_backends_of(low), attention_backends_of(high)) == ({"_native_math"}, {"default"})


def test_warmup_buckets_are_validated_and_must_split_at_the_degree(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="resolution"):
        WarmupBucket(size="81x80")
    assert WarmupBucket(size="480p").latent_shape(PrevizArgs().sampling, 16) == (16, 21, 60, 104)
    experts = ExpertsSettings.model_validate(
        {
            "high": {
                "parallel": {"ulysses": 2},
                "warmup": [{"size": "96x64", "seconds": 0.5}, {"size": "80x80", "seconds": 0.5}],
            }
        }
    )
    with pytest.raises(ValueError, match=r"experts.high.warmup.1.*80x80.*75 video tokens"):
        check_degrees(experts, "tiny", tmp_path, PrevizArgs().sampling)


def test_regional_compile_after_warm_up_gives_the_eager_prediction() -> None:
    """25 s on a 2-core CPU with a cold inductor cache (7 s warm): the repeated block compiles once."""
    tiny = build_preset("tiny")
    transformer = make_batch_invariant(tiny.transformer)
    eager = guided_forward(transformer, [guided_input(transformer)])[0]
    compile_blocks(transformer)
    forward = functools.partial(guided_forward, transformer)
    assert warm_up(forward, transformer, [LATENTS], 512) == 1
    compiled = guided_forward(transformer, [guided_input(transformer)])[0]
    assert all(hasattr(block, "_compiled_call_impl") for block in transformer.blocks)
    assert float((compiled - eager).abs().max()) <= 1e-5
