"""The Scheduler routes a job by its model: an I2V job runs encode → keyframe encode (the VAEEncoder reads
its stored keyframes) → the I2V experts' deployments (each fetching the condition ref) → the shared
decoder, upscaler and finisher; a T2V job beside it never touches the I2V deployments; a job naming a model
this deployment does not serve fails with `model_not_served`. The real Scheduler on CPU with stand-in
stages (tests/support/fake_stages.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.spec import RequestSpec, model_spec
from serve.jobs import JobStatus
from serve.jobs.keyframes import save_condition, save_keyframes
from serve.jobs.request import I2V_MODEL, JobRequest, Keyframes, KeyframeSource
from serve.storage import JobArtifacts, make_store
from tests.support.fake_stages import FakeStages, empty_store, run, scheduler_args, start, stop, wait_for
from tests.support.job_requests import job_request


def i2v_request(seed: int = 3) -> JobRequest:
    spec = RequestSpec(
        prompt="the hero leaps out of the fireball", resolution="96x64", duration=0.5, seed=seed
    )
    keyframes = Keyframes(first=KeyframeSource(kind="image", sha256="0" * 64))
    request = JobRequest.of(spec, model_spec("i2v"), keyframes=keyframes)
    return request.model_copy(update={"model": I2V_MODEL})


def test_an_i2v_job_runs_the_keyframe_encode_then_the_i2v_experts_and_a_t2v_job_the_t2v_ones(
    tmp_path: Path,
) -> None:
    args = scheduler_args(tmp_path, i2v={"model": "tiny-i2v"})
    stages = FakeStages()
    store = empty_store(args)
    i2v_job, _ = store.create("dune", "interactive", i2v_request())
    panel = Image.fromarray(np.full((64, 96, 3), 200, np.uint8))
    artifacts = make_store(args.storage)
    save_keyframes(artifacts, "dune", i2v_job.id, panel, None)
    condition = JobArtifacts("dune", i2v_job.id).condition  # as the VAEEncoder keeps it for a retry
    save_condition(artifacts, "dune", i2v_job.id, "digest", np.zeros((20, 3, 8, 12), np.float32))
    t2v_job, _ = store.create("dune", "batch", job_request(steps=8))

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            done = {
                job.id: await wait_for(store, job.id, lambda j: j.is_finished) for job in (i2v_job, t2v_job)
            }
            await wait_for(store, i2v_job.id, lambda _j: i2v_job.id not in scheduler._running)  # cleaned up
        finally:
            stop(scheduler)
        i2v, t2v = done[i2v_job.id], done[t2v_job.id]
        assert i2v.status == t2v.status == JobStatus.SUCCEEDED and i2v.progress == 100
        assert set(i2v.timings) == {
            "encode", "encode_image", "denoise_high", "denoise_low", "decode", "upscale", "finish"
        }  # fmt: skip
        assert "encode_image" not in t2v.timings
        assert not artifacts.exists(condition)  # kept for retries only: it goes when the job ends
        assert stages.calls["encode_image"] == [(i2v_job.id, 9, (64, 96, 3), False)]
        assert [call[0] for call in stages.calls["i2v_high"]] == [f"{i2v_job.id}:1"]
        assert [call[0] for call in stages.calls["i2v_low"]] == [f"{i2v_job.id}:1"]
        assert [call[0] for call in stages.calls["high"]] == [f"{t2v_job.id}:1"]
        # both I2V experts fetched the encoder's condition; the T2V calls carried none
        assert stages.conditions == [("i2v_high", (20, 3, 8, 12)), ("i2v_low", (20, 3, 8, 12))]
        conditions = {call.request_id.split(":")[0]: call.condition for call in stages.denoise_calls}
        assert conditions[t2v_job.id] is None and conditions[i2v_job.id] is not None
        # the I2V call ran its model's recipe: official CFG 3.5 in both experts
        guidance = [call.guidance for call in stages.denoise_calls if call.condition is not None]
        assert guidance == [3.5, 3.5]
        statuses = [event.data.get("status") for event in store.events(i2v_job.id) if event.kind == "stage"]
        assert statuses[:2] == ["ENCODING_IMAGE", "DENOISING_HIGH"]  # claimed into ENCODING
        progress = [event.data["progress"] for event in store.events(i2v_job.id) if event.kind == "stage"]
        # its plan's bands: the keyframe encode from 2/106, the high-noise expert from 8/106
        assert progress == sorted(progress) and progress[:2] == [1, 7]

    run(scenario)


def test_a_job_for_a_model_this_deployment_does_not_serve_fails_with_model_not_served(tmp_path: Path) -> None:
    args = scheduler_args(tmp_path)  # text-to-video only
    stages = FakeStages()
    store = empty_store(args)
    job, _ = store.create("dune", "batch", i2v_request())

    async def scenario() -> None:
        scheduler = start(args, stages)
        try:
            failed = await wait_for(store, job.id, lambda j: j.is_finished)
        finally:
            stop(scheduler)
        assert failed.status == JobStatus.FAILED and failed.error_code == "model_not_served"
        assert "wan2.2-i2v-a14b" in failed.error_message and "high" not in stages.calls

    run(scenario)
