"""A colocated Denoiser on the live cluster: `experts.layout: colocated` with both experts on a 2-rank group
(`parallel: {ulysses: 2}`, a placement group of 2 CPU bundles, rank 1 a ShardWorker actor holding both
experts, gloo). It serves a draft, a cached final and a final with a style LoRA (the draft with the frames of
the session app's unsharded split pair), and killing its worker rank while a final is in its low-noise
steps replaces the group: that job resumes from the boundary checkpoint the replica wrote, and every job in
flight completes exactly once.

The app is its own Serve app (`previz-coloc`, its own SQLite store) beside the session's app, for this
module's duration (tests.support.cluster.extra_app).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from serve.cli.client import PrevizClient
from serve.jobs import JobStatus
from serve.stages.shard_worker import worker_name
from serve.webhooks import open_job_store
from tests.support.cluster import Cluster, ExtraApp, extra_app, wait_for_replicas
from tests.test_colocated import STYLE, lora_folders
from tests.test_sharding import decoded_frames

pytestmark = pytest.mark.cluster

APP = "previz-coloc"
WAIT_S = 600  # bound of the waits on a loaded 2-core box; no timing is asserted
TINY = {"size": "96x64", "seconds": "0.5"}  # 72 video tokens: divide by 2
CACHE = {"threshold": 0.03, "max_skip": 2, "warmup_steps": 1}
LONG = {**TINY, "steps": 100}  # 64 high-noise + 36 low-noise steps: long enough to kill a rank in the low


def colocated(loras: Path):
    def configure(app: dict[str, Any]) -> None:
        """The session app's config, with one 2-rank Denoiser holding both experts and a style LoRA."""
        group = {"parallel": {"ulysses": 2, "timeout_s": 60}}
        app["args"]["experts"] = {"layout": "colocated", "high": group, "low": group}
        app["args"]["adapters"] = {"loras": [{"name": STYLE, "source": str(loras / STYLE)}]}
        entries = [
            e for e in app["deployments"] if e["name"] not in ("HighNoiseDenoiser", "LowNoiseDenoiser")
        ]
        entries.append(
            {
                "name": "Denoiser",
                "num_replicas": 1,
                "ray_actor_options": {"num_cpus": 0.1},
                "placement_group_bundles": [{"CPU": 0.1}, {"CPU": 0.1}],
            }
        )
        app["deployments"] = entries

    return configure


@pytest.fixture(scope="module")
def coloc(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExtraApp]:
    loras = tmp_path_factory.mktemp("loras")
    lora_folders(loras)
    workdir = tmp_path_factory.mktemp("coloc")
    with extra_app(cluster, APP, workdir, colocated(loras), timeout_s=WAIT_S) as app:
        yield app


def test_a_2_rank_colocated_denoiser_serves_a_draft_a_cached_final_and_a_style_lora_final(
    cluster: Cluster, coloc: ExtraApp, tmp_path: Path
) -> None:
    client = coloc.client
    (model,) = client.http.get("/v1/models").json()["data"]
    assert model["layout"] == "colocated" and set(model["tiers"]) == {"draft", "final"}
    for expert in ("high", "low"):
        assert (model["experts"][expert]["deployment"], model["experts"][expert]["ulysses"]) == (
            "Denoiser",
            2,
        )
    assert [adapter["name"] for adapter in model["adapters"]] == [STYLE]
    (replica,) = _replicas("Denoiser")
    ray.get_actor(worker_name(replica, 1), namespace="serve")  # rank 1 runs in its own actor
    assert not _replicas("HighNoiseDenoiser") and not _replicas("LowNoiseDenoiser")

    draft = {"prompt": "a lighthouse in a storm", **TINY, "quality": "draft", "seed": 4242}
    bodies = {
        "draft": draft,
        "cached": {"prompt": "a crane move over rooftops", **TINY, "steps": 8, "seed": 5, "cache": CACHE},
        "styled": {"prompt": "a rainy alley", **TINY, "steps": 8, "seed": 6, "loras": [{"name": STYLE}]},
    }
    ids = {name: client.create(body)["id"] for name, body in bodies.items()}
    reference = cluster.client("coloc-ref").create(draft)["id"]  # the session app: split, unsharded
    for name, job_id in ids.items():
        job = _wait(client, job_id)
        assert job["status"] == "completed", (name, job)
    assert cluster.wait_for([reference], timeout_s=WAIT_S)[reference]["status"] == "completed"
    ours = client.download(ids["draft"], tmp_path / "draft.mp4")
    theirs = cluster.client("coloc-ref").download(reference, tmp_path / "reference.mp4")
    assert np.array_equal(decoded_frames(ours), decoded_frames(theirs))
    store = open_job_store(coloc.database_url)
    try:
        for name, job_id in ids.items():
            kinds = [event.kind for event in store.events(job_id)]
            assert ("checkpoint" in kinds) == (name != "draft"), (name, kinds)  # drafts write none
    finally:
        store.close()


def test_killing_the_worker_rank_in_the_low_noise_steps_replaces_the_group_and_every_job_completes_once(
    coloc: ExtraApp,
) -> None:
    client = coloc.client
    (replica,) = _replicas("Denoiser")
    worker = ray.get_actor(worker_name(replica, 1), namespace="serve")
    long_id = client.create({"prompt": "a slow dolly through fog", "seed": 77, **LONG})["id"]
    others = [client.create({"prompt": f"take {i}", **TINY, "steps": 8, "seed": i})["id"] for i in range(2)]
    store = open_job_store(coloc.database_url)
    try:
        deadline = time.monotonic() + WAIT_S
        while not _in_low_noise_steps_with_a_checkpoint(store, long_id):
            assert time.monotonic() < deadline and not store.get(long_id).is_finished, store.get(long_id)
            time.sleep(0.02)
        ray.kill(worker, no_restart=True)

        for job_id in [long_id, *others]:
            assert _wait(client, job_id)["status"] == "completed", job_id
            kinds = Counter(event.kind for event in store.events(job_id))
            assert (kinds["succeeded"], kinds["failed"]) == (1, 0), (job_id, kinds)
        job = store.get(long_id)
        kinds = [event.kind for event in store.events(long_id)]
        assert job.attempt == 2 and kinds.index("requeued") < kinds.index("resumed"), kinds
        resumed = next(event for event in store.events(long_id) if event.kind == "resumed")
        assert resumed.data["step_index"] == 64  # the rerun started at the low-noise steps
        # the old replica's actor may still be stopping (graceful shutdown) while the new one ran the jobs
        (new_replica,) = wait_for_replicas("Denoiser", 1, app=APP)
        assert new_replica != replica  # Serve replaced the whole group
        ray.get_actor(worker_name(new_replica, 1), namespace="serve")
    finally:
        store.close()


def _in_low_noise_steps_with_a_checkpoint(store, job_id: str) -> bool:
    job = store.get(job_id)
    return (
        job.status == JobStatus.DENOISING_LOW and job.checkpoint_uri is not None and job.stage_progress < 0.5
    )


def _replicas(deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return sorted(
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(prefix)
    )


def _wait(client: PrevizClient, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} not finished after {WAIT_S} s: {client.get(job_id)}")
