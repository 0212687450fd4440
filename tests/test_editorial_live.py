"""Editorial delivery through the real cluster: a LUT look and a 24 fps conform pass the Scheduler and the
Finisher replicas, and the storyboard's cut and timeline come from the clips they stored."""

from __future__ import annotations

import zipfile
from pathlib import Path

import httpx
import opentimelineio as otio
import pytest

from pipeline.video import read_video_info
from tests.support.cluster import Cluster
from tests.test_editorial_api import warm_cube

pytestmark = pytest.mark.cluster
TINY = {"size": "96x64", "seconds": "0.5", "steps": 4}


def test_a_24_fps_lut_graded_board_is_cut_and_exported(cluster: Cluster, tmp_path: Path) -> None:
    admin = httpx.Client(
        base_url=cluster.url, headers={"Authorization": f"Bearer {cluster.key_for('cut-live', 'admin')}"}
    )
    assert admin.put("/v1/admin/projects/cut-live/luts/warm", json={"cube": warm_cube()}).status_code == 201
    client = cluster.client("cut-live")
    board = client.create_storyboard(
        {
            "fps": 24,
            "shots": [
                {"name": "1A", "prompt": "a door opens", "look": "warm", **TINY},
                {"name": "1B", "prompt": "a hall", **TINY},
            ],
            "variants": {"seeds": [1, 2]},
        }
    )
    videos = [video["video_id"] for shot in board["shots"] for video in shot["videos"]]
    finished = cluster.wait_for(videos)
    assert all(job["status"] == "completed" and job["fps"] == 24 for job in finished.values()), finished
    info = read_video_info(client.download(videos[0], tmp_path / "take.mp4"))
    assert (info.num_frames, info.fps) == (14, 24.0)  # 9 frames at 16 fps, conformed
    client.update_storyboard(board["id"], takes={1: videos[3]})
    queued = client.create_cut(board["id"])  # 202: a job of the Scheduler, rendered by a Finisher replica
    cut = client.wait_for_cut(board["id"], timeout_s=600)
    assert (cut["id"], cut["status"]) == (queued["id"], "completed"), cut
    assert (cut["fps"], cut["num_frames"]) == (24, 28)
    assert [clip["video_id"] for clip in cut["clips"]] == [videos[0], videos[3]]
    archive = client.download_package(board["id"], tmp_path / "package.zip", format="edl")
    with zipfile.ZipFile(archive) as package:
        edl = package.read(f"{board['id']}/timeline.edl").decode()
        (tmp_path / "cut.mp4").write_bytes(package.read(f"{board['id']}/cut.mp4"))
    clips = list(otio.adapters.read_from_string(edl, adapter_name="cmx_3600", rate=24).find_clips())
    assert [clip.name for clip in clips] == ["1A take 1", "1B take 2"]
    assert (
        read_video_info(tmp_path / "cut.mp4").num_frames == sum(clip.duration().value for clip in clips) == 28
    )
