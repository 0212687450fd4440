"""The Scheduler's pick order: priority class, then project fair share, then deadline and age."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from serve.scheduling.fair_share import Candidate, pick_next

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def job(job_id: str, project: str, priority: str = "batch", age_s: int = 0, deadline_s: int | None = None):
    deadline = T0 + timedelta(seconds=deadline_s) if deadline_s is not None else None
    return Candidate(job_id, project, priority, T0 - timedelta(seconds=age_s), deadline)


def test_a_project_with_50_queued_shots_cannot_starve_one_with_2() -> None:
    big = [job(f"big-{i}", "big", age_s=1000 - i) for i in range(50)]  # all older than the small ones
    small = [job("small-0", "small", age_s=10), job("small-1", "small", age_s=5)]
    picked = [c.project for c in pick_next(big + small, {}, num_slots=4)]
    assert picked == ["big", "small", "big", "small"]


def test_running_jobs_count_against_their_project() -> None:
    queued = [job("a1", "a", age_s=100), job("b1", "b", age_s=1)]
    assert [c.job_id for c in pick_next(queued, {"a": 3}, num_slots=1)] == ["b1"]


def test_interactive_overtakes_batch_whatever_the_project_share() -> None:
    queued = [job("batch-old", "a", age_s=500), job("shot", "b", priority="interactive", age_s=1)]
    assert [c.job_id for c in pick_next(queued, {"b": 10}, num_slots=1)] == ["shot"]


def test_within_a_project_earlier_deadline_then_older_first() -> None:
    queued = [job("old", "a", age_s=100), job("due", "a", age_s=1, deadline_s=60), job("new", "a", age_s=2)]
    assert [c.job_id for c in pick_next(queued, {}, num_slots=3)] == ["due", "old", "new"]


def test_never_more_than_the_free_slots() -> None:
    queued = [job(f"j{i}", "a", age_s=i) for i in range(5)]
    assert len(pick_next(queued, {}, num_slots=2)) == 2
    assert pick_next(queued, {}, num_slots=0) == []
