"""Bucket affinity: the same bucket always prefers the same denoiser replica; removing one moves little."""

from __future__ import annotations

from serve.stages.router import rendezvous_rank

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
