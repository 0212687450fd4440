"""Bucket affinity: the same bucket always prefers the same denoiser replica; removing one moves little."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest

from pipeline.denoise.engine import EngineStats
from serve.stages.router import (
    BucketAffinityRouter,
    LoadView,
    RoutingStats,
    choose,
    rendezvous_rank,
    replica_routing_stats,
)

REPLICAS = ["r-a", "r-b", "r-c", "r-d"]
BUCKETS = [
    f"{w}x{h}x{f}" for w, h in ((832, 480), (480, 832), (1280, 720), (720, 1280)) for f in (17, 41, 81)
]


def test_a_bucket_always_prefers_the_same_replica() -> None:
    for bucket in BUCKETS:
        assert rendezvous_rank(bucket, REPLICAS)[0] == rendezvous_rank(bucket, list(reversed(REPLICAS)))[0]


def test_ranking_lists_every_replica_once_as_the_fallback_tier() -> None:
    assert sorted(rendezvous_rank("832x480x81", REPLICAS)) == sorted(REPLICAS)


def test_buckets_spread_over_replicas() -> None:
    assert len({rendezvous_rank(bucket, REPLICAS)[0] for bucket in BUCKETS}) >= 3


def test_removing_a_replica_moves_only_the_buckets_it_held() -> None:
    before = {bucket: rendezvous_rank(bucket, REPLICAS)[0] for bucket in BUCKETS}
    remaining = [r for r in REPLICAS if r != "r-b"]
    after = {bucket: rendezvous_rank(bucket, remaining)[0] for bucket in BUCKETS}
    moved = {bucket for bucket in BUCKETS if before[bucket] != after[bucket]}
    assert moved == {bucket for bucket in BUCKETS if before[bucket] == "r-b"}


# ---- bounded load ------------------------------------------------------------------------------------

BUCKET = "832x480x17"
PREFERRED = rendezvous_rank(BUCKET, REPLICAS)[0]


def test_balanced_load_keeps_the_buckets_replica() -> None:
    loads = dict.fromkeys(REPLICAS, 100.0)
    choice = choose(BUCKET, loads, call_work=10.0, load_factor=1.25)
    assert choice.kept_affinity and choice.tiers[0] == [PREFERRED]
    assert sorted(choice.tiers[1]) == sorted(r for r in REPLICAS if r != PREFERRED)


def test_idle_deployment_gathers_a_bucket_on_one_replica() -> None:
    """Under light load same-shape calls meet in one engine: the call's own work is the bound's slack."""
    loads = dict.fromkeys(REPLICAS, 0.0)
    for _ in range(2):
        choice = choose(BUCKET, loads, call_work=10.0, load_factor=1.25)
        assert choice.kept_affinity
        loads[choice.tiers[0][0]] += 10.0
    assert loads[PREFERRED] == 20.0
    # the third is over 1.25 x the mean (5) + its own 10 on four replicas: an idle one takes it
    third = choose(BUCKET, loads, call_work=10.0, load_factor=1.25)
    assert not third.kept_affinity and loads[third.tiers[0][0]] == 0.0


def test_skewed_load_gives_up_affinity_for_the_least_loaded() -> None:
    loads = dict.fromkeys(REPLICAS, 50.0)
    loads[PREFERRED] = 400.0
    idle = next(r for r in REPLICAS if r != PREFERRED)
    loads[idle] = 0.0
    choice = choose(BUCKET, loads, call_work=10.0, load_factor=1.25)
    assert not choice.kept_affinity
    assert choice.tiers[0] == [idle]
    assert choice.tiers[1][-1] == PREFERRED  # the rest by load: the overloaded one last


def test_affinity_is_kept_up_to_the_bound_and_given_up_past_it() -> None:
    others = dict.fromkeys((r for r in REPLICAS if r != PREFERRED), 100.0)
    # bound = 1.5 x mean + 10 with mean = (300 + x) / 4: the preferred replica's x meets it at x = 196
    edge = (1.5 * 300 / 4 + 10) / (1 - 1.5 / 4)
    assert edge == pytest.approx(196.0)
    assert choose(BUCKET, {**others, PREFERRED: edge}, 10.0, 1.5).kept_affinity
    assert not choose(BUCKET, {**others, PREFERRED: edge + 1}, 10.0, 1.5).kept_affinity


def test_a_dead_replica_drops_out_and_its_buckets_move_to_their_next_choice() -> None:
    """Serve passes only live candidates; a bucket whose replica died prefers its rendezvous runner-up."""
    runner_up = rendezvous_rank(BUCKET, REPLICAS)[1]
    alive = {r: 0.0 for r in REPLICAS if r != PREFERRED}
    choice = choose(BUCKET, alive, call_work=1.0, load_factor=1.25)
    assert choice.tiers[0] == [runner_up] and PREFERRED not in sum(choice.tiers, [])


def test_a_load_factor_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="load_factor"):
        choose(BUCKET, {"r-a": 0.0}, 1.0, 0.9)


def test_calls_sent_since_a_report_count_until_the_next_one() -> None:
    view = LoadView()
    reports = {"r-a": RoutingStats(1000, 10, 0.0, reported_at=100.0), "r-b": None}
    assert view.loads(reports) == {"r-a": 1000.0, "r-b": 0.0}
    assert view.call_work == 100.0  # the mean queued request
    view.record("r-b", now=101.0)
    view.record("r-a", now=99.0)  # before r-a's report: already in it
    assert view.loads(reports) == {"r-a": 1000.0, "r-b": 100.0}
    fresh = {"r-a": reports["r-a"], "r-b": RoutingStats(300, 3, 0.0, reported_at=102.0)}
    assert view.loads(fresh)["r-b"] == 300.0


def test_a_burst_routed_before_serve_confirms_any_call_spreads_past_the_bound() -> None:
    """Serve runs routing tasks concurrently and calls `on_request_routed` only once a replica accepted, so
    the router counts a denoise call when it chooses it: 6 calls of one bucket chosen back to back, before
    any replica reported, go 3 to the preferred replica, the 4th (over 1.25 x mean + a call) to the other,
    then back while the preferred is within the bound (live, before: all 6 of a board on one replica).
    `stats(bucket)` probes add no work."""

    async def route(replicas: list[Any], method: str) -> str:
        request = PendingRequest(
            args=[], kwargs={"bucket": BUCKET}, metadata=RequestMetadata("r", "i", call_method=method)
        )
        return (await router.choose_replicas(replicas, request))[0][0].replica_id.unique_id

    async def burst() -> tuple[list[str], list[str]]:
        replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=r), routing_stats={}) for r in "ab"]
        probes = [await route(replicas, "stats") for _ in range(4)]
        return probes, [await route(replicas, "denoise") for _ in range(6)]

    router = serve_router(load_factor=1.25)
    probes, calls = asyncio.run(burst())
    preferred, other = rendezvous_rank(BUCKET, ["a", "b"])
    assert probes == [preferred] * 4
    assert calls == [preferred, preferred, preferred, other, preferred, preferred]
    assert router.decisions == {True: 9, False: 1}


def test_the_decisions_are_labelled_with_the_app_and_deployment_routed_to() -> None:
    """Two apps on one cluster (the live routing test's beside the session's) count their decisions apart."""
    router = serve_router(load_factor=1.5)
    assert router.metric_tags == {"application": "previz-route", "deployment": "HighNoiseDenoiser"}
    assert router.load_factor == 1.5


def serve_router(load_factor: float) -> BucketAffinityRouter:
    """The router as Serve makes it for a handle to previz-route's HighNoiseDenoiser (no cluster needed)."""
    router = BucketAffinityRouter(
        deployment_id=DeploymentID(name="HighNoiseDenoiser", app_name="previz-route"),
        handle_source=DeploymentHandleSource.UNKNOWN,
    )
    router.initialize_state(load_factor=load_factor)
    return router


