"""The layout planner reproduces the figures issue 25 quotes from the cost model, and its table names them."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.cost_model import CostModel
from loadtest.layout_plan import TODAY_GPU_NODE, DecodeChoice, NodePlan, cached_final_steps, candidates, main
from pipeline.denoise.parallel import ParallelDegree

MODEL = CostModel()
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def colocated(ulysses: int = 1, cfg: int = 1, groups: int = 1) -> NodePlan:
    degree = ParallelDegree(ulysses=ulysses, cfg=cfg)
    return NodePlan("colocated", degree, degree, groups)


def test_todays_gpu_node_takes_338_s_for_a_720p_final_and_paces_20_clips_an_hour() -> None:
    assert TODAY_GPU_NODE.latency_s(MODEL, "720p", "final") == pytest.approx(338, abs=1)
    assert TODAY_GPU_NODE.latency_s(MODEL, "480p", "final") == pytest.approx(108, abs=1)
    assert TODAY_GPU_NODE.clips_per_hour(MODEL, "720p", "final") == pytest.approx(20, abs=0.5)


def test_both_experts_on_all_eight_gpus_give_152_s_and_27_clips_an_hour() -> None:
    plan = colocated(ulysses=4, cfg=2)
    assert plan.gpus == 8
    assert plan.latency_s(MODEL, "720p", "final") == pytest.approx(152, abs=1)
    assert plan.clips_per_hour(MODEL, "720p", "final") == pytest.approx(27, abs=0.5)


@pytest.mark.parametrize(
    ("ulysses", "seconds_720p", "seconds_480p"), [(1, 70, 24), (4, 31.5, 12), (8, 24.9, 10)]
)
def test_a_draft_shards_by_ulysses(ulysses: int, seconds_720p: float, seconds_480p: float) -> None:
    plan = colocated(ulysses=ulysses)
    assert plan.latency_s(MODEL, "720p", "draft") == pytest.approx(seconds_720p, abs=0.5)
    assert plan.latency_s(MODEL, "480p", "draft") == pytest.approx(seconds_480p, abs=0.5)
    # a CFG half idles on a draft (one row): U4 x C2 drafts as fast as U4 alone
    if ulysses == 4:
        assert colocated(ulysses=4, cfg=2).latency_s(MODEL, "720p", "draft") == pytest.approx(
            plan.latency_s(MODEL, "720p", "draft"),
            abs=0.01,  # the halves' gather latency only
        )


def test_the_default_final_cache_computes_15_high_and_8_low_noise_steps_on_magcaches_curve() -> None:
    assert cached_final_steps() == (15, 8)
    plan = colocated(ulysses=8)
    assert plan.latency_s(MODEL, "720p", "cached") < plan.latency_s(MODEL, "720p", "final")


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_every_candidate_fits_the_node(gpus: int) -> None:
    plans = candidates(gpus)
    assert plans and all(plan.gpus <= gpus for plan in plans)
    assert any(plan.layout == "colocated" and plan.gpus == gpus for plan in plans)


def test_the_plan_table_is_labelled_modelled(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("modelled (loadtest/cost_model.py") and "colocated 1 x U8" in out


def test_each_tier_takes_its_decoder_fast_drafts_and_finals_split_over_the_decoders_ranks() -> None:
    plan = colocated(ulysses=8)
    fast = DecodeChoice(draft="fast")
    # the fast decoder takes 0.25 / 5.5 of the full VAE's decode: 12.8 s instead of 24.9 s a 720p draft
    assert plan.latency_s(MODEL, "720p", "draft", fast) == pytest.approx(12.8, abs=0.1)
    assert plan.latency_s(MODEL, "720p", "final", fast) == plan.latency_s(MODEL, "720p", "final")  # VAE
    split = DecodeChoice(ranks=4)
    assert plan.latency_s(MODEL, "720p", "final", split) < plan.latency_s(MODEL, "720p", "final")
    assert plan.latency_s(MODEL, "720p", "draft", DecodeChoice(ranks=4, draft="fast")) == pytest.approx(
        plan.latency_s(MODEL, "720p", "draft", fast)  # the fast decoder runs on one GPU
    )
    assert plan.latency_s(MODEL, "720p", "final", DecodeChoice(dtype="float32")) > plan.latency_s(
        MODEL, "720p", "final"
    )


def test_the_decode_choices_come_from_a_deploy_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert DecodeChoice.from_config(DEPLOY / "gpu-node.yaml") == DecodeChoice()  # auto on a GPU: bf16
    config = tmp_path / "node.yaml"
    decoder = "{parallel: 2, draft: fast, dtype: float32}"
    config.write_text(f"applications:\n  - name: previz\n    args:\n      decoder: {decoder}\n")
    assert DecodeChoice.from_config(config) == DecodeChoice(ranks=2, dtype="float32", draft="fast")
    assert main(["--config", str(config), "--decode-ranks", "4"]) == 0
    assert "decode: drafts by the fast TAEHV decoder, finals by the full VAE in float32 on 4 GPUs" in (
        capsys.readouterr().out
    )
