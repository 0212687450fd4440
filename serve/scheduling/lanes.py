"""Lanes: the Scheduler's `max_jobs_in_flight` slots with a share reserved per priority class.

A lane may take a free slot from its own reserve or from the shared slots (those no lane reserves); it
never takes another lane's reserve. So a batch backlog that fills every shared slot still leaves the
interactive reserve free: an interactive create is claimed at the next pass instead of waiting for a
batch job to finish. Inside a lane the fair-share order (`fair_share.pick_next`) stays.

Pure (no Ray, no database), like fair_share. Written by hand: the slot arithmetic is a few lines and no
scheduling library the project uses (Ray Serve, SQLAlchemy) has reserved admission slots.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.priority import PRIORITIES
from serve.scheduling.fair_share import Candidate, pick_next


@dataclass(frozen=True, slots=True)
class Lanes:
    max_in_flight: int
    reserved: Mapping[str, int]  # priority -> slots only it may use (absent: 0)

    def __post_init__(self) -> None:
        total = sum(self.reserved.values())
        if min(self.reserved.values(), default=0) < 0 or total > self.max_in_flight:
            raise ValueError(
                f"lanes reserve {dict(self.reserved)} slots: each must be >= 0 and together at most "
                f"max_jobs_in_flight ({self.max_in_flight})."
            )

    @property
    def num_shared(self) -> int:
        return self.max_in_flight - sum(self.reserved.values())

    def free_slots(self, in_flight: Mapping[str, int]) -> dict[str, int]:
        """priority -> slots it could take now, given the jobs in flight per priority."""
        free_total = self.max_in_flight - sum(in_flight.values())
        shared_used = sum(max(0, count - self.reserved.get(lane, 0)) for lane, count in in_flight.items())
        free_shared = max(0, self.num_shared - shared_used)
        own = {lane: max(0, self.reserved.get(lane, 0) - in_flight.get(lane, 0)) for lane in PRIORITIES}
        return {lane: max(0, min(free_total, own[lane] + free_shared)) for lane in PRIORITIES}

    def pick(
        self,
        queued: Sequence[Candidate],
        in_flight_by_lane: Mapping[str, int],
        running_by_project: Mapping[str, int],
    ) -> list[Candidate]:
        """Jobs to start now, most urgent lane first; each lane's picks in fair-share order."""
        in_flight, running = Counter(in_flight_by_lane), Counter(running_by_project)
        picked: list[Candidate] = []
        for lane in PRIORITIES:
            free = self.free_slots(in_flight)[lane]
            waiting = [job for job in queued if job.priority == lane]
            for job in pick_next(waiting, running, free):
                picked.append(job)
                in_flight[lane] += 1
                running[job.project] += 1
        return picked


def default_reserved(max_in_flight: int) -> dict[str, int]:
    """A quarter of the slots for interactive shots (none below 4 slots: batch work must fit somewhere)."""
    return {"interactive": max_in_flight // 4}
