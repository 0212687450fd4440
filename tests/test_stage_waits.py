"""A stage call that waits says so (issue 28): the decoder and the upscaler run one call at a time, keep
the others in a line (serve.stages.turns), the text encoder keeps the calls waiting for a batched forward in
a BatchLine, and each streams a waiting call's place; the Scheduler stores it, so
the API shows `waiting_for: decoding` with the number ahead (counted in the replica's line, not guessed)
and an ETA with the wait in it, instead of a stage frozen at its last progress."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from serve.config import PrevizArgs
from serve.http.views import video_view
from serve.jobs import JobStatus
from serve.scheduling.eta import AFTER_ENCODE, EtaModel
from serve.stages import decoder, finisher, upscaler
from serve.stages.finisher import FinisherStage
from serve.stages.turns import BatchLine, StageWaiting, Turns
from tests.support.fake_stages import (
    FakeStages,
    empty_store,
    run,
    scheduler_args,
    start,
    stop,
    wait_for,
    wait_for_any,
    wait_until,
)
from tests.support.job_requests import job_request


async def settle() -> None:
    """Let every task that can move run its course: a number of loop turns, not a time (a 10 ms sleep could
    end before a descheduled task on a loaded box had taken its place; nothing here waits on a thread)."""
    for _ in range(100):
        await asyncio.sleep(0)


async def collect(turns: Turns, log: list[tuple[str, int]], name: str, hold: asyncio.Event) -> None:
    async for waiting in turns.wait():
        log.append((name, waiting.num_ahead))
    log.append((name, -1))  # its turn
    try:
        await hold.wait()
    finally:
        turns.leave()


def test_turns_serve_first_come_first_and_each_waiter_hears_its_place_as_the_line_moves() -> None:
    async def scenario() -> None:
        turns, log = Turns(), []
        holds = {name: asyncio.Event() for name in "abc"}
        tasks = {name: asyncio.create_task(collect(turns, log, name, holds[name])) for name in "abc"}
        await settle()
        assert log == [("a", -1), ("b", 1), ("c", 2)] and len(turns) == 3
        holds["a"].set()
        await settle()
        assert log[3:] == [("b", 0), ("b", -1), ("c", 1)]
        tasks["c"].cancel()  # a cancelled waiter leaves the line
        await settle()
        assert len(turns) == 1
        holds["b"].set()
        await asyncio.gather(tasks["a"], tasks["b"])
        assert len(turns) == 0
        await collect(turns, log, "d", holds["a"])  # an empty line: no place to report, the turn at once
        assert log[-1] == ("d", -1)

    asyncio.run(scenario())


def test_a_waiter_whose_turn_comes_while_its_caller_handles_its_place_still_gets_the_turn() -> None:
    """The holder leaves while the waiter is suspended at its yield (the Scheduler storing the place): the
    waiter must see that move, not wait for a later one that never comes (the last decode of a run hung)."""

    async def scenario() -> None:
        turns = Turns()
        async for _ in turns.wait():  # an empty line: the turn at once
            pass
        waiter = turns.wait()
        assert await anext(waiter) == StageWaiting(1)
        turns.leave()  # while the waiter's caller still handles its place
        assert await asyncio.wait_for(anext(waiter), 60) == StageWaiting(0)
        with pytest.raises(StopAsyncIteration):
            await anext(waiter)
        assert len(turns) == 1  # it holds the turn

    asyncio.run(scenario())


def test_a_batch_line_call_taken_while_its_caller_handles_its_place_hears_it_at_once() -> None:
    async def scenario() -> None:
        line = BatchLine()
        first, second = line.join(), line.join()
        work = asyncio.get_running_loop().create_future()  # the second call's result: never in here
        waiter = line.wait(second, work)
        assert (await anext(waiter)).num_ahead == 1
        line.started([first, second])  # a forward took both while its caller handled the place
        assert await asyncio.wait_for(anext(waiter), 60) == StageWaiting(0)

    asyncio.run(scenario())


def test_a_job_waiting_for_the_decoder_shows_its_place_and_an_eta_with_the_wait(tmp_path: Path) -> None:
    args = scheduler_args(tmp_path, max_jobs_in_flight=2)
    stages = FakeStages(hold_decode=asyncio.Event())
    store = empty_store(args)
    first, _ = store.create("dune", "batch", job_request(steps=8))
    second, _ = store.create("dune", "batch", job_request(steps=8))

    async def scenario() -> None:
        scheduler = start(args, stages)
        request = second.request  # both jobs have the same request, so the same bucket
        # decodes of this size took 30 s here before (the ETA's measurement of the stage)
        scheduler._eta.observe((str(request.bucket), request.resolved.quality, "none"), "decode", 30.0)
        try:
            # either job may reach the decoder first: the other one waits behind it
            waiting = await wait_for_any(store, (first.id, second.id), lambda j: j.engine_queue_position == 1)
            holding = store.get(first.id if waiting.id == second.id else second.id)
            stages.hold_decode.set()
            turn = await wait_for(store, waiting.id, lambda j: j.engine_queue_position is None)
            done = await wait_for(store, waiting.id, lambda j: j.is_finished)
        finally:
            stop(scheduler)
        video = video_view(waiting)
        assert (video.status, video.stage, video.waiting_for, video.queue_position) == (
            "in_progress",
            "queued",
            "decoding",
            1,
        )
        assert waiting.status == JobStatus.DECODING
        assert holding.status == JobStatus.DECODING and video_view(holding).waiting_for is None
        predicted = (waiting.eta_at - waiting.updated_at).total_seconds()
        assert predicted == pytest.approx(60.0, abs=1.0)  # one decode ahead, then its own
        assert turn.status >= JobStatus.DECODING and video_view(turn).waiting_for is None
        assert done.status == JobStatus.SUCCEEDED and video_view(done).queue_position is None

    run(scenario)


def test_a_batch_line_counts_the_calls_before_a_call_until_a_forward_takes_it() -> None:
    async def scenario() -> None:
        line, log = BatchLine(), []
        loop = asyncio.get_running_loop()
        tokens = {name: line.join() for name in "abc"}
        works = {name: loop.create_future() for name in "abc"}

        async def follow(name: str) -> None:
            async for waiting in line.wait(tokens[name], works[name]):
                log.append((name, waiting.num_ahead))

        line.started([tokens["a"]])  # a forward took a's texts at once: it never waits
        tasks = [asyncio.create_task(follow(name)) for name in "abc"]
        await settle()
        assert log == [("b", 1), ("c", 2)]  # behind the running forward's call, a included
        works["a"].set_result(None)
        line.leave(tokens["a"])
        await settle()
        assert log[2:] == [("b", 0), ("c", 1)]
        line.started([tokens["b"], tokens["c"]])  # the next forward takes both
        await settle()
        assert log[4:] == [("c", 0)] and all(task.done() for task in tasks)
        cancelled = line.join()  # a call cancelled while it waits leaves the line
        line.leave(cancelled)
        assert len(line) == 2

    run(scenario)


def test_a_batch_line_counts_the_seconds_until_a_calls_result_in_measured_forwards() -> None:
    async def scenario() -> None:
        line = BatchLine(calls_per_forward=2)
        tokens = [line.join() for _ in range(5)]
        assert line.seconds_left(tokens[4]) is None  # no forward measured yet: no estimate
        line.forward_took(3.0)
        line.forward_took(5.0)  # a forward: 4 s on average
        line.started([tokens[0]])  # a forward runs with the first call in it
        # the running forward, then two more for the three calls waiting ahead and the last one itself
        assert [line.seconds_left(token) for token in tokens[1:]] == [8.0, 8.0, 12.0, 12.0]
        work = asyncio.get_running_loop().create_future()
        places = []

        async def follow() -> None:
            async for waiting in line.wait(tokens[4], work):
                places.append(waiting)

        task = asyncio.create_task(follow())
        await settle()
        assert places == [StageWaiting(4, 12.0)]
        work.set_result(None)
        await task

    run(scenario)


def test_the_eta_of_a_wait_for_the_text_encoder_is_its_forwards_then_the_measured_rest_of_the_job() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    model, key = EtaModel(), ("832x480x81", "draft", "none")
    assert model.predict_encode_wait(key, seconds_left=12.0, now=now) is None  # the rest never measured
    model.observe(key, AFTER_ENCODE, 100.0)
    model.observe(key, AFTER_ENCODE, 120.0)
    assert model.predict_encode_wait(key, seconds_left=12.0, now=now) == now + timedelta(seconds=122.0)


@pytest.mark.parametrize("measured", [False, True], ids=["unmeasured", "measured"])
def test_a_job_waiting_for_the_text_encoder_shows_its_place_then_runs(tmp_path: Path, measured: bool) -> None:
    args = scheduler_args(tmp_path)
    # two calls ahead; the encoder's forwards until this call's embeddings take 12 s
    stages = FakeStages(waiting_encode=(StageWaiting(2, 12.0),), hold_encode=asyncio.Event())
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(steps=8))
    key = (str(job.request.bucket), job.request.resolved.quality, "none")

    async def scenario() -> None:
        scheduler = start(args, stages)
        if measured:  # jobs of this size took 100 s from their embeddings to their clip here before
            scheduler._eta.observe(key, AFTER_ENCODE, 100.0)
        try:
            waiting = await wait_for(store, job.id, lambda j: j.engine_queue_position == 2)
            stages.hold_encode.set()
            done = await wait_for(store, job.id, lambda j: j.is_finished)
            # the run records its measurement as it ends, just after the store shows the job finished
            await wait_until(
                lambda: scheduler._eta.predict_encode_wait(key, seconds_left=0.0) is not None,
                "the rest of the job measured",
            )
            rest = scheduler._eta.predict_encode_wait(key, seconds_left=0.0)
        finally:
            stop(scheduler)
        if measured:
            predicted = (waiting.eta_at - waiting.updated_at).total_seconds()
            assert predicted == pytest.approx(112.0, abs=1.0)  # its forwards, then the rest of the job
        else:  # nothing measured after the encoder yet: no estimate (the page keeps its words)
            assert waiting.eta_at is None
        assert rest is not None  # this job's run from its embeddings to its clip was measured
        video = video_view(waiting)
        assert (video.status, video.stage, video.waiting_for, video.queue_position) == (
            "in_progress",
            "queued",
            "encoding",
            2,
        )
        assert waiting.status == JobStatus.ENCODING
        assert done.status == JobStatus.SUCCEEDED and video_view(done).queue_position is None

    run(scenario)


def test_the_eta_of_a_wait_after_the_denoiser_counts_the_calls_ahead_and_the_stages_after() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    model, key = EtaModel(), ("832x480x81", "draft", "none")
    model.observe(key, "decode", 10.0)
    model.observe(key, "upscale", 4.0)
    model.observe(key, "finish", 1.0)
    assert model.predict_from(key, "decode", num_ahead=3, now=now) == now + timedelta(seconds=45.0)
    assert model.predict_from(key, "upscale", num_ahead=0, now=now) == now + timedelta(seconds=5.0)


def test_no_call_after_the_denoiser_waits_uncounted_in_serves_router(tmp_path: Path) -> None:
    # a replica of each later stage takes every call the Scheduler can have in flight: a call waits in
    # the replica's counted line (decoder, upscaler) or runs at once (the finisher has a thread for each)
    args = PrevizArgs(max_jobs_in_flight=32, storage={"kind": "local", "local_root": str(tmp_path)})
    for stage in (decoder, upscaler, finisher):
        assert stage.default_options(args)["max_ongoing_requests"] == 32
    assert FinisherStage(args)._threads._max_workers == 32
