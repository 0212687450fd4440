"""Keyframes end to end on the test suite's shared cluster (deploy/local.yaml serves tiny and tiny-i2v):
the official `openai` package uploads a panel file and the clip completes on the I2V model; a 3-shot
chained board completes in order, each chained shot's stored condition being its predecessor take's last
decoded frame (the real VAEDecoder stored it), byte for byte."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from serve.jobs.keyframes import fit_to_size, load_keyframes, load_last_frame
from serve.jobs.request import I2V_MODEL
from serve.storage import StorageSettings, make_store
from tests.support.cluster import Cluster

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.timeout(1500),  # the session cluster starts first
    pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning"),
]
TINY = {"size": "96x64", "seconds": "0.5", "steps": 4}


def artifacts_of(cluster: Cluster):  # noqa: ANN201
    return make_store(StorageSettings.model_validate(cluster.config["applications"][0]["args"]["storage"]))


def test_the_openai_package_uploads_a_panel_and_the_clip_completes_on_the_i2v_model(
    cluster: Cluster, tmp_path: Path
) -> None:
    project = "panel-sdk"
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=cluster.key_for(project), max_retries=0)
    panel = Image.new("RGB", (200, 120), (20, 40, 70))
    panel.paste((230, 140, 40), (70, 30, 130, 90))
    path = tmp_path / "panel.png"
    panel.save(path)
    with warnings.catch_warnings(), path.open("rb") as file:
        warnings.simplefilter("ignore", DeprecationWarning)
        video = client.videos.create_and_poll(
            prompt="the hero leaps out of the fireball, slow motion",
            input_reference=file,
            size="96x64",  # type: ignore[arg-type]  # OpenAI lists its own sizes; Previz takes any WxH
            seconds="0.5",  # type: ignore[arg-type]
            poll_interval_ms=300,
            extra_body={"steps": 4},
        )
    assert (video.status, video.model) == ("completed", I2V_MODEL), video
    first, _last = load_keyframes(artifacts_of(cluster), project, video.id)
    np.testing.assert_array_equal(first, np.asarray(fit_to_size(panel, 96, 64)))


def test_a_three_shot_chained_board_completes_in_order_from_each_last_frame(cluster: Cluster) -> None:
    project = "chain-live"
    client = cluster.client(project)
    shots = [
        {"name": "1A", "prompt": "the hero runs toward the fireball", **TINY},
        {"name": "1B", "prompt": "the hero leaps", **TINY, "continue": "previous"},
        {"name": "1C", "prompt": "the hero lands", **TINY, "continue": "previous"},
    ]
    board = client.create_storyboard({"shots": shots})
    ids = [shot["videos"][0]["video_id"] for shot in board["shots"]]
    done = cluster.wait_for(ids, timeout_s=1200)
    assert all(done[video_id]["status"] == "completed" for video_id in ids), done
    store = cluster.store()
    try:
        jobs = [store.get(video_id) for video_id in ids]
    finally:
        store.close()
    artifacts = artifacts_of(cluster)
    for before, chained in zip(jobs, jobs[1:], strict=False):
        assert chained.started_at >= before.finished_at
        assert chained.request.keyframes.first.video == before.id
        condition, _ = load_keyframes(artifacts, project, chained.id)
        last = load_last_frame(artifacts, project, before.id)
        assert condition is not None and last is not None and condition.tobytes() == last.tobytes()
