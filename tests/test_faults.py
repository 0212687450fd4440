"""Faults: a lost denoiser replica resumes from the expert-boundary checkpoint and gives the same clip, a
failing Finisher or artifact store fails the job clearly after bounded retries, and a shutdown with work in
flight loses no accepted job.

The in-process tests run the real stage classes, a real SQLite job store and the real SeaweedFS server; the
cluster tests kill real replica actors. The restart test restarts the session cluster: it is the LAST test
of this module (it leaves the cluster running with the same config).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch

from pipeline.denoise import Denoiser, initial_state
from pipeline.frames import Frames
from pipeline.safety import ContentBlocked
from pipeline.spec import resolve
from pipeline.text import TextEncoder
from pipeline.vae import VAEDecoder
from pipeline.weights import WanComponents, build_preset
from serve.cli import launch
from serve.config import PrevizArgs
from serve.jobs import JobRecord, JobStatus, JobStore
from serve.scheduling.checkpoints import (
    CheckpointError,
    decode_state,
    encode_state,
    read_checkpoint,
    write_checkpoint,
)
from serve.scheduling.faults import StageFailed, finish_with_retries
from serve.stages.finisher import FinisherStage
from serve.stages.payloads import FinishCall, FinishedClip
from serve.stages.transfer import pack_state, unpack_state
from serve.storage import JobArtifacts, LocalArtifactStore, S3ArtifactStore, StorageSettings, make_store
from serve.webhooks import open_job_store
from tests.support.cluster import Cluster, free_port, replica_actor_names
from tests.support.job_requests import job_request
from tests.support.servers.seaweedfs import S3Server
from tests.support.wan_reference import tiny_request

CHAOS = {"resolution": "96x64", "duration": 0.5, "steps": 100}  # 64 high-noise + 36 low-noise steps
WAIT_S = 600  # bound of the cluster tests' waits (a loaded 2-core CI box); no timing is asserted


@pytest.fixture(scope="module")
def tiny() -> WanComponents:
    return build_preset("tiny")


# --- checkpoints at the expert boundary ----------------------------------------------------------


def test_a_run_resumed_from_the_boundary_checkpoint_gives_the_same_clip(
    tiny: WanComponents, tmp_path: Path
) -> None:
    model = tiny.model
    resolved = resolve(tiny_request(seed=21, steps=8), model)
    encoder = TextEncoder(tiny.tokenizer, tiny.text_encoder)
    prompt, negative = encoder.encode([resolved.prompt, resolved.negative_prompt])
    high = Denoiser(tiny.transformer, tiny.scheduler, expert="high", boundary_ratio=model.boundary_ratio)
    low = Denoiser(tiny.transformer_2, tiny.scheduler, expert="low", boundary_ratio=model.boundary_ratio)
    decoder = VAEDecoder(tiny.vae)
    at_boundary = high.run(initial_state(resolved, model), prompt, negative, resolved.guidance_high)
    uninterrupted = low.run(at_boundary, prompt, negative, resolved.guidance_low)

    # The attempt that saved the checkpoint is gone; a new one re-encodes the text and reads the state.
    store = LocalArtifactStore(tmp_path / "artifacts")
    key = JobArtifacts("dune", "vid_resume").checkpoint
    write_checkpoint(store, key, pack_state(at_boundary))
    prompt_again, negative_again = TextEncoder(tiny.tokenizer, tiny.text_encoder).encode(
        [resolved.prompt, resolved.negative_prompt]
    )
    restored = unpack_state(read_checkpoint(store, key, resolved.steps))
    resumed = low.run(restored, prompt_again, negative_again, resolved.guidance_low)

    assert 0 < restored.step_index < resolved.steps  # a real mid-run state, solver history included
    assert restored.history.last_sample is not None
    assert torch.equal(resumed.latents, uninterrupted.latents)
    clip = decoder.decode(uninterrupted.latents, fps=resolved.fps).pixels
    assert np.array_equal(decoder.decode(resumed.latents, fps=resolved.fps).pixels, clip)
    # The solver history came back bit for bit: the low expert's first step is a multistep one.
    for saved, loaded in zip(at_boundary.history.model_outputs, restored.history.model_outputs, strict=True):
        assert torch.equal(saved, loaded)


def test_a_checkpoint_round_trips_every_field_including_empty_history(tiny: WanComponents) -> None:
    resolved = resolve(tiny_request(seed=3), tiny.model)
    fresh = pack_state(initial_state(resolved, tiny.model))  # no solver history yet: Nones
    again = decode_state(encode_state(fresh))
    assert np.array_equal(again.latents, fresh.latents) and again.latents.dtype == np.float32
    assert again.model_outputs == (None, None) and again.last_sample is None
    assert (again.num_steps, again.step_index, again.timestep_list) == (
        fresh.num_steps,
        fresh.step_index,
        fresh.timestep_list,
    )


def test_an_unusable_checkpoint_is_refused_with_an_error_naming_it(
    tiny: WanComponents, tmp_path: Path
) -> None:
    store = LocalArtifactStore(tmp_path)
    key = JobArtifacts("dune", "vid_broken").checkpoint
    with pytest.raises(
        CheckpointError, match=r"checkpoint 'dune/vid_broken/checkpoint-boundary.npz'.*no artifact"
    ):
        read_checkpoint(store, key, 8)
    store.put_bytes(key, b"half an npz", "application/octet-stream")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(store, key, 8)
    write_checkpoint(
        store, key, pack_state(initial_state(resolve(tiny_request(steps=8), tiny.model), tiny.model))
    )
    with pytest.raises(CheckpointError, match="does not fit a request of 12 steps"):
        read_checkpoint(store, key, 12)


def test_checkpoint_bytes_round_trip_through_s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _s3_store(s3_server, monkeypatch, _new_bucket(s3_server))
    store.put_bytes(
        "dune/vid_s3/checkpoint-boundary.npz", b"\x00latents\xff" * 1000, "application/octet-stream"
    )
    assert store.read_bytes("dune/vid_s3/checkpoint-boundary.npz") == b"\x00latents\xff" * 1000


def test_checkpoint_and_retry_records_are_fenced_by_the_attempt(tmp_path: Path) -> None:
    store, job = _running_job(tmp_path)
    key = JobArtifacts(job.project, job.id).checkpoint
    assert not store.save_checkpoint(job.id, job.attempt - 1, key, step_index=6)  # a stale run
    assert store.get(job.id).checkpoint_uri is None
    assert store.save_checkpoint(job.id, job.attempt, key, step_index=6)
    assert store.log_event(job.id, job.attempt, "resumed", {"message": "resumed from checkpoint"})
    assert not store.log_event(job.id, job.attempt + 1, "retry", {})
    assert store.get(job.id).checkpoint_uri == key
    events = [(event.kind, event.data) for event in store.events(job.id)][-2:]
    assert events == [
        ("checkpoint", {"attempt": 1, "uri": key, "step_index": 6}),
        ("resumed", {"attempt": 1, "message": "resumed from checkpoint"}),
    ]
    # A requeued job keeps its checkpoint for the next attempt; success lets the scheduler clear it.
    assert store.requeue(job.id, job.attempt) == JobStatus.QUEUED
    assert store.claim(job.id, "scheduler-b").checkpoint_uri == key
    store.clear_checkpoint(job.id)
    assert store.get(job.id).checkpoint_uri is None


# --- Finisher and storage failures -----------------------------------------------------------------


def test_a_finisher_whose_s3_endpoint_is_down_fails_the_job_with_storage_failed_after_three_tries(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    store, job = _running_job(tmp_path)
    down = S3Server(**{**dataclasses.asdict(s3_server), "endpoint_url": f"http://127.0.0.1:{free_port()}"})
    finisher = _finisher(down, monkeypatch, "previz-clips")  # nothing listens on that port
    calls = []
    finish = _finish_call(finisher, job, calls)

    with pytest.raises(StageFailed) as failure:
        asyncio.run(finish_with_retries(finish, store, job, attempts=3, base_s=0.01))

    assert failure.value.code == "storage_failed"
    assert len(calls) == 3
    failed = store.get(job.id)
    assert failed.status == JobStatus.FAILED and failed.error_code == "storage_failed"
    assert failed.error_message.startswith(
        "Finishing the clip failed on all 3 tries; the last error: StorageError"
    )
    assert f"dune/{job.id}/clip-a1.mp4" in failed.error_message
    assert "Could not connect to the endpoint URL" in failed.error_message
    retries = [event.data for event in store.events(job.id) if event.kind == "retry"]
    assert [(data["try"], data["of"], data["retry_in_s"]) for data in retries] == [(1, 3, 0.01), (2, 3, 0.02)]
    assert all("Could not connect" in data["error"] for data in retries)
    assert [event.kind for event in store.events(job.id)][-1] == "failed"


def test_frames_whose_owner_is_gone_are_not_retried_but_handed_on_as_a_lost_replica(tmp_path: Path) -> None:
    from ray.exceptions import ObjectLostError

    from serve.scheduling.faults import REPLICA_LOST

    store, job = _running_job(tmp_path)
    calls = []

    async def finish() -> None:
        calls.append(1)
        raise ObjectLostError("00" * 28, None, "the upscaler replica that owned the frames")

    with pytest.raises(REPLICA_LOST):  # the Scheduler requeues the job, which resumes from its checkpoint
        asyncio.run(finish_with_retries(finish, store, job, attempts=3, base_s=0.01))
    assert len(calls) == 1
    assert store.get(job.id).status == JobStatus.ENCODING and store.events(job.id)[-1].kind != "retry"


def test_a_storage_outage_shorter_than_the_retries_still_stores_the_clip(tmp_path: Path) -> None:
    store, job = _running_job(tmp_path)
    root = tmp_path / "artifacts"
    finisher = FinisherStage(PrevizArgs(storage=StorageSettings(local_root=root)))
    (root / job.project).write_text("not a folder")  # the project's folder cannot be made: OSError

    def storage_back(number: int) -> None:  # the outage ends after the first failed try
        if number == 2:
            (root / job.project).unlink()

    calls: list[int] = []
    finish = _finish_call(finisher, job, calls, before_try=storage_back)
    clip = asyncio.run(finish_with_retries(finish, store, job, attempts=3, base_s=0.01))

    assert len(calls) == 2 and finisher.store.exists(clip.key)
    assert store.get(job.id).status == JobStatus.ENCODING  # still running: the scheduler records success
    retries = [event.data for event in store.events(job.id) if event.kind == "retry"]
    assert len(retries) == 1 and retries[0]["error"].startswith("StorageError: could not store artifact")


def test_a_finisher_that_keeps_raising_fails_the_job_with_finish_failed(tmp_path: Path) -> None:
    store, job = _running_job(tmp_path)
    finisher = FinisherStage(PrevizArgs(storage=StorageSettings(local_root=tmp_path)))
    calls: list[int] = []
    finish = _finish_call(finisher, job, calls, look="sepia")  # a look the grader does not know

    with pytest.raises(StageFailed, match="failed on all 2 tries"):
        asyncio.run(finish_with_retries(finish, store, job, attempts=2, base_s=0.0))

    failed = store.get(job.id)
    assert len(calls) == 2 and failed.error_code == "finish_failed"
    assert failed.error_message == (
        "Finishing the clip failed on all 2 tries; the last error: "
        "ValueError: `look` must be one of none, film but is 'sepia'."
    )


def test_a_clip_refused_by_the_frame_check_is_not_retried(tmp_path: Path) -> None:
    store, job = _running_job(tmp_path)
    args = PrevizArgs(
        storage=StorageSettings(local_root=tmp_path),
        safety={"frame_check": "tests.support.safety_hooks:block_bright_frames"},
    )
    finisher = FinisherStage(args)
    calls: list[int] = []
    finish = _finish_call(finisher, job, calls, bright=True)

    with pytest.raises(ContentBlocked):
        asyncio.run(finish_with_retries(finish, store, job, attempts=3, base_s=0.0))

    assert len(calls) == 1  # the same frames get the same verdict: no second try
    assert [event.kind for event in store.events(job.id)].count("retry") == 0
    assert store.get(job.id).status == JobStatus.ENCODING  # the scheduler records content_blocked


# --- on the cluster --------------------------------------------------------------------------------


@pytest.mark.cluster
def test_chaos_killing_a_denoiser_replica_and_the_scheduler_completes_all_8_jobs_exactly_once(
    cluster: Cluster,
) -> None:
    ids = []
    for index in range(8):
        project = f"faults-{index % 2}"
        # 100 steps: the low-noise expert streams long enough (36 batched steps) to be killed mid-job
        body = {"prompt": f"chaos take {index}", "project": project, "seed": 700 + index, **CHAOS}
        ids.append(cluster.client(project).create(body)["id"])
    store = cluster.store()

    # Kill the low-noise replica while it streams a job's steps (the job's checkpoint is saved by then).
    (low_replica,) = replica_actor_names("LowNoiseDenoiser")
    low = ray.get_actor(low_replica, namespace="serve")

    def streaming_low_steps() -> bool:
        return any(
            job.status == JobStatus.DENOISING_LOW and 0 < job.stage_progress < 0.5 and job.checkpoint_uri
            for job in _jobs(store, ids)
        )

    _wait_until(streaming_low_steps, "no job reached the low-noise steps with a checkpoint", store, ids)
    ray.kill(low, no_restart=True)

    # Once a job resumed from its checkpoint, kill the Scheduler too.
    def some_resumed() -> bool:
        return any(_kinds(store, job_id)["resumed"] for job_id in ids)

    _wait_until(some_resumed, "no job resumed from its checkpoint after the replica died", store, ids)
    _kill_replica("Scheduler")

    finished = cluster.wait_for(ids, timeout_s=WAIT_S)
    assert all(job["status"] == "completed" for job in finished.values()), finished
    artifacts = make_store(StorageSettings(**cluster.config["applications"][0]["args"]["storage"]))
    for job_id in ids:
        kinds = _kinds(store, job_id)
        assert kinds["succeeded"] == 1 and kinds["failed"] == 0, (job_id, kinds)
        assert artifacts.exists(store.get(job_id).artifact_uri)
    resumed = [event for job_id in ids for event in store.events(job_id) if event.kind == "resumed"]
    assert resumed and all(event.data["message"] == "resumed from checkpoint" for event in resumed)
    for event in resumed:  # a resumed attempt skipped the high-noise expert
        attempt = event.data["attempt"]
        stages = [e.data for e in store.events(event.job_id) if e.kind == "stage"]
        assert [stage["status"] for stage in stages if stage["attempt"] == attempt][:1] in (
            [],  # the scheduler was killed before it advanced
            ["DENOISING_LOW"],
        ), (event.job_id, stages)


@pytest.mark.cluster
def test_shutting_down_with_work_in_flight_and_starting_again_loses_no_accepted_job(
    cluster: Cluster,
) -> None:
    """Runs last in this module: it restarts the whole session cluster with the same config."""
    ids = []
    for index in range(24):  # three times max_jobs_in_flight: more work than a shutdown lets finish
        project = f"restart-{index % 2}"
        body = {"prompt": f"restart take {index}", "project": project, "seed": 800 + index, **CHAOS}
        ids.append(cluster.client(project).create(body)["id"])
    store = cluster.store()

    def some_running_some_queued() -> bool:
        statuses = {job.status for job in _jobs(store, ids)}
        return JobStatus.QUEUED in statuses and any(status.is_running for status in statuses)

    _wait_until(some_running_some_queued, "no job started", store, ids)

    launch.shutdown()
    cluster.url = launch.deploy(cluster.config)
    launch.wait_ready(cluster.url, timeout_s=WAIT_S)

    finished = cluster.wait_for(ids, timeout_s=WAIT_S)
    assert all(job["status"] == "completed" for job in finished.values()), finished
    for job_id in ids:
        kinds = _kinds(store, job_id)
        assert kinds["succeeded"] == 1, (job_id, kinds)
        assert kinds["failed"] == kinds["cancelled"] == 0, (job_id, kinds)
    assert any(_kinds(store, job_id)["requeued"] for job_id in ids), "no job was in flight at the shutdown"


# --- helpers ---------------------------------------------------------------------------------------


def _running_job(tmp_path: Path) -> tuple[JobStore, JobRecord]:
    store = open_job_store(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_schema()
    job, _ = store.create("dune", "batch", job_request("a dune"))
    return store, store.claim(job.id, "scheduler-a")


def _new_bucket(s3_server: S3Server) -> str:
    bucket = f"previz-faults-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=bucket)
    return bucket


def _settings(s3_server: S3Server, bucket: str) -> StorageSettings:
    return StorageSettings(
        kind="s3",
        s3_uri=f"s3://{bucket}/clips",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region=s3_server.region,
    )


def _s3_store(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, bucket: str) -> S3ArtifactStore:
    _credentials(s3_server, monkeypatch)
    return S3ArtifactStore(_settings(s3_server, bucket))


def _credentials(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)


def _finisher(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, bucket: str) -> Any:
    """An instance of the Finisher deployment's own class, in this process, storing into `bucket`."""
    _credentials(s3_server, monkeypatch)
    return FinisherStage(PrevizArgs(storage=_settings(s3_server, bucket)))


