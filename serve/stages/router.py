"""Bucket affinity: denoiser calls of one latent shape go to the same replica, so they meet in one engine.

Rendezvous (highest-random-weight) hashing maps a bucket key to a replica; adding or removing a replica
moves only the buckets that hashed to it. The ranking is a list of tiers for Serve's router: the
preferred replica first, then the rest as a fallback when it is full or gone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

BUCKET_KWARG = "bucket"  # handle calls pass the bucket key as this keyword argument


def rendezvous_rank(bucket: str, replica_ids: Sequence[str]) -> list[str]:
    """Replica ids ordered by preference for `bucket` (stable for a given set of replicas)."""
    return sorted(replica_ids, key=lambda replica: _weight(bucket, replica), reverse=True)


def _weight(bucket: str, replica: str) -> int:
    digest = hashlib.blake2b(f"{bucket}|{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class BucketAffinityRouter(RequestRouter):
    """Serve request router for the denoiser deployments."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        bucket = None
        if pending_request is not None:
            bucket = pending_request.kwargs.get(BUCKET_KWARG)
        if bucket is None or len(candidate_replicas) <= 1:
            return [candidate_replicas]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        ranked = [by_id[replica_id] for replica_id in rendezvous_rank(str(bucket), list(by_id))]
        return [[ranked[0]], ranked[1:]]
