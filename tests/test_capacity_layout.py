"""The capacity simulator's colocated layout (loadtest/capacity.py `layout="colocated"`): the Denoiser's
replicas hold both experts, a job's steps stay on the replica that took it, and a lone job takes the same
time as on a split pair of the same degree (no hop is modelled in either: the difference is in sharing)."""

from __future__ import annotations

from dataclasses import replace

from loadtest.capacity import A14B, Cluster, Shot, simulate, studio_mix
from loadtest.cost_model import CostModel
from pipeline.denoise.parallel import ParallelDegree

MODEL = CostModel()
U4 = ParallelDegree(ulysses=4)
SPLIT = Cluster(high_replicas=1, low_replicas=1, high_degree=U4, low_degree=U4, decode_replicas=1)
COLOCATED = replace(SPLIT, layout="colocated", low_replicas=0)


def test_a_colocated_cluster_provisions_one_denoiser_stage_and_ends_every_job_once() -> None:
    shots = studio_mix(seed=3, rate_per_hour=60, hours=0.5, backlog=10, projects=3)
    report = simulate(shots, COLOCATED, MODEL)
    assert COLOCATED.gpus == {"text": 0.5, "denoiser": 4, "decode": 1.0} and COLOCATED.total_gpus == 5.5
    assert set(report.utilisation) == {"text", "denoiser", "decode"}
    assert all(0 < used <= 1 for used in report.utilisation.values()), report.utilisation
    assert sorted(o.shot.id for o in report.outcomes) == sorted(shot.id for shot in shots)
    assert all(outcome.ended == 1 for outcome in report.outcomes)


def test_a_lone_job_takes_its_steps_plus_the_serial_stages_in_either_layout() -> None:
    for tier, steps, rows in (("final", 40, 2), ("draft", 4, 1)):
        shot = [Shot(0, "p0", "interactive", tier, "720p", 0.0)]
        tokens = A14B.num_video_tokens(1280, 720, 81)
        expected = (
            SPLIT.text_s
            + steps * MODEL.forward_s(tokens, rows, U4)
            + MODEL.serial_s(1280, 720, 81)
            + SPLIT.finish_s
        )
        for cluster in (SPLIT, COLOCATED):
            latency = simulate(shot, cluster, MODEL).latency_s[f"interactive/{tier}"]["p50"]
            assert abs(latency - expected) < 1e-6, (cluster.layout, tier, latency, expected)


def test_eight_gpus_as_one_colocated_group_finish_a_backlog_sooner_than_the_uneven_split() -> None:
    """The issue's 8-GPU node: high Ulysses 5 + low CFG 2 leaves the high group idle while the low group
    is the bottleneck; both experts on one Ulysses 4 x CFG 2 group keep all 8 busy."""
    backlog = [Shot(i, "p0", "batch", "final", "720p", 0.0) for i in range(12)]
    split = replace(SPLIT, high_degree=ParallelDegree(ulysses=5), low_degree=ParallelDegree(cfg=2))
    colocated = replace(COLOCATED, high_degree=ParallelDegree(ulysses=4, cfg=2))
    assert split.gpus["high"] + split.gpus["low"] == 7 and colocated.gpus["denoiser"] == 8
    ours, theirs = simulate(backlog, colocated, MODEL), simulate(backlog, split, MODEL)
    rates = [12 / report.makespan_s * 3600 for report in (ours, theirs)]
    print(f"\n12 720p finals: colocated U4xC2 {rates[0]:.1f} clips/h, split U5 + C2 {rates[1]:.1f} clips/h")
    assert ours.makespan_s < theirs.makespan_s
    assert ours.utilisation["denoiser"] > max(theirs.utilisation["high"], theirs.utilisation["low"])
