"""Priority classes, the one home of their names and order: `interactive` shots overtake `batch` backlogs
in the Scheduler's lanes, the engines' batches, the metrics' queue labels and the capacity simulator.

Plain Python, no torch: the job store, the HTTP schemas and the metrics module import it cheaply.
"""

from __future__ import annotations

from typing import Literal

Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")  # most urgent first
PRIORITY_RANK: dict[str, int] = {
    name: rank for rank, name in enumerate(PRIORITIES)
}  # priority -> rank, lower runs first
