"""The simulator follows the product's router and lanes: on one-size loads more expert replicas add
throughput with the load-aware router (and none with the router before it), and lanes admit interactive
shots past a batch backlog."""

from __future__ import annotations

from dataclasses import replace

from loadtest.capacity import (
    NODE,
    Cluster,
    Shot,
    one_size_load,
    recommend,
    scale_out_rows,
    scale_out_table,
    simulate,
    studio_mix,
)
from loadtest.cost_model import CostModel
from pipeline.denoise.parallel import ParallelDegree

MODEL = CostModel()


def test_doubled_expert_replicas_nearly_double_one_size_throughput_only_with_the_load_aware_router() -> None:
    rows = scale_out_rows(MODEL, sizes=("720p",), num_shots=96)
    print("\n" + scale_out_table(rows))
    by = {(row["tier"], row["router"]): row for row in rows}
    for tier in ("draft", "final"):
        assert by[tier, "load_aware"]["speedup"] >= 1.8
        assert 0.9 <= by[tier, "affinity"]["speedup"] <= 1.1
        assert (
            by[tier, "load_aware"]["shots_per_hour_per_node"]
            > by[tier, "affinity"]["shots_per_hour_per_node"]
        )


def test_reserved_interactive_slots_admit_drafts_past_a_final_backlog() -> None:
    backlog = [Shot(i, "p0", "batch", "final", "480p", 0.0) for i in range(60)]
    drafts = [Shot(60 + i, "p1", "interactive", "draft", "480p", 120.0 + 30 * i) for i in range(10)]
    shots = backlog + drafts
    none_reserved = simulate(shots, replace(NODE, interactive_slots=0), MODEL)
    reserved = simulate(shots, replace(NODE, interactive_slots=4), MODEL)

    def admission_wait(report) -> float:  # noqa: ANN001
        waits = [o.admitted_s - o.shot.arrival_s for o in report.outcomes if o.shot.klass == "interactive"]
        return max(waits)

    print(f"\ndraft admission wait, worst: {admission_wait(none_reserved):.0f} s without lanes, "
          f"{admission_wait(reserved):.0f} s with 4 reserved slots")  # fmt: skip
    assert admission_wait(reserved) == 0.0 < admission_wait(none_reserved)
    assert (
        reserved.latency_s["interactive/draft"]["p95"] < none_reserved.latency_s["interactive/draft"]["p95"]
    )


def test_one_size_loads_are_one_bucket() -> None:
    shots = one_size_load(8, "720p", "draft")
    assert {(s.size, s.tier, s.klass, s.arrival_s) for s in shots} == {("720p", "draft", "interactive", 0.0)}


def test_recommend_finds_a_mix_for_a_one_size_720p_draft_load_at_a_60_s_p95() -> None:
    """The README's `--size 720p --backlog 0 --rate 120 --hours 1 --interactive-share 1 --high-ulysses 4
    --high-cfg 1 --low-ulysses 4 --low-cfg 1 --recommend --target-p95 60`, and the mix it finds is the
    cheapest: one fewer expert or decode replica misses the target."""
    shots = studio_mix(seed=0, rate_per_hour=120, hours=1, interactive_share=1.0, sizes=("720p",))
    assert {(shot.size, shot.tier, shot.klass) for shot in shots} == {("720p", "draft", "interactive")}
    base = Cluster(high_degree=ParallelDegree(ulysses=4), low_degree=ParallelDegree(ulysses=4))
    found = recommend(shots, MODEL, target_p95_s=60, base=base, max_replicas=4)
    assert found is not None
    cluster, report = found
    p95 = report.latency_s["interactive/draft"]["p95"]
    print(f"\nrecommended {cluster.gpus}: {cluster.total_gpus:g} GPUs, p95 {p95:.1f} s")
    assert p95 <= 60
    for fewer in (
        replace(cluster, high_replicas=cluster.high_replicas - 1),
        replace(cluster, low_replicas=cluster.low_replicas - 1),
        replace(cluster, decode_replicas=cluster.decode_replicas // 2),
    ):
        if min(fewer.high_replicas, fewer.low_replicas, fewer.decode_replicas) >= 1:
            assert simulate(shots, fewer, MODEL).latency_s["interactive/draft"]["p95"] > 60
