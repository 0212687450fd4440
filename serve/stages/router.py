"""Load-aware bucket affinity for the denoiser deployments (bounded-load rendezvous hashing).

Each replica reports its queued work through Serve's routing-stats hook (`record_routing_stats` on the
deployment, read here as `RunningReplica.routing_stats`): the engine's token-steps (tokens per forward,
CFG rows included, x steps left, summed over its unfinished requests; see EngineStats). A bucket key
prefers one replica by rendezvous (highest-random-weight) hashing, so same-shape calls meet in one engine
and adding or removing a replica moves only the buckets it held. The preferred replica keeps the call
only while its queued work stays within `load_factor` x the mean over the candidates plus the call's own
work (Mirrokni et al., "Consistent hashing with bounded loads", 2018: the additive call is their ceiling,
so an idle deployment still gathers a bucket on one replica); otherwise the least-loaded replica takes
it. Priority stays in the engines: Serve's FIFO queue never holds the backlog (max_ongoing_requests is
far above what the Scheduler keeps in flight).

Reports arrive every `request_routing_stats_period_s`; calls this router chose a replica for after its last
report are added to it at the router's running estimate of a call's work, so a burst between two reports
still spreads. A call counts from the moment it is chosen, not from Serve's `on_request_routed`: Serve runs
several routing tasks at once and calls that hook only once the replica has accepted, so a burst decided
in between all saw the same loads (on the live cluster the 6 claims of a one-size board all met on one of
2 replicas).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from pipeline.denoise.engine import EngineStats

BUCKET_KWARG = "bucket"  # handle calls pass the bucket key as this keyword argument
DEFAULT_LOAD_FACTOR = 1.25  # SGLang's cache-aware router gives up affinity at 1.5x; Ray's prefix router ~


@dataclass(frozen=True, slots=True)
class RoutingStats:
    """What a denoiser replica reports to the routers (`record_routing_stats` returns `as_dict()`)."""

    queued_token_steps: int  # Σ tokens per forward x steps left over its unfinished requests
    num_requests: int  # unfinished requests in its engine(s)
    queued_work_seconds: float  # the token-steps at its measured rate (metrics and autoscaling)
    reported_at: float  # time.time() on the replica when measured

    def as_dict(self) -> dict[str, Any]:
        return {
            "queued_token_steps": self.queued_token_steps,
            "num_requests": self.num_requests,
            "queued_work_seconds": self.queued_work_seconds,
            "reported_at": self.reported_at,
        }

    @classmethod
    def from_dict(cls, stats: Mapping[str, Any]) -> RoutingStats | None:
        """None for a replica that has not reported yet (Serve gives an empty dict)."""
        if "queued_token_steps" not in stats:
            return None
        return cls(
            queued_token_steps=int(stats["queued_token_steps"]),
            num_requests=int(stats["num_requests"]),
            queued_work_seconds=float(stats["queued_work_seconds"]),
            reported_at=float(stats["reported_at"]),
        )


def replica_routing_stats(engines: Sequence[EngineStats], now: float | None = None) -> RoutingStats:
    """A replica's report: its engines' queued work summed (a colocated replica's spans both experts)."""
    return RoutingStats(
        queued_token_steps=sum(stats.num_queued_token_steps for stats in engines),
        num_requests=sum(stats.num_waiting + stats.num_running for stats in engines),
        queued_work_seconds=sum(stats.queued_work_seconds for stats in engines),
        reported_at=time.time() if now is None else now,
    )


def rendezvous_rank(bucket: str, replica_ids: Sequence[str]) -> list[str]:
    """Replica ids ordered by preference for `bucket` (stable for a given set of replicas)."""
    return sorted(replica_ids, key=lambda replica: _weight(bucket, replica), reverse=True)


def _weight(bucket: str, replica: str) -> int:
    digest = hashlib.blake2b(f"{bucket}|{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True, slots=True)
class Choice:
    """One routing decision: the tiers for Serve and whether the bucket kept its preferred replica."""

    tiers: list[list[str]]  # replica ids, most preferred tier first
    preferred: str  # the bucket's rendezvous choice
    kept_affinity: bool
    bound: float  # the load the preferred replica had to stay within


def choose(bucket: str, loads: Mapping[str, float], call_work: float, load_factor: float) -> Choice:
    """Bounded-load rendezvous over `loads` (replica id -> queued work, any unit shared by all).

    The preferred replica keeps the call while its load <= load_factor x mean + call_work; otherwise the
    least-loaded replica (ties: rendezvous order) is tried first, then the rest by load. Written by hand:
    Ray Serve ships PowerOfTwoChoices and a prefix-aware router, no bounded-load consistent hashing
    (Mirrokni et al. 2018); Serve only supplies the hook this plugs into."""
    if not loads:
        raise ValueError("no replicas to route to")
    if load_factor < 1.0:
        raise ValueError(f"`load_factor` must be at least 1.0 (1.0: strict balance), got {load_factor}.")
    ranked = rendezvous_rank(bucket, list(loads))
    preferred = ranked[0]
    bound = load_factor * sum(loads.values()) / len(loads) + call_work
    if loads[preferred] <= bound:
        return Choice([[preferred], ranked[1:]] if len(ranked) > 1 else [[preferred]], preferred, True, bound)
    by_load = sorted(ranked, key=lambda replica: loads[replica])  # stable: ties keep rendezvous order
    return Choice([[by_load[0]], by_load[1:]], preferred, False, bound)


@dataclass
class LoadView:
    """The router's picture of each replica's queued work: its last report plus what was sent since."""

    call_work: float = 1.0  # running estimate of one call's token-steps, learned from the reports
    # replica id -> (time sent, estimated work) of calls routed after its last report
    sent: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def loads(self, reports: Mapping[str, RoutingStats | None]) -> dict[str, float]:
        self._learn(reports)
        loads = {}
        for replica, report in reports.items():
            since = report.reported_at if report is not None else float("-inf")
            recent = [entry for entry in self.sent.get(replica, []) if entry[0] > since]
            self.sent[replica] = recent
            queued = report.queued_token_steps if report is not None else 0
            loads[replica] = queued + sum(work for _, work in recent)
        for gone in set(self.sent) - set(reports):
            del self.sent[gone]
        return loads

    def record(self, replica: str, now: float | None = None) -> None:
        self.sent.setdefault(replica, []).append((time.time() if now is None else now, self.call_work))

    def _learn(self, reports: Mapping[str, RoutingStats | None]) -> None:
        busy = [report for report in reports.values() if report is not None and report.num_requests > 0]
        if busy:  # the mean queued request is what one more call will add, give or take its steps done
            mean = sum(r.queued_token_steps for r in busy) / sum(r.num_requests for r in busy)
            self.call_work = max(mean, 1.0)


class BucketAffinityRouter(RequestRouter):
    """Serve request router for the denoiser deployments (bounded-load rendezvous on queued work)."""

    def initialize_state(self, load_factor: float = DEFAULT_LOAD_FACTOR, **kwargs: Any) -> None:
        if load_factor < 1.0:
            raise ValueError(f"`load_factor` must be at least 1.0 (1.0: strict balance), got {load_factor}.")
        self.load_factor = load_factor
        self.view = LoadView()
        self.decisions: dict[bool, int] = {True: 0, False: 0}  # kept affinity -> calls (metrics read it)
        # The decisions' metric labels: the Serve app and deployment this handle routes to (Serve sets the
        # DeploymentID before it calls initialize_state). Two apps on one cluster count apart.
        self.metric_tags = {
            "application": self._deployment_id.app_name,
            "deployment": self._deployment_id.name,
        }

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
        reports = {rid: RoutingStats.from_dict(replica.routing_stats or {}) for rid, replica in by_id.items()}
        choice = choose(str(bucket), self.view.loads(reports), self.view.call_work, self.load_factor)
        # a denoise call adds work to its replica until that replica's next report, counted now (see the
        # module docstring); a `stats(bucket)` call adds none. Serve may try a later tier when the first
        # refuses (never below max_ongoing_requests): then this count is on the wrong replica for a second.
        if pending_request.metadata.call_method == "denoise":
            self.view.record(choice.tiers[0][0])
        self.decisions[choice.kept_affinity] += 1
        record_affinity(choice.kept_affinity, **self.metric_tags)
        return [[by_id[rid] for rid in tier] for tier in choice.tiers if tier]


def record_affinity(kept: bool, application: str, deployment: str) -> None:
    """Count the decision in the metrics (imported late: the router runs in every handle's process)."""
    from serve.metrics import record_routing_decision

    record_routing_decision(kept, application, deployment)
