"""One finisher: the cluster and the one-process pipeline (`previz generate`'s) make the same frames for the
same tiny shot with a LUT look at 24 fps, and a clip the frame check blocks stops both.

Needs the session's Ray cluster: run it under the machine-wide lock (flock /tmp/previz-ray.lock ...)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.determinism import use_deterministic_kernels
from pipeline.finish import lut_from_cube
from pipeline.local import FinishOptions, LocalPipeline
from pipeline.safety import ContentBlocked, FrameCheck
from pipeline.video import read_frames, read_video_info
from pipeline.weights import build_preset
from serve.cli.client import PrevizClient
from tests.support.cluster import Cluster
from tests.support.safety_hooks import BLOCKED_WIDTH, block_test_width
from tests.test_editorial_api import warm_cube

pytestmark = pytest.mark.cluster
PROJECT = "finish-live"
TINY = {"seconds": "0.5", "steps": 4, "upscale": "none", "project": PROJECT}  # 9 frames at 16 fps


@pytest.fixture(scope="module")
def local() -> LocalPipeline:
    """The tiny preset in this process, finished as the session cluster finishes (its frame check)."""
    use_deterministic_kernels()  # as `previz generate` and every stage replica do
    return LocalPipeline(build_preset("tiny"), frame_check=FrameCheck(block_test_width))


def test_the_cluster_and_the_local_pipeline_give_the_same_frames_with_a_lut_look_at_24_fps(
    cluster: Cluster, local: LocalPipeline, tmp_path: Path
) -> None:
    admin = PrevizClient(cluster.url, api_key=cluster.key_for(PROJECT, "admin"), timeout_s=60)
    admin.put_lut(PROJECT, "warm", warm_cube())
    client = cluster.client(PROJECT)
    job = client.create(
        {"prompt": "a lighthouse in fog", "size": "96x64", "seed": 11, "look": "warm", "fps": 24, **TINY}
    )
    finished = cluster.wait_for([job["id"]])[job["id"]]
    assert finished["status"] == "completed", finished
    served = client.download(job["id"], tmp_path / "served.mp4")
    request = cluster.store().get(job["id"]).request  # the very spec the cluster ran, seed fixed

    made = local.generate(
        request.spec,
        tmp_path / "local.mp4",
        finish=FinishOptions(look="warm", lut=lut_from_cube(warm_cube()), fps=24),
    )

    served_frames, local_frames = read_frames(served), read_frames(made.path)
    assert (read_video_info(served).num_frames, read_video_info(served).fps) == (14, 24.0)
    assert served_frames.pixels.shape == local_frames.pixels.shape == (14, 64, 96, 3)
    different = np.abs(served_frames.pixels.astype(np.int16) - local_frames.pixels.astype(np.int16))
    assert different.max() == 0, f"up to {different.max()}/255 apart, mean {different.mean():.3f}"


def test_a_clip_the_frame_check_blocks_stops_the_cluster_and_the_local_pipeline(
    cluster: Cluster, local: LocalPipeline, tmp_path: Path
) -> None:
    client = cluster.client(PROJECT)
    job = client.create({"prompt": "a lighthouse in fog", "size": f"{BLOCKED_WIDTH}x64", "seed": 11, **TINY})
    refused = cluster.wait_for([job["id"]])[job["id"]]
    assert refused["status"] == "failed" and refused["error"]["code"] == "content_blocked", refused
    request = cluster.store().get(job["id"]).request

    with pytest.raises(ContentBlocked) as blocked:
        local.generate(request.spec, tmp_path / "local.mp4")

    assert (blocked.value.category, blocked.value.stage) == ("violence_graphic", "frames")
    assert "category `violence_graphic`" in refused["error"]["message"]
    assert list(tmp_path.iterdir()) == []  # nothing written, as the cluster stores nothing
