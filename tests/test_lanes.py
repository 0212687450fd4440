"""Lanes: `max_jobs_in_flight` slots reserved per priority class, so an interactive shot never waits behind a
batch backlog for a slot. The policy on plain records, then the real Scheduler on stand-in stages."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve.config import PrevizArgs
from serve.jobs import JobStatus
from serve.scheduling.fair_share import Candidate
from serve.scheduling.lanes import Lanes
from tests.support.fake_stages import (
    FakeStages,
    empty_store,
    run,
    scheduler_args,
    start,
    stop,
    wait_for,
    wait_until,
)
from tests.support.job_requests import job_request

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_a_lane_takes_its_reserve_or_the_shared_slots_never_another_lanes_reserve() -> None:
    lanes = Lanes(8, {"interactive": 2})
    assert lanes.free_slots({}) == {"interactive": 8, "batch": 6}
    assert lanes.free_slots({"batch": 6}) == {"interactive": 2, "batch": 0}
    assert lanes.free_slots({"interactive": 5}) == {"interactive": 3, "batch": 3}
    assert lanes.free_slots({"interactive": 2, "batch": 6}) == {"interactive": 0, "batch": 0}


def test_pick_fills_the_interactive_reserve_while_a_batch_backlog_holds_the_shared_slots() -> None:
    lanes = Lanes(4, {"interactive": 1})
    backlog = [Candidate(f"b{i}", "board", "batch", T0 + timedelta(seconds=i)) for i in range(10)]
    shot = Candidate("shot", "dune", "interactive", T0 + timedelta(hours=1))
    assert [job.job_id for job in lanes.pick(backlog, {}, {})] == ["b0", "b1", "b2"]
    assert [job.job_id for job in lanes.pick([*backlog, shot], {"batch": 3}, {"board": 3})] == ["shot"]


def test_fair_share_order_holds_inside_a_lane() -> None:
    lanes = Lanes(3, {"interactive": 1})
    big = [Candidate(f"big{i}", "big", "batch", T0 + timedelta(seconds=i)) for i in range(5)]
    small = [Candidate("small0", "small", "batch", T0 + timedelta(seconds=9))]
    picked = lanes.pick([*big, *small], {}, {"big": 0})
    assert [job.job_id for job in picked] == ["big0", "small0"]


def test_lanes_that_reserve_more_than_the_slots_are_refused() -> None:
    with pytest.raises(ValidationError, match="`lanes` reserve"):
        PrevizArgs(max_jobs_in_flight=4, lanes={"interactive": 3, "batch": 2})
    assert PrevizArgs(max_jobs_in_flight=8).reserved_slots == {"interactive": 2}  # the default quarter


def test_with_the_batch_lane_full_an_interactive_create_is_admitted_and_runs_first(tmp_path: Path) -> None:
    """Three batch jobs hold the shared slots (held in the high-noise expert, so none finishes and frees
    one); the interactive shot takes the reserved slot and reaches the expert while the other two batch
    jobs are still queued. "Runs first" is the order of the high-noise calls. The hold is released only
    once the shot's call is in: releasing it at the shot's claim raced the shot's encode against a batch
    job's whole pipeline (a stalled encode let the backlog's calls in first)."""
    args = scheduler_args(tmp_path, max_jobs_in_flight=4, lanes={"interactive": 1})
    stages = FakeStages(hold_high=asyncio.Event())
    store = empty_store(args)
    backlog = [store.create("board", "batch", job_request(steps=8))[0].id for _ in range(5)]

    def started() -> list[str]:  # job ids in the order their high-noise calls came in
        return [request_id.split(":")[0] for request_id, _bucket, _step in stages.calls.get("high", [])]

    async def scenario() -> None:
        assert stages.hold_high is not None
        scheduler = start(args, stages)
        try:
            # the shared slots: the batch lane is full, its three jobs held in the expert
            await wait_until(lambda: len(started()) == 3, "three batch jobs in the high-noise expert")
            assert set(started()) == set(backlog[:3])
            shot, _ = store.create("dune", "interactive", job_request(steps=8))
            await scheduler.wake()
            await wait_until(lambda: shot.id in started(), "the shot's high-noise call")
            assert [store.get(job_id).status for job_id in backlog[3:]] == [JobStatus.QUEUED] * 2
            stages.hold_high.set()
            for job_id in [shot.id, *backlog]:
                await wait_for(store, job_id, lambda j: j.is_finished)
        finally:
            stop(scheduler)
        assert started()[3] == shot.id and set(started()[4:]) == set(backlog[3:]) and len(started()) == 6
        assert [store.get(job_id).status for job_id in [shot.id, *backlog]] == [JobStatus.SUCCEEDED] * 6

    run(scenario)
