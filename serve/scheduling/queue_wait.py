"""When will a job that is still in the job queue finish? Its wait for a Scheduler slot, then its run.

Counted, not guessed: the jobs ahead of it and the jobs in flight come from the job store
(`JobStore.queue_view`); a job in flight frees its slot at its own ETA (the Scheduler's, re-predicted
after each denoising step), or, before it has one, after its bucket's measured run time less what it ran;
each job ahead then holds the first slot to free for its bucket's measured run time, and the job takes
the next one. A run time is the mean claim-to-finish time of the bucket's recent successes; when a bucket
in the way was never measured there is no prediction (None), never a padded one.

The slots are those its lane may use (`Lanes`: its own reserve and the shared ones); a job of another lane
that sits in that lane's reserve does not hold one of them.

Written by hand: a heap of the times the slots free up is a few lines, and no library the project uses
predicts a first-come-first-served queue with several servers.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from datetime import UTC, datetime

from serve.jobs.models import InFlight, JobRecord, QueueView
from serve.jobs.store import JobStore
from serve.scheduling.lanes import Lanes


@dataclass(frozen=True, slots=True)
class QueueWait:
    """A queued job's place in the job queue and its predicted finish, as the API shows them."""

    num_ahead: int  # queued jobs the Scheduler picks before it
    eta_seconds: float | None  # until it is predicted to finish, the wait included (None: not predicted)


def queue_wait(store: JobStore, job: JobRecord, lanes: Lanes) -> QueueWait:
    """The wait of queued `job`, counted in the store now (blocking: call it in a thread)."""
    view = store.queue_view(job)
    return QueueWait(view.num_ahead, queue_eta_seconds(view, job.priority, job.bucket, lanes))


def queue_eta_seconds(
    view: QueueView, priority: str, bucket: str, lanes: Lanes, now: datetime | None = None
) -> float | None:
    """Seconds until a queued job of `priority` and `bucket` is predicted to finish (None: a run time in
    the way was never measured)."""
    now = now or datetime.now(UTC)
    own = view.run_seconds.get(bucket)
    ahead = [view.run_seconds.get(name) for name in view.ahead_buckets]
    if own is None or None in ahead:
        return None
    num_slots = lanes.reserved.get(priority, 0) + lanes.num_shared
    frees = [_left(slot, view, now) for slot in _holding_lane_slots(view.in_flight, priority, lanes)]
    frees = sorted(frees)[:num_slots] + [0.0] * max(0, num_slots - len(frees))
    if not frees:
        return None  # a lane with no slot never runs it
    heapq.heapify(frees)
    for seconds in ahead:
        heapq.heappush(frees, heapq.heappop(frees) + seconds)
    return heapq.heappop(frees) + own


def _holding_lane_slots(in_flight: tuple[InFlight, ...], priority: str, lanes: Lanes) -> list[InFlight]:
    """The jobs in flight that hold slots `priority` may use: all but those inside another lane's reserve."""
    kept, in_reserve = [], {lane: count for lane, count in lanes.reserved.items() if lane != priority}
    for slot in in_flight:
        if in_reserve.get(slot.priority, 0) > 0:
            in_reserve[slot.priority] -= 1
        else:
            kept.append(slot)
    return kept


def _left(slot: InFlight, view: QueueView, now: datetime) -> float:
    """Seconds until `slot` frees: its ETA, else its bucket's run time less what it ran (0 when unknown)."""
    if slot.eta_at is not None:
        return max(0.0, (slot.eta_at - now).total_seconds())
    run = view.run_seconds.get(slot.bucket)
    if run is None or slot.started_at is None:
        return 0.0
    return max(0.0, run - (now - slot.started_at).total_seconds())