def test_a_replica_reports_both_experts_queued_work() -> None:
    stats = [_stats("high", token_steps=600, waiting=1, running=2), _stats("low", token_steps=400, waiting=1)]
    report = replica_routing_stats(stats, now=5.0)
    assert report == RoutingStats(1000, 4, 0.0, 5.0)
    assert RoutingStats.from_dict(report.as_dict()) == report
    assert RoutingStats.from_dict({}) is None


def _stats(expert: str, token_steps: int, waiting: int = 0, running: int = 0) -> EngineStats:
    return EngineStats(
        expert=expert, num_queued_by_bucket={}, num_waiting=waiting, num_running=running, num_iterations=0,
        num_forwards=0, num_rows=0, num_cached_steps=0, num_cache_bytes=0, max_cache_bytes=0,
        num_finished=0, num_cancelled=0, num_failed=0, batch_size_histogram={}, mean_batch_size=0.0,
        mean_num_tokens=0.0, max_num_tokens=1, iterations_per_second=0.0, num_queued_token_steps=token_steps,
    )  # fmt: skip


# ---- property: no replica is given work over the bound while another is idle ---------------------------


@settings(max_examples=200, deadline=None)
@given(
    num_replicas=st.integers(min_value=2, max_value=6),
    load_factor=st.floats(min_value=1.0, max_value=3.0),
    calls=st.lists(
        st.tuples(st.sampled_from(BUCKETS), st.floats(min_value=1.0, max_value=1000.0)),
        min_size=1,
        max_size=60,
    ),
    finished=st.lists(st.integers(min_value=0, max_value=5), max_size=60),
)
def test_no_replica_exceeds_the_bound_while_another_is_idle(
    num_replicas: int, load_factor: float, calls: list[tuple[str, float]], finished: list[int]
) -> None:
    replicas = [f"replica-{i}" for i in range(num_replicas)]
    loads = dict.fromkeys(replicas, 0.0)
    for index, (bucket, work) in enumerate(calls):
        choice = choose(bucket, loads, work, load_factor)
        target = choice.tiers[0][0]
        bound = load_factor * sum(loads.values()) / len(loads) + work
        if loads[target] > bound:
            raise AssertionError(f"{target} at {loads[target]} got work over the bound {bound}")
        if not choice.kept_affinity and 0.0 in loads.values():
            assert loads[target] == 0.0, "affinity given up, yet an idle replica was passed over"
        assert sorted(sum(choice.tiers, [])) == sorted(replicas)  # every live replica stays a fallback
        loads[target] += work
        if index < len(finished):  # a replica finishes its work now and then: loads fall as well as rise
            drained = replicas[finished[index] % num_replicas]
            loads[drained] = 0.0
