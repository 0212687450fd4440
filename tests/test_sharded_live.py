"""A sharded HighNoiseDenoiser on the live cluster: `experts.high.parallel: {ulysses: 2}` (a placement group
of 2 CPU bundles, rank 1 a ShardWorker actor, gloo) serves a job end to end with the frames of the
unsharded session app, and killing its worker rank mid-job replaces the replica; the job then completes
exactly once on its next attempt.

The sharded app is a second Serve app (`previz-shard`, route /previz-shard, its own SQLite store) next to
the session's `previz` app in the same Ray instance (tests.support.cluster.extra_app), deployed by this module
and deleted after it, so the session app is left as it is (a config change would restart all its replicas).
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
from serve.jobs import JobStatus, JobStore
from serve.stages.shard_worker import worker_name
from serve.webhooks import open_job_store
from tests.support.cluster import Cluster, ExtraApp, extra_app, wait_for_replicas
from tests.test_sharding import decoded_frames

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]  # the session cluster and the app start first

APP = "previz-shard"
WAIT_S = 600  # bound of the waits on a loaded 2-core box; no timing is asserted
TAKE = {"size": "96x64", "seconds": "0.5", "steps": 8, "seed": 4242}  # 72 tokens: divide by 2
LONG = {"size": "96x64", "seconds": "0.5", "steps": 100}  # 64 high-noise steps: long enough to kill one


def sharded(app: dict[str, Any]) -> None:
    """The session app's config, changed to one 2-rank HighNoiseDenoiser replica. The count is set here,
    not inherited: the session config is whatever the session app runs now (on CI a test that had scaled
    it to 2 replicas failed before scaling back, and this app copied the 2)."""
    app["args"]["experts"] = {"high": {"parallel": {"ulysses": 2, "timeout_s": 60}}}
    for entry in app["deployments"]:
        if entry["name"] == "HighNoiseDenoiser":
            entry["placement_group_bundles"] = [{"CPU": 0.1}, {"CPU": 0.1}]
            entry["num_replicas"] = 1


@pytest.fixture(scope="module")
def shard(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExtraApp]:
    """The sharded app (`previz-shard`), deployed for this module beside the session app."""
    with extra_app(cluster, APP, tmp_path_factory.mktemp("shard"), sharded, timeout_s=WAIT_S) as app:
        yield app


def test_a_2_rank_high_noise_expert_serves_a_job_with_the_unsharded_frames(
    cluster: Cluster, shard: ExtraApp, tmp_path: Path
) -> None:
    client = shard.client
    models = client.http.get("/v1/models").json()["data"][0]["experts"]
    assert (models["high"]["ulysses"], models["high"]["gpus_per_replica"]) == (2, 2)
    (replica,) = wait_for_replicas("HighNoiseDenoiser", 1, app=APP)
    ray.get_actor(worker_name(replica, 1), namespace="serve")  # rank 1 runs in its own actor

    sharded = client.create({"prompt": "a lighthouse in a storm", **TAKE})["id"]
    plain = cluster.client("shard-ref").create({"prompt": "a lighthouse in a storm", **TAKE})["id"]
    assert _wait(client, sharded)["status"] == "completed"
    assert cluster.wait_for([plain], timeout_s=WAIT_S)[plain]["status"] == "completed"
    ours = client.download(sharded, tmp_path / "sharded.mp4")
    theirs = cluster.client("shard-ref").download(plain, tmp_path / "plain.mp4")
    assert np.array_equal(decoded_frames(ours), decoded_frames(theirs))


def test_killing_the_worker_rank_mid_job_replaces_the_replica_and_the_job_completes_once(
    shard: ExtraApp,
) -> None:
    client = shard.client
    (replica,) = wait_for_replicas("HighNoiseDenoiser", 1, app=APP)
    worker = ray.get_actor(worker_name(replica, 1), namespace="serve")
    job_id = client.create({"prompt": "a crane move over rooftops", "seed": 77, **LONG})["id"]
    store = open_job_store(shard.database_url)
    try:
        deadline = time.monotonic() + WAIT_S
        while not _streaming_high_steps(store, job_id):
            assert time.monotonic() < deadline and not store.get(job_id).is_finished, store.get(job_id)
            time.sleep(0.02)
        ray.kill(worker, no_restart=True)

        assert _wait(client, job_id)["status"] == "completed"
        job = store.get(job_id)
        kinds = Counter(event.kind for event in store.events(job_id))
        assert (kinds["succeeded"], kinds["failed"], job.attempt) == (1, 0, 2), (kinds, job.attempt)
        # the old replica's actor may still be stopping (graceful shutdown) while the new one ran the job
        (new_replica,) = wait_for_replicas("HighNoiseDenoiser", 1, app=APP)
        assert new_replica != replica  # Serve replaced the whole group
        ray.get_actor(worker_name(new_replica, 1), namespace="serve")
    finally:
        store.close()


def _streaming_high_steps(store: JobStore, job_id: str) -> bool:
    job = store.get(job_id)
    return job.status == JobStatus.DENOISING_HIGH and 0 < job.stage_progress < 0.5


def _wait(client: PrevizClient, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} not finished after {WAIT_S} s: {client.get(job_id)}")
