"""The I2V model on the test suite's shared cluster (deploy/local.yaml: tiny-i2v, its experts colocated in
one I2VDenoiser, a VAEEncoder): a job on `wan2.2-i2v-a14b` whose panel is stored with it runs the keyframe
encode, its model's experts and the shared decoder and finisher, and completes; a T2V job beside it still
completes on the T2V experts. The job is written into the store as the admission path writes one (the
keyframes stored under the id drawn first), so this needs nothing of the HTTP input side."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.spec import RequestSpec, model_spec
from serve.jobs import JobStatus, rows
from serve.jobs.keyframes import save_keyframes
from serve.jobs.models import new_job_id
from serve.jobs.request import I2V_MODEL, JobRequest, Keyframes, KeyframeSource
from serve.storage import StorageSettings, make_store
from tests.support.cluster import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]  # the session cluster starts first

PROJECT = "i2v-live"


def test_an_i2v_job_with_a_stored_panel_completes_on_the_shared_cluster(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = cluster.client(PROJECT)  # creates the project
    spec = RequestSpec(prompt="the hero leaps out of the fireball", resolution="96x64", duration=0.5, steps=4)
    request = JobRequest.of(spec, model_spec("i2v"), keyframes=Keyframes(first=KeyframeSource(kind="image")))
    request = request.model_copy(update={"model": I2V_MODEL})
    job_id = new_job_id()  # the keyframes go in first, under the id the job will have
    storage = StorageSettings.model_validate(cluster.config["applications"][0]["args"]["storage"])
    panel = np.zeros((64, 96, 3), np.uint8)
    panel[16:48, 24:72] = (220, 120, 30)  # a drawn block: the hero in the fireball
    save_keyframes(make_store(storage), PROJECT, job_id, Image.fromarray(panel), None)
    store = cluster.store()
    try:
        with monkeypatch.context() as patch:  # the admission path's "id drawn first", for this create only
            patch.setattr(rows, "new_job_id", lambda: job_id)
            job, _ = store.create(PROJECT, "interactive", request)
        t2v, _ = store.create(
            PROJECT, "interactive", JobRequest.of(spec.model_copy(update={"seed": 5}), model_spec("t2v"))
        )
    finally:
        store.close()
    assert job.id == job_id and t2v.id != job_id
    done = cluster.wait_for([job.id, t2v.id])
    assert done[job.id]["status"] == "completed", done[job.id]
    assert done[t2v.id]["status"] == "completed", done[t2v.id]
    store = cluster.store()
    try:
        finished = store.get(job.id)
        statuses = [event.data["status"] for event in store.events(job.id) if event.kind == "stage"]
        t2v_timings = store.get(t2v.id).timings
    finally:
        store.close()
    assert finished.status == JobStatus.SUCCEEDED and finished.request.model == I2V_MODEL
    assert "encode_image" in finished.timings and "encode_image" not in t2v_timings
    assert statuses[:2] == ["ENCODING_IMAGE", "DENOISING_HIGH"]
    assert client.get(job.id)["model"] == I2V_MODEL
