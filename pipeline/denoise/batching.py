"""The engine's planner: which live requests share the next forward. Pure Python, no tensors.

One iteration serves one bucket (latent shape, quality tier and adapter set), because only
same-shape latents stack into one forward, a forward runs with one set of LoRA adapters, and a tier
fixes the solver (and so the timestep dtype). The bucket is the one holding the most urgent request;
the batch is filled from it, most urgent first, until the token budget or the batch-size cap is
reached. Urgency is priority class, then deadline (earliest first, none last), then arrival. A
request whose own tokens exceed the budget still runs, alone, so an oversized request is slow but
never starves. A request whose next step reuses its step cache (`skips_next`, set by the engine) takes
no rows in the forward: it joins the batch without spending the budget.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

from pipeline.priority import PRIORITY_RANK, Priority

# Latent shape (channels, frames, height, width): requests batch together only when it matches.
Bucket = tuple[int, ...]
# (adapter name, weight) pairs, sorted: the LoRA adapters a forward runs with (pipeline.spec.AdapterSet)
AdapterSet = tuple[tuple[str, float], ...]
# What must match for two requests to share a forward: (latent shape, quality tier, adapter set).
BatchKey = tuple[Bucket, str, AdapterSet]


class RequestStatus(enum.IntEnum):
    """Where a request stands in one engine; anything at or after FINISHED is a finished status."""

    WAITING = enum.auto()  # admitted, has not run a step in this engine yet
    RUNNING = enum.auto()  # has run at least one step in this engine
    FINISHED = enum.auto()  # all steps this expert owns are done; its state was handed back
    CANCELLED = enum.auto()
    FAILED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED


@dataclass(slots=True)
class ScheduledRequest:
    """The planner's view of one live request: what ordering and the budget need, no tensors."""

    request_id: str
    bucket: Bucket
    priority: Priority
    arrival_time: float  # seconds on the engine's clock; older runs first within a class
    deadline: float | None  # same clock; None sorts after every deadline
    num_tokens: int  # tokens this request adds to a forward (x2 when it uses CFG)
    guidance: float  # CFG scale, copied into the plan
    timesteps: list[int]  # timesteps still to run in this expert, in order
    num_steps_total: int  # steps this expert runs for the request (for progress reports)
    quality: str = "final"  # the tier: its solver and recipe
    adapters: AdapterSet = ()  # the adapters this expert runs the request with (forwards never mix sets)
    seq: int = 0  # admission order; last tie-break so the ordering is total
    status: RequestStatus = RequestStatus.WAITING
    skips_next: bool = False  # its next step reuses its cached residual: no rows, no tokens in the forward

    @property
    def urgency(self) -> tuple[int, bool, float, float, int]:
        """Sort key, smallest most urgent."""
        return (
            PRIORITY_RANK[self.priority],
            self.deadline is None,
            self.deadline or 0.0,
            self.arrival_time,
            self.seq,
        )

    @property
    def num_steps_done(self) -> int:
        return self.num_steps_total - len(self.timesteps)

    @property
    def batch_key(self) -> BatchKey:
        return (self.bucket, self.quality, self.adapters)


@dataclass(slots=True)
class StepBatch:
    """One iteration's plan: which requests go through the next forward, and with what."""

    expert: str  # "high" or "low": the expert this engine runs (the plan never mixes experts)
    bucket: Bucket | None  # latent shape shared by every member; None when empty
    quality: str = "final"  # the tier every member runs (one solver family per forward)
    adapters: AdapterSet = ()  # the LoRA adapters the forward runs with, shared by every member
    request_ids: list[str] = field(default_factory=list)  # members, most urgent first
    timesteps: list[int] = field(default_factory=list)  # member -> its current timestep (aligned)
    guidance: list[float] = field(default_factory=list)  # member -> its CFG scale (aligned)
    skips: list[bool] = field(default_factory=list)  # member -> reuses its step cache, no rows (aligned)
    num_tokens: int = 0  # tokens of the whole forward, CFG rows included (skipping members add none)
    num_skipped: int = 0  # same-bucket requests left out by the budget or the size cap

    @classmethod
    def make_empty(cls, expert: str) -> StepBatch:
        return cls(expert=expert, bucket=None)

    @property
    def num_requests(self) -> int:
        return len(self.request_ids)

    @property
    def is_empty(self) -> bool:
        return not self.request_ids


