"""Staged pipeline (TextEncoder → high Denoiser → low Denoiser → VAEDecoder) equals diffusers' WanPipeline."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.spec import ModelSpec
from pipeline.weights import WanComponents, build_preset
from tests.support.wan_reference import MAX_ABS_DIFF, run_diffusers, run_staged, tiny_request


@pytest.fixture(scope="module")
def tiny() -> WanComponents:
    return build_preset("tiny")


def test_staged_pipeline_equals_diffusers_wan_pipeline(tiny: WanComponents) -> None:
    request = tiny_request()
    staged, staged_seen = run_staged(tiny, request)
    reference, reference_seen = run_diffusers(tiny, request)
    assert staged.shape == reference.shape == (9, 64, 96, 3)
    diff = float(np.abs(staged - reference).max())
    print(f"staged vs WanPipeline max abs diff: {diff:.3e}")
    assert diff <= MAX_ABS_DIFF
    # WanPipeline runs cond and uncond as two forwards per step, the stages as one batched forward.
    assert staged_seen == {expert: list(dict.fromkeys(ts)) for expert, ts in reference_seen.items()}


def test_high_expert_runs_steps_at_or_above_boundary_and_low_the_rest(tiny: WanComponents) -> None:
    _, seen = run_staged(tiny, tiny_request(steps=8))
    boundary = ModelSpec().boundary_ratio * 1000
    assert seen["high"] == [999, 988, 973, 952, 923, 878]
    assert seen["low"] == [800, 633]
    assert all(t >= boundary for t in seen["high"]) and all(t < boundary for t in seen["low"])


def test_different_seeds_give_different_clips(tiny: WanComponents) -> None:
    first, _ = run_staged(tiny, tiny_request(seed=1))
    second, _ = run_staged(tiny, tiny_request(seed=2))
    assert float(np.abs(first - second).max()) > 1e-3
