"""The Scheduler's job pipeline on the CPU without a Ray cluster: the real Scheduler class, a real SQLite job
store and local artifact folder, and stand-in stage handles that answer like the stage deployments
(typed payloads) and record what they were asked. Happy path, resume from the expert-boundary checkpoint,
a lost replica, a superseded attempt and a Finisher that keeps failing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ray.exceptions import ActorDiedError

from pipeline.spec import StepCacheSettings
from serve.http.views import video_view
from serve.jobs import JobStatus, JobStore
from serve.scheduling.eta import EtaModel
from serve.scheduling.housekeeping import Housekeeping
from serve.stages.payloads import DenoiseWaiting, StateRef
from serve.stages.transfer import PackedState
from serve.storage import JobArtifacts, StorageError
from tests.support.fake_stages import (
    FakeStages,
    empty_store,
    run,
    run_until_finished,
    scheduler_args,
    start,
    stop,
    wait_for,
)
from tests.support.job_requests import job_request


def test_a_job_runs_through_every_stage_and_records_its_clip_and_poster(tmp_path: Path) -> None:
    args = scheduler_args(tmp_path)
    stages = FakeStages()
    store = empty_store(args)
    job, _ = store.create("dune", "interactive", job_request(steps=8))

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            done = await wait_for(store, job.id, lambda j: j.is_finished)
            await wait_for(store, job.id, lambda _j: job.id not in scheduler._running)
        finally:
            stop(scheduler)
        keys = JobArtifacts("dune", job.id)
        # the boundary checkpoint, stored by the high-noise replica off the critical path, is dropped with
        # the finished run (whether it was recorded before or after the job succeeded)
        assert store.get(job.id).checkpoint_uri is None and not stages.artifacts.exists(keys.checkpoint)
        assert done.status == JobStatus.SUCCEEDED and done.progress == 100 and done.attempt == 1
        assert (done.artifact_uri, done.poster_uri) == (keys.clip(1), keys.poster(1))
        assert set(done.timings) == {"encode", "denoise_high", "denoise_low", "decode", "upscale", "finish"}
        assert stages.calls["high"] == [(f"{job.id}:1", "96x64x9", 0)]
        assert stages.calls["low"] == [(f"{job.id}:1", "96x64x9", 3)]  # the high expert's 3 steps
        assert stages.calls["decode"] == [pytest.approx(11.0, abs=5)]  # both experts' changes reached it
        assert stages.calls["upscale"] == [(96, 64)]
        (call,) = stages.calls["finish"]
        assert (call.label, call.look, call.seed) == ("AI-generated draft", "none", 7)
        kinds = [event.kind for event in store.events(job.id)]
        assert kinds[:2] == ["created", "claimed"] and "succeeded" in kinds

    run(scenario)


def test_a_jobs_step_cache_settings_reach_both_experts(tmp_path: Path) -> None:
    args = scheduler_args(tmp_path)
    stages = FakeStages()
    store = empty_store(args)
    cache = StepCacheSettings(threshold=0.06, max_skip=2, warmup_steps=10)
    cached, _ = store.create("dune", "batch", job_request(steps=8, cache=cache))
    plain, _ = store.create("dune", "batch", job_request(steps=8, seed=8))

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            for job in (cached, plain):
                await wait_for(store, job.id, lambda j: j.is_finished)
        finally:
            stop(scheduler)
        seen = [(call.request_id.split(":")[0], call.cache) for call in stages.denoise_calls]
        assert sorted(seen, key=str) == sorted(
            [(cached.id, cache), (cached.id, cache), (plain.id, None), (plain.id, None)], key=str
        )

    run(scenario)


def test_a_job_waiting_in_a_denoiser_engine_shows_queued_with_its_place_and_an_eta_not_a_frozen_stage(
    tmp_path: Path,
) -> None:
    args = scheduler_args(tmp_path)
    # three ahead with nothing measured on the replica, then two ahead whose queued work the engine measured
    # at 40 s, its bucket's steps at 5 s each; then it waits there
    places = (DenoiseWaiting(3), DenoiseWaiting(2, seconds_ahead=40.0, seconds_per_step=5.0))
    stages = FakeStages(waiting_high=places, hold_high=asyncio.Event())
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(steps=8))

    async def scenario() -> None:
        scheduler = start(args, stages)
        request = job.request
        # decodes of this size took 30 s here before (the ETA's measurement of the later stages)
        scheduler._eta.observe((str(request.bucket), request.resolved.quality, "none"), "decode", 30.0)
        try:
            waiting = await wait_for(store, job.id, lambda j: j.engine_queue_position == 2)
            video = video_view(waiting)
            assert (video.status, video.stage, video.queue_position) == ("in_progress", "queued", 2)
            assert (video.waiting_for, video.progress) == ("denoising_high", 2)
            assert waiting.status == JobStatus.DENOISING_HIGH
            predicted = (waiting.eta_at - waiting.updated_at).total_seconds()
            assert predicted == pytest.approx(40.0 + 8 * 5.0 + 30.0, abs=1.0)  # the wait, its 8 steps, decode
            stages.hold_high.set()
            started = await wait_for(store, job.id, lambda j: j.stage_progress > 0 or j.is_finished)
            done = await wait_for(store, job.id, lambda j: j.is_finished)
        finally:
            stop(scheduler)
        assert started.engine_queue_position is None  # its first step clears the place
        assert video_view(started).stage in {"denoising_high", "denoising_low", "decoding", "succeeded"}
        assert done.status == JobStatus.SUCCEEDED and video_view(done).queue_position is None

    run(scenario)


def test_a_lost_low_noise_replica_requeues_and_the_rerun_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    args = scheduler_args(tmp_path)
    stages = FakeStages(fail={"low": ActorDiedError()}, fail_once={"low"})  # Serve replaces the replica
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(steps=8))
    checkpoint = JobArtifacts("dune", job.id).checkpoint

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            done = await wait_for(store, job.id, lambda j: j.is_finished)
        finally:
            stop(scheduler)
        assert done.status == JobStatus.SUCCEEDED and done.attempt == 2
        kinds = [event.kind for event in store.events(job.id)]
        assert kinds.index("checkpoint") < kinds.index("requeued") < kinds.index("resumed")
        resumed = next(event for event in store.events(job.id) if event.kind == "resumed")
        assert (resumed.data["uri"], resumed.data["step_index"]) == (checkpoint, 3)
        assert len(stages.calls["high"]) == 1  # the rerun skipped the high-noise expert
        assert [call[0] for call in stages.calls["low"]] == [f"{job.id}:1", f"{job.id}:2"]
        assert stages.calls["low"][1][2] == 3  # and started the low expert where the checkpoint left off

    run(scenario)


def test_a_lost_high_noise_replica_reruns_from_scratch_without_a_checkpoint(tmp_path: Path) -> None:
    args = scheduler_args(tmp_path, max_attempts=2)
    stages = FakeStages(fail={"high": ActorDiedError()})
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(steps=8))

    failed = run_until_finished(args, stages, store, job.id)
    # both runs lost the replica before any checkpoint: the second was the last allowed
    assert failed.status == JobStatus.FAILED and failed.attempt == 2
    assert len(stages.calls["high"]) == 2 and "low" not in stages.calls
    assert failed.checkpoint_uri is None


def test_a_superseded_attempt_records_nothing_and_the_newer_run_wins(tmp_path: Path) -> None:
    args = scheduler_args(tmp_path, max_jobs_in_flight=1)  # this scheduler cannot claim the job back
    stages = FakeStages(hold_low=asyncio.Event())
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(steps=8))

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            await wait_for(store, job.id, lambda j: j.status == JobStatus.DENOISING_LOW)
            # another scheduler incarnation takes the job over: this run's updates are now refused
            assert store.requeue(job.id, 1) == JobStatus.QUEUED
            newer = store.claim(job.id, "scheduler-newer")
            assert newer is not None and newer.attempt == 2
            stages.hold_low.set()  # the old run goes on and tries to record its progress
            await wait_for(store, job.id, lambda _j: job.id not in scheduler._running)
        finally:
            stop(scheduler)
        current = store.get(job.id)
        assert (current.status, current.attempt, current.claimed_by) == (
            JobStatus.ENCODING,
            2,
            "scheduler-newer",
        )
        assert current.artifact_uri is None and "finish" not in stages.calls

    run(scenario)


def test_a_finisher_that_keeps_failing_fails_the_job_after_the_bounded_retries(tmp_path: Path) -> None:
    args = scheduler_args(tmp_path, finish_attempts=3)
    stages = FakeStages(fail={"finish": StorageError("artifact 'dune/x/clip-a1.mp4': bucket unreachable")})
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(steps=8))

    failed = run_until_finished(args, stages, store, job.id)
    assert failed.status == JobStatus.FAILED and failed.error_code == "storage_failed"
    assert "failed on all 3 tries" in failed.error_message and "bucket unreachable" in failed.error_message
    assert len(stages.calls["finish"]) == 3 and failed.attempt == 1  # retried in place, not requeued
    assert [event.kind for event in store.events(job.id)].count("retry") == 2


@pytest.mark.parametrize("stage", ["low", "decode"])
def test_a_cancel_while_a_stage_runs_cancels_that_call_on_its_replica(tmp_path: Path, stage: str) -> None:
    args = scheduler_args(tmp_path)
    holds = {"low": "hold_low", "decode": "hold_decode"}
    stages = FakeStages(**{holds[stage]: asyncio.Event()})
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(steps=8))
    waiting = {"low": JobStatus.DENOISING_LOW, "decode": JobStatus.DECODING}[stage]

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            await wait_for(store, job.id, lambda j: j.status == waiting and stage in stages.calls)
            assert store.cancel(job.id, project="dune") == "cancelled"  # what DELETE does, then:
            assert await scheduler.cancel(job.id)
            await wait_for(store, job.id, lambda _j: job.id not in scheduler._running)
        finally:
            stop(scheduler)
        assert stages.cancelled == [stage]  # the running call itself was cancelled, nothing else ran
        assert store.get(job.id).status == JobStatus.CANCELLED and "finish" not in stages.calls

    run(scenario)


def test_a_job_cancelled_while_queued_is_counted_as_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    finished: list[tuple[str, str]] = []
    monkeypatch.setattr(
        "serve.scheduling.scheduler.record_job_finished",
        lambda job, status, *_: finished.append((job.id, status)),
    )
    args = scheduler_args(tmp_path, max_jobs_in_flight=1)
    stages = FakeStages(hold_low=asyncio.Event())
    store = empty_store(args)
    running, _ = store.create("dune", "batch", job_request(steps=8))
    queued, _ = store.create("dune", "batch", job_request(steps=8))

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            await wait_for(store, running.id, lambda j: j.status == JobStatus.DENOISING_LOW)
            assert store.cancel(queued.id, project="dune") == "cancelled"
            assert not await scheduler.cancel(queued.id)  # it had no run to stop
        finally:
            stages.hold_low.set()
            stop(scheduler)
        assert finished == [(queued.id, "cancelled")]

    run(scenario)


def test_the_work_of_a_running_and_then_cancelled_job_counts_against_its_quota(tmp_path: Path) -> None:
    """Issue 12, point 1: in-flight work counts before it has left, and a cancel does not erase it."""
    args = scheduler_args(tmp_path)
    stages = FakeStages(hold_decode=asyncio.Event())
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(steps=8))

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            await wait_for(
                store, job.id, lambda j: j.status == JobStatus.DECODING and "decode" in stages.calls
            )
            # Both experts are done (0.01 s each, as their replicas report): counted while it runs.
            assert store.gpu_seconds_today("dune") == pytest.approx(0.02)
            await asyncio.sleep(0.2)  # the decode runs a while before the cancel
            assert store.cancel(job.id, project="dune") == "cancelled"
            assert await scheduler.cancel(job.id)
            await wait_for(store, job.id, lambda _j: job.id not in scheduler._running)
        finally:
            stop(scheduler)
        cancelled = store.get(job.id)
        assert cancelled.status == JobStatus.CANCELLED
        # The experts' seconds and the part of the decode that ran before the cancel.
        assert cancelled.gpu_seconds >= 0.02 + 0.2
        assert store.gpu_seconds_today("dune") == pytest.approx(cancelled.gpu_seconds)

    run(scenario)


def test_progress_carries_an_eta_from_the_measured_step_time_of_the_steps_left(tmp_path: Path) -> None:
    args = scheduler_args(tmp_path)
    stages = FakeStages(hold_low=asyncio.Event(), seconds_per_step=2.0)
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(steps=8))

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            # the high expert ran its 3 steps at 2 s each: 5 steps left, nothing measured after the denoiser
            low = await wait_for(store, job.id, lambda j: j.status == JobStatus.DENOISING_LOW)
            assert low.eta_at is not None
            predicted = (low.eta_at - low.updated_at).total_seconds()
            assert predicted == pytest.approx(5 * 2.0, abs=0.5)
            assert video_view(low).eta_seconds is not None
            stages.hold_low.set()
            done = await wait_for(store, job.id, lambda j: j.is_finished)
        finally:
            stop(scheduler)
        assert done.status == JobStatus.SUCCEEDED and video_view(done).eta_seconds is None

    run(scenario)


def test_eta_is_the_steps_left_at_the_measured_step_time_then_the_measured_later_stages() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    model = EtaModel()
    key = ("832x480x81", "draft", "none")
    assert model.predict(key, steps_left=3, seconds_per_step=1.5, now=now) == now + timedelta(seconds=4.5)
    model.observe(key, "decode", 2.0)
    model.observe(key, "decode", 4.0)
    model.observe(key, "finish", 1.0)
    model.observe(("832x480x81", "final", "none"), "decode", 100.0)  # another tier's: not this one's
    assert model.predict(key, steps_left=0, seconds_per_step=1.5, now=now) == now + timedelta(seconds=4.0)


@pytest.mark.parametrize(("interval_s", "num_writes"), [(0.0, 8), (3600.0, 4)])
def test_denoise_progress_is_written_at_a_bounded_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interval_s: float, num_writes: int
) -> None:
    """Every step when the interval is 0; else each expert's first and last step only (3 + 5 steps)."""
    writes: list[tuple[JobStatus, float]] = []
    advance = JobStore.advance

    def counted(store: JobStore, job_id: str, attempt: int, status: JobStatus, **fields: Any) -> bool:
        if fields.get("stage_progress", 0.0) > 0:
            writes.append((status, fields["stage_progress"]))
        return advance(store, job_id, attempt, status, **fields)

    monkeypatch.setattr(JobStore, "advance", counted)
    args = scheduler_args(tmp_path, progress_write_interval_s=interval_s)
    stages = FakeStages()
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(steps=8))

    done = run_until_finished(args, stages, store, job.id)
    assert done.status == JobStatus.SUCCEEDED
    assert len(writes) == num_writes
    high, low = JobStatus.DENOISING_HIGH, JobStatus.DENOISING_LOW
    assert {(high, 1 / 3), (high, 1.0), (low, 1 / 5), (low, 1.0)} <= set(writes)


