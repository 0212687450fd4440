"""The Scheduler with the colocated layout (`experts.layout: colocated`), on the CPU without a Ray cluster:
the real Scheduler and job store, a stand-in Denoiser that answers like the colocated deployment. A job's
denoising is ONE call (nothing moves between deployments at the boundary), its status moves to the
low-noise stage when the boundary is streamed, the checkpoint written there lets a rerun resume at the
low-noise steps, and drafts write no checkpoint in either layout."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from ray.exceptions import ActorDiedError

from serve.jobs import JobStatus
from serve.stages.payloads import DenoiseBoundary, InitialNoise, StateRef
from serve.stages.transfer import PackedState
from serve.storage import JobArtifacts
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


def colocated_args(tmp_path: Path, **overrides):
    return scheduler_args(tmp_path, experts={"layout": "colocated"}, **overrides)


def test_a_job_is_denoised_by_one_call_to_the_colocated_denoiser_and_nothing_crosses_at_the_boundary(
    tmp_path: Path,
) -> None:
    args = colocated_args(tmp_path)
    stages = FakeStages(colocated=True)
    store = empty_store(args)
    job, _ = store.create("dune", "interactive", job_request(steps=8))

    async def scenario():
        scheduler = start(args, stages)
        try:
            done = await wait_for(store, job.id, lambda j: j.is_finished)
            await wait_for(store, job.id, lambda _j: job.id not in scheduler._running)  # cleaned up
        finally:
            stop(scheduler)
        return done

    done = asyncio.run(scenario())
    assert done.status == JobStatus.SUCCEEDED and done.attempt == 1
    assert stages.calls["denoiser"] == [(f"{job.id}:1", "96x64x9", 0)]  # one call for both experts
    assert "high" not in stages.calls and "low" not in stages.calls  # no split deployment exists or ran
    (call,) = stages.denoise_calls
    resolved = job.request.resolved
    assert isinstance(call.state, InitialNoise)
    assert (call.guidance, call.guidance_low) == (resolved.guidance_high, resolved.guidance_low)
    # the only state the Scheduler saw is the final one, as a ref: none crossed at the boundary
    states = [event.state for event in stages.wire.received_objects if hasattr(event, "state")]
    assert len(states) == 1 and isinstance(states[0], StateRef) and states[0].step_index == 8
    assert any(isinstance(event, DenoiseBoundary) for event in stages.wire.received_objects)
    assert stages.calls["decode"] == [pytest.approx(11.0, abs=5)]  # both experts' changes reached it
    assert {"denoise_high", "denoise_low"} <= set(done.timings)
    keys = JobArtifacts("dune", job.id)
    checkpoint_uri = store.get(job.id).checkpoint_uri
    assert checkpoint_uri is None and not stages.artifacts.exists(keys.checkpoint)  # dropped at the end


def test_the_status_moves_to_the_low_noise_stage_when_the_boundary_is_streamed(tmp_path: Path) -> None:
    args = colocated_args(tmp_path)
    stages = FakeStages(colocated=True, hold_low=asyncio.Event())
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(steps=8))

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            at_low = await wait_for(store, job.id, lambda j: j.status == JobStatus.DENOISING_LOW)
            assert at_low.timings.get("denoise_high") == pytest.approx(0.01)
            # the checkpoint written from the boundary is recorded while the low-noise steps wait
            recorded = await wait_for(store, job.id, lambda j: j.checkpoint_uri is not None)
            assert recorded.status == JobStatus.DENOISING_LOW
            stages.hold_low.set()
            assert (await wait_for(store, job.id, lambda j: j.is_finished)).status == JobStatus.SUCCEEDED
        finally:
            stop(scheduler)

    run(scenario)


def test_a_replica_lost_after_the_boundary_requeues_and_the_rerun_starts_at_the_low_noise_steps(
    tmp_path: Path,
) -> None:
    args = colocated_args(tmp_path)
    stages = FakeStages(colocated=True, lose_after_boundary=ActorDiedError())
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(steps=8))

    done = run_until_finished(args, stages, store, job.id)
    assert done.status == JobStatus.SUCCEEDED and done.attempt == 2
    kinds = [event.kind for event in store.events(job.id)]
    assert kinds.index("checkpoint") < kinds.index("requeued") < kinds.index("resumed")
    first, rerun = stages.denoise_calls
    assert isinstance(first.state, InitialNoise)
    assert isinstance(rerun.state, PackedState) and rerun.state.step_index == 3  # the high steps skipped
    assert [call[2] for call in stages.calls["denoiser"]] == [0, 3]
    assert stages.calls["decode"] == [pytest.approx(11.0, abs=5)]  # the resumed state reached the decoder


def test_a_cancel_during_the_colocated_call_cancels_it_on_its_replica(tmp_path: Path) -> None:
    args = colocated_args(tmp_path)
    stages = FakeStages(colocated=True, hold_low=asyncio.Event())
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(steps=8))

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            await wait_for(store, job.id, lambda j: j.status == JobStatus.DENOISING_LOW)
            assert store.cancel(job.id, project="dune") == "cancelled"
            assert await scheduler.cancel(job.id)
            await wait_for(store, job.id, lambda _j: job.id not in scheduler._running)
        finally:
            stop(scheduler)
        assert stages.cancelled == ["denoiser"] and "decode" not in stages.calls

    run(scenario)


@pytest.mark.parametrize("colocated", [False, True], ids=["split", "colocated"])
def test_a_draft_writes_no_boundary_checkpoint_and_a_final_does(tmp_path: Path, colocated: bool) -> None:
    args = colocated_args(tmp_path) if colocated else scheduler_args(tmp_path)
    stages = FakeStages(colocated=colocated)
    store = empty_store(args)
    draft, _ = store.create("dune", "batch", job_request(steps=None, quality="draft"))
    final, _ = store.create("dune", "batch", job_request(steps=8, seed=8))

    for job in (draft, final):
        assert run_until_finished(args, stages, store, job.id).status == JobStatus.SUCCEEDED
    keys = {
        call.request_id.split(":")[0]: call.checkpoint_key
        for call in stages.denoise_calls
        if call.checkpoint_key
    }
    assert keys == {final.id: JobArtifacts("dune", final.id).checkpoint}
    assert "checkpoint" not in [event.kind for event in store.events(draft.id)]
