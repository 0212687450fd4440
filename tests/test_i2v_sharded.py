"""A sharded I2V request equals its one-process run: the `tiny-i2v` preset's experts over a rank group of
this machine (gloo on CPU: Ulysses 2, CFG 2), a final and a draft (its distill LoRA on every rank), each
conditioned on a storyboard panel (the draft on a first and a last frame too), give the unsharded
LocalPipeline's latents. The condition travels in the rows every rank receives (36 channels in, 16 out)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.denoise.parallel import ParallelDegree
from pipeline.local import LocalPipeline, sharded_pipeline
from pipeline.vae_encode import Keyframes
from pipeline.weights import build_preset
from tests.support.wan_reference import panel, tiny_request

MAX_ABS_DIFF = 1e-5  # fp32, as the sharded T2V tests (tests/test_sharded_engine.py)
WIDTH, HEIGHT = 96, 64
CASES = {
    "final": (tiny_request(resolution=f"{WIDTH}x{HEIGHT}", steps=6, cache=None), False),
    "draft-first+last": (tiny_request(resolution=f"{WIDTH}x{HEIGHT}", quality="draft", steps=None), True),
}


def keyframes(with_last: bool) -> Keyframes:
    return Keyframes(first=panel(WIDTH, HEIGHT, 5), last=panel(WIDTH, HEIGHT, 6) if with_last else None)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """case -> latents of its one-process run (a fresh build of the preset: its own adapters)."""
    pipeline = LocalPipeline(build_preset("tiny-i2v"), cache_dir=tmp_path_factory.mktemp("loras"))
    return {name: pipeline.latents(request, keyframes(last)) for name, (request, last) in CASES.items()}


@pytest.mark.parametrize(
    "degree", [ParallelDegree(ulysses=2), ParallelDegree(cfg=2)], ids=["ulysses2", "cfg2"]
)
def test_a_sharded_i2v_final_and_draft_equal_their_one_process_runs(
    degree: ParallelDegree, one_process: dict, tmp_path: Path
) -> None:
    with sharded_pipeline(build_preset("tiny-i2v"), degree, cache_dir=tmp_path) as pipeline:
        assert pipeline.degree == degree and pipeline.vae_encoder is not None
        for name, (request, last) in CASES.items():
            latents = pipeline.latents(request, keyframes(last))
            diff = float((latents - one_process[name]).abs().max())
            print(f"{degree}: sharded I2V {name} vs one process: {diff:.3e}")
            assert diff <= MAX_ABS_DIFF, name