class StepScheduler:
    """Holds the live requests of one engine and plans one step at a time."""

    def __init__(self, expert: str, *, max_num_tokens: int, max_batch_size: int) -> None:
        if max_num_tokens < 1 or max_batch_size < 1:
            raise ValueError(
                f"`max_num_tokens` and `max_batch_size` must be >= 1 but are {max_num_tokens} and "
                f"{max_batch_size}."
            )
        self.expert = expert
        self.max_num_tokens = max_num_tokens
        self.max_batch_size = max_batch_size
        self.requests: dict[str, ScheduledRequest] = {}  # req_id -> planner view
        self._num_admitted = 0

    def __len__(self) -> int:
        return len(self.requests)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.requests

    def add(self, request: ScheduledRequest) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} is already in the engine.")
        if not request.timesteps:
            raise ValueError(f"request {request.request_id!r} has no steps left for this expert.")
        request.seq = self._num_admitted
        self._num_admitted += 1
        self.requests[request.request_id] = request

    def remove(self, request_id: str) -> ScheduledRequest:
        return self.requests.pop(request_id)

    def schedule(self) -> StepBatch:
        """Plan the next forward: the most urgent request's bucket, filled most urgent first."""
        if not self.requests:
            return StepBatch.make_empty(self.expert)
        ordered = sorted(self.requests.values(), key=lambda request: request.urgency)
        key = ordered[0].batch_key
        plan = StepBatch(expert=self.expert, bucket=key[0], quality=key[1], adapters=key[2])
        for request in (request for request in ordered if request.batch_key == key):
            num_tokens = 0 if request.skips_next else request.num_tokens
            fits = plan.num_tokens + num_tokens <= self.max_num_tokens
            if plan.num_requests >= self.max_batch_size or not (fits or plan.is_empty):
                plan.num_skipped += 1
                continue  # a smaller (no-CFG) request further down may still fit
            plan.request_ids.append(request.request_id)
            plan.timesteps.append(request.timesteps[0])
            plan.guidance.append(request.guidance)
            plan.skips.append(request.skips_next)
            plan.num_tokens += num_tokens
        return plan

    def advance(self, request_id: str) -> bool:
        """Record one finished step; True when the request has no steps left for this expert."""
        request = self.requests[request_id]
        request.timesteps.pop(0)
        request.status = RequestStatus.RUNNING
        return not request.timesteps

    def num_ahead(self, plan: StepBatch) -> dict[str, int]:
        """req_id -> live requests more urgent than it, for each request that `plan` leaves waiting before
        its first step: its place in this engine's queue (a request that has started is not queued)."""
        members = set(plan.request_ids)
        ordered = sorted(self.requests.values(), key=lambda request: request.urgency)
        return {
            request.request_id: position
            for position, request in enumerate(ordered)
            if request.status == RequestStatus.WAITING and request.request_id not in members
        }

    def work_before(self, urgency: tuple) -> tuple[int, int]:
        """(live requests more urgent than `urgency`, their token-steps left: tokens per forward x steps
        left in this expert), compared on `urgency`'s length (a prefix of ScheduledRequest.urgency): the
        work queued ahead of a waiting request. A step its cache will skip is counted as one it runs."""
        ahead = [request for request in self.requests.values() if request.urgency[: len(urgency)] < urgency]
        return len(ahead), sum(request.num_tokens * len(request.timesteps) for request in ahead)

    def num_requests_by_bucket(self) -> dict[Bucket, int]:
        """bucket -> live requests in it (the queue each bucket holds)."""
        return dict(Counter(request.bucket for request in self.requests.values()))