def _finish_call(
    finisher: Any,
    job: JobRecord,
    calls: list[int],
    before_try: Callable[[int], None] | None = None,
    look: str = "none",
    bright: bool = False,
) -> Callable[[], Awaitable[FinishedClip]]:
    """The Finisher's work on a small clip of `job`, as the Scheduler awaits it; counts tries in `calls`."""
    frames = Frames(pixels=np.full((5, 64, 96, 3), 200 if bright else 90, dtype=np.uint8), fps=16)
    call = FinishCall(project=job.project, job_id=job.id, attempt=job.attempt, seed=1, look=look,
                      label="AI-generated draft", metadata={})  # fmt: skip

    async def finish() -> FinishedClip:
        calls.append(len(calls) + 1)
        if before_try is not None:
            before_try(len(calls))
        return await asyncio.to_thread(finisher._finish, frames, call)

    return finish


def _jobs(store: JobStore, ids: list[str]) -> list[JobRecord]:
    return [store.get(job_id) for job_id in ids]


def _kinds(store: JobStore, job_id: str) -> Counter:
    return Counter(event.kind for event in store.events(job_id))


def _wait_until(condition: Callable[[], bool], what: str, store: JobStore, ids: list[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        jobs = _jobs(store, ids)
        if time.monotonic() > deadline or all(job.is_finished for job in jobs):
            states = {job.id: (job.status.name, job.attempt, job.error_code) for job in jobs}
            raise AssertionError(f"{what}: {states}")
        time.sleep(0.02)


def _kill_replica(deployment: str) -> None:
    (name,) = replica_actor_names(deployment)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
