"""loadtest/: the capacity simulator (deterministic, conserving, the Previz policy ahead of FCFS for
interactive shots), the cost model against the published Wan2.2 timings, and a bounded studio load run
against the session cluster whose JSON the simulator can replay."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from loadtest.capacity import Cluster, Shot, calibration_table, main, recommend, simulate, studio_mix
from loadtest.cost_model import A14B, CostModel, fit, worst_error
from loadtest.predict_run import predict_measured
from loadtest.studio_load import LoadPlan, StudioLoad, arrivals, jain, table
from pipeline.denoise.parallel import ParallelDegree
from tests.support.cluster import Cluster as LiveCluster

MODEL = CostModel()
SMALL = Cluster(high_replicas=1, low_replicas=1, decode_replicas=1, max_jobs_in_flight=8)


def mix(seed: int = 1, backlog: int = 0) -> list[Shot]:
    return studio_mix(seed=seed, rate_per_hour=60, hours=0.5, backlog=backlog, projects=3)


def test_the_cost_model_is_within_10_percent_of_every_published_point() -> None:
    errors = {
        point: abs(predicted - published) / published
        for point, (published, predicted) in MODEL.published_errors().items()
    }
    assert len(errors) == 6 and max(errors.values()) < 0.10, errors
    print("\n" + calibration_table(MODEL))


def test_the_fit_finds_one_parameter_set_for_all_six_points() -> None:
    fitted = fit(seed=3, samples=2_000, refinements=3_000)
    assert worst_error(fitted) < 0.10
    assert fitted.matmul_mfu <= 1 and fitted.attention_mfu <= 1


def test_the_cost_model_counts_tokens_sharding_and_rows_as_the_engine_does() -> None:
    assert A14B.num_video_tokens(1280, 720, 81) == 75_600 and A14B.num_video_tokens(832, 480, 81) == 32_760
    one = MODEL.forward_s(75_600, 2)
    assert MODEL.forward_s(75_600, 2, ParallelDegree(cfg=2)) < one / 1.9  # each half runs one row
    assert one / 8 < MODEL.forward_s(75_600, 2, ParallelDegree(ulysses=8)) < one / 4  # all-to-alls cost
    assert one / MODEL.forward_s(32_760, 2) > 1.2 * 75_600 / 32_760  # attention: quadratic in the tokens


def test_the_simulation_is_deterministic_for_a_seed_and_conserves_jobs_and_gpu_time() -> None:
    shots = mix(backlog=20)
    first, second = simulate(shots, SMALL, MODEL), simulate(shots, SMALL, MODEL)
    assert first.latency_s == second.latency_s and first.makespan_s == second.makespan_s
    assert simulate(mix(seed=2, backlog=20), SMALL, MODEL).latency_s != first.latency_s
    assert sorted(outcome.shot.id for outcome in first.outcomes) == sorted(shot.id for shot in shots)
    assert all(outcome.ended == 1 and outcome.done_s >= outcome.shot.arrival_s for outcome in first.outcomes)
    for stage, used in first.utilisation.items():
        assert 0 <= used <= 1, (stage, used)
    assert first.gpu_hours_per_1000_shots >= first.busy_gpu_hours_per_1000_shots > 0


def test_the_previz_policy_keeps_interactive_shots_far_ahead_of_fcfs_behind_a_500_shot_backlog() -> None:
    shots = studio_mix(seed=0, rate_per_hour=120, hours=1, backlog=500, projects=6)
    cluster = Cluster()
    previz, fcfs = simulate(shots, cluster, MODEL, "previz"), simulate(shots, cluster, MODEL, "fcfs")
    ours, theirs = previz.latency_s["interactive/draft"]["p95"], fcfs.latency_s["interactive/draft"]["p95"]
    print(f"\ninteractive draft p95: Previz {ours:.0f} s, FCFS {theirs:.0f} s")
    assert ours * 5 < theirs


def test_a_step_cache_and_more_replicas_shorten_the_batch() -> None:
    shots = mix(backlog=30)
    base = simulate(shots, SMALL, MODEL).makespan_s
    assert simulate(shots, SMALL, replace(MODEL, cache_skip=0.4)).makespan_s < base
    # the router before issue 26: one bucket stays on one replica until that replica is full
    affinity = replace(SMALL, router="affinity")
    doubled = replace(affinity, high_replicas=2, low_replicas=2, decode_replicas=2)
    assert simulate(shots, doubled, MODEL).makespan_s == pytest.approx(
        simulate(shots, affinity, MODEL).makespan_s, rel=0.05
    )
    spilling = replace(doubled, max_ongoing_requests=2)
    assert simulate(shots, spilling, MODEL).makespan_s < 0.8 * base
    # the load-aware router feeds the second replicas (within the 8 slots of this small cluster)
    load_aware = replace(doubled, router="load_aware")
    assert simulate(shots, load_aware, MODEL).makespan_s < 0.95 * base


def test_recommend_finds_the_cheapest_mix_that_meets_the_target() -> None:
    shots = mix(backlog=10)
    found = recommend(shots, MODEL, target_p95_s=120, base=SMALL, max_replicas=3)
    assert found is not None
    cluster, report = found
    assert report.latency_s["interactive/draft"]["p95"] <= 120
    cheaper = [
        replace(cluster, high_replicas=h, low_replicas=low, decode_replicas=d)
        for h in range(1, 4)
        for low in range(1, 4)
        for d in (1, 2, 4, 8)
        if replace(cluster, high_replicas=h, low_replicas=low, decode_replicas=d).total_gpus
        < cluster.total_gpus
    ]
    for candidate in cheaper:
        assert simulate(shots, candidate, MODEL).latency_s["interactive/draft"]["p95"] > 120


def test_the_cli_prints_tables_writes_json_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(
        [
            "--rate",
            "60",
            "--hours",
            "0.2",
            "--backlog",
            "5",
            "--json",
            str(tmp_path / "r.json"),
            "--plot",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert "policy previz" in out and "policy fcfs" in out and "GPU utilisation" in out
    assert set(json.loads((tmp_path / "r.json").read_text())) == {"previz", "fcfs"}
    for name in ("latency_cdf.png", "queue_length.png", "utilisation.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jains_index() -> None:
    assert jain([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert jain([1.0, 0.0, 0.0]) == pytest.approx(1 / 3)


def test_the_load_trace_is_one_poisson_trace_per_seed() -> None:
    plan = LoadPlan(rate_per_hour=3600, max_shots=50, max_seconds=1e9)
    assert arrivals(plan) == arrivals(plan) and arrivals(plan) != arrivals(replace(plan, seed=1))
    times = [arrival.at_s for arrival in arrivals(plan)]
    assert len(times) == 50 and times == sorted(times)


@pytest.mark.cluster
def test_a_bounded_studio_load_run_completes_and_the_simulator_replays_it(cluster: LiveCluster) -> None:
    import asyncio

    plan = LoadPlan(
        projects=2, rate_per_hour=1800, max_shots=6, max_seconds=60, board_shots=2, board_variants=1
    )
    result = asyncio.run(StudioLoad(cluster.url, cluster.key_for("default", "studio_admin"), plan).run())
    print("\n" + table(result))
    assert result["errors"] == [] and result["videos"] >= 6
    assert result["completed"] == result["videos"]
    for field in (
        "plan",
        "tiers",
        "wall_s",
        "throughput_per_hour",
        "rejected_429",
        "classes",
        "projects",
        "jain_fairness",
        "records",
    ):
        assert field in result, field
    for values in result["classes"].values():
        assert values["time_to_done_s"]["p95"] >= values["time_to_first_progress_s"]["p50"] > 0
    assert 0 < result["jain_fairness"] <= 1
    print(predict_measured(json.loads(json.dumps(result))))
