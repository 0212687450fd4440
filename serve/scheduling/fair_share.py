"""Which queued jobs start next: priority class, then per-project fair share, then deadline and age.

Pure (no Ray, no database), so the policy is unit-tested on plain records. A project with 50 queued
shots cannot starve one with 2: each pick goes to the project with the fewest jobs running (counting
the picks already made this round), so projects take turns.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from pipeline.priority import PRIORITY_RANK


@dataclass(frozen=True, slots=True)
class Candidate:
    """What the policy needs to know of one queued job."""

    job_id: str
    project: str
    priority: str  # interactive | batch
    created_at: datetime
    deadline: datetime | None = None


def pick_next(
    queued: Sequence[Candidate], running_by_project: Mapping[str, int], num_slots: int
) -> list[Candidate]:
    """Up to `num_slots` jobs to start now, in start order."""
    running = Counter(running_by_project)
    waiting = sorted(queued, key=_urgency)
    picked: list[Candidate] = []
    while waiting and len(picked) < num_slots:
        best_rank = min(PRIORITY_RANK.get(job.priority, 1) for job in waiting)
        same_class = [job for job in waiting if PRIORITY_RANK.get(job.priority, 1) == best_rank]
        choice = min(same_class, key=lambda job: (running[job.project], _urgency(job)))
        picked.append(choice)
        running[choice.project] += 1
        waiting.remove(choice)
    return picked


def _urgency(job: Candidate) -> tuple:
    deadline = job.deadline.timestamp() if job.deadline is not None else float("inf")
    return (PRIORITY_RANK.get(job.priority, 1), deadline, job.created_at, job.job_id)