def test_the_claim_loop_reads_only_the_fair_share_columns_of_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_records(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the claim loop loaded full job records")

    args = scheduler_args(tmp_path)
    store = empty_store(args)
    job, _ = store.create("dune", "interactive", job_request(steps=8))
    (queued,) = store.queued_candidates()
    assert (queued.id, queued.project, queued.priority) == (job.id, "dune", "interactive")
    monkeypatch.setattr(JobStore, "queued", full_records)
    stages = FakeStages()
    assert run_until_finished(args, stages, store, job.id).status == JobStatus.SUCCEEDED
    assert stages.calls["wake_webhooks"]  # its outcome may have queued a webhook: Housekeeping is nudged


def test_housekeeping_runs_its_three_loops_and_a_stopped_loop_fails_its_health_check(tmp_path: Path) -> None:
    async def scenario() -> None:
        housekeeping = Housekeeping(scheduler_args(tmp_path))
        try:
            housekeeping.check_health()
            await housekeeping.wake_webhooks()
            housekeeping._tasks["retention"].cancel()
            await asyncio.sleep(0)
            with pytest.raises(RuntimeError, match="the retention loop stopped"):
                housekeeping.check_health()
        finally:
            housekeeping.stop()

    run(scenario)


def test_a_state_ref_lost_with_the_high_noise_replica_falls_back_to_the_boundary_checkpoint(
    tmp_path: Path,
) -> None:
    """The high-noise replica died after its last step: the low-noise expert cannot fetch the state it
    owned (OwnerDiedError). The job is requeued once the checkpoint that replica stored is recorded, and
    the rerun hands the low-noise expert the checkpoint's state instead of a ref."""
    args = scheduler_args(tmp_path)
    stages = FakeStages()
    stages.objects.lost_owners.add("high")
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(steps=8))

    done = run_until_finished(args, stages, store, job.id)
    assert done.status == JobStatus.SUCCEEDED and done.attempt == 2
    kinds = [event.kind for event in store.events(job.id)]
    assert kinds.index("checkpoint") < kinds.index("requeued") < kinds.index("resumed")
    assert len(stages.calls["high"]) == 1  # the rerun skipped the high-noise expert
    first, rerun = (call.state for call in stages.denoise_calls[1:])
    assert isinstance(first, StateRef) and isinstance(rerun, PackedState) and rerun.step_index == 3
    assert stages.calls["decode"] == [pytest.approx(11.0, abs=5)]  # the resumed state reached the decoder


def test_the_low_noise_expert_starts_before_the_boundary_checkpoint_is_stored(tmp_path: Path) -> None:
    args = scheduler_args(tmp_path)
    stages = FakeStages(hold_low=asyncio.Event(), artifacts_gate=asyncio.Event())  # the write waits
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(steps=8))

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            # the low-noise call is under way while the checkpoint is still being written
            await wait_for(store, job.id, lambda _j: "low" in stages.calls)
            assert store.get(job.id).checkpoint_uri is None
            stages.artifacts_gate.set()
            await wait_for(store, job.id, lambda j: j.checkpoint_uri is not None)
            stages.hold_low.set()
            assert (await wait_for(store, job.id, lambda j: j.is_finished)).status == JobStatus.SUCCEEDED
        finally:
            stop(scheduler)

    run(scenario)
