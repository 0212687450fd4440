"""A video still in the job queue says how many are ahead of it and when it should finish, its wait included
(issue 28): counted in the job store (the jobs ahead, the jobs holding the lane's slots and their ETAs) and
priced with the run times measured for recent jobs of the same bucket, never guessed."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from serve.http.events import event_stream
from serve.http.views import video_payload, video_view
from serve.jobs import JobStatus
from serve.jobs.models import InFlight, QueueView
from serve.scheduling.lanes import Lanes
from serve.scheduling.queue_wait import queue_eta_seconds, queue_wait
from tests.support.fake_stages import FakeStages, empty_store, scheduler_args, start, stop, wait_for
from tests.support.job_requests import job_request

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def running(priority: str, eta_in_s: float | None, bucket: str = "a", ran_s: float = 0.0) -> InFlight:
    eta = NOW + timedelta(seconds=eta_in_s) if eta_in_s is not None else None
    return InFlight(priority, bucket, NOW - timedelta(seconds=ran_s), eta)  # type: ignore[arg-type]


def test_a_queued_job_takes_the_first_slot_to_free_after_each_job_ahead_took_one() -> None:
    # two slots, freeing in 10 s and 30 s; two jobs ahead of 20 s each, then its own 20 s run:
    # ahead #1 takes the 10 s slot (busy till 30), ahead #2 the 30 s one (till 50); it starts at 30
    view = QueueView(2, ("a", "a"), (running("batch", 10), running("batch", 30)), {"a": 20.0})
    assert queue_eta_seconds(view, "batch", "a", Lanes(2, {}), NOW) == pytest.approx(50.0)
    # nothing ahead, a free slot: its own run
    assert queue_eta_seconds(QueueView(0, (), (), {"a": 20.0}), "batch", "a", Lanes(2, {}), NOW) == 20.0


def test_a_job_in_flight_without_an_eta_frees_its_slot_after_its_buckets_run_time_less_what_it_ran() -> None:
    view = QueueView(0, (), (running("batch", None, "b", ran_s=15.0),), {"a": 20.0, "b": 40.0})
    assert queue_eta_seconds(view, "batch", "a", Lanes(1, {}), NOW) == pytest.approx(45.0)


def test_another_lanes_reserve_holds_none_of_this_lanes_slots() -> None:
    lanes = Lanes(2, {"interactive": 1})  # batch may use the one shared slot only
    in_flight = (running("interactive", 100), running("batch", 5))
    view = QueueView(0, (), in_flight, {"a": 10.0})
    assert queue_eta_seconds(view, "batch", "a", lanes, NOW) == pytest.approx(15.0)


def test_no_prediction_while_a_bucket_in_the_way_was_never_measured() -> None:
    lanes = Lanes(1, {})
    assert queue_eta_seconds(QueueView(1, ("new",), (), {"a": 10.0}), "batch", "a", lanes, NOW) is None
    assert queue_eta_seconds(QueueView(0, (), (), {}), "batch", "a", lanes, NOW) is None


def test_queued_videos_show_their_place_and_an_eta_that_includes_the_wait(tmp_path: Path) -> None:
    args = scheduler_args(tmp_path, max_jobs_in_flight=1, lanes={})
    lanes = Lanes(args.max_jobs_in_flight, args.reserved_slots)
    stages = FakeStages(hold_decode=asyncio.Event())
    store = empty_store(args)
    measured, _ = store.create("dune", "batch", job_request(steps=8))

    async def scenario() -> list[dict]:
        scheduler = start(args, stages)
        try:
            stages.hold_decode.set()
            await wait_for(store, measured.id, lambda j: j.is_finished)  # one measured run of the bucket
            stages.hold_decode.clear()
            holding, _ = store.create("dune", "batch", job_request(steps=8))
            await wait_for(store, holding.id, lambda j: j.status == JobStatus.DECODING)  # the one slot, held
            first, _ = store.create("dune", "batch", job_request(steps=8))
            second, _ = store.create("dune", "batch", job_request(steps=8))
            stream = event_stream(store, second.id, 0, video_payload, lanes)
            statuses = []
            async for frame in stream:
                if frame.startswith("event: status"):
                    statuses.append(json.loads(frame.split("data: ", 1)[1]))
                    break
            await stream.aclose()
            views = [
                video_view(job, queue_wait(store, job, lanes))
                for job in (store.get(first.id), store.get(second.id))
            ]
            stages.hold_decode.set()
            await wait_for(store, second.id, lambda j: j.is_finished)
            return [view.model_dump() for view in views] + statuses
        finally:
            stop(scheduler)

    first, second, streamed = asyncio.run(scenario())
    run_s = (store.get(measured.id).finished_at - store.get(measured.id).started_at).total_seconds()
    assert (first["status"], first["queue_position"]) == ("queued", 0)
    assert (second["status"], second["queue_position"]) == ("queued", 1)
    # the held job's slot frees at its ETA (or at once, when it has none); each waiting job then runs run_s
    assert second["eta_seconds"] - first["eta_seconds"] == pytest.approx(run_s, abs=0.5)
    assert first["eta_seconds"] >= run_s - 0.01
    assert (streamed["status"], streamed["queue_position"]) == ("queued", 1)
    assert streamed["eta_seconds"] == pytest.approx(second["eta_seconds"], abs=0.5)
