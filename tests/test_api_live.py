"""The HTTP API end to end on the live cluster: the official `openai` package, storyboards, live events."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import openai
import pytest

from pipeline.video import read_video_info
from tests.support.cluster import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")]

TINY = {"steps": 4}  # with size 96x64 and seconds "0.5": 9 frames, latent 3x8x12


def openai_client(cluster: Cluster, project: str) -> openai.OpenAI:
    """The official package with a member key of `project`."""
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=cluster.key_for(project), max_retries=0)


def test_openai_package_creates_polls_downloads_remixes_and_deletes(cluster: Cluster, tmp_path: Path) -> None:
    client = openai_client(cluster, "openai-flow")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        video = client.videos.create_and_poll(
            prompt="a lighthouse keeper climbs the stairs in a storm",
            model="wan2.2-t2v-a14b",
            size="96x64",
            seconds="0.5",  # type: ignore[arg-type]  # OpenAI lists 4/8/12; Previz takes any length
            poll_interval_ms=200,
            extra_body={"project": "openai-flow", "seed": 11, "labels": {"scene": "3", "take": "1"}, **TINY},
        )
        assert (video.status, video.progress, video.size, video.seconds) == ("completed", 100, "96x64", "0.5")
        assert video.object == "video" and video.model == "wan2.2-t2v-a14b" and video.completed_at

        clip = tmp_path / "clip.mp4"
        client.videos.download_content(video.id).write_to_file(clip)
        info = read_video_info(clip)
        assert (info.num_frames, info.width, info.height) == (9, 96, 64)
        poster = client.videos.download_content(video.id, variant="thumbnail").content
        assert poster[:3] == b"\xff\xd8\xff"  # JPEG

        remix = client.videos.remix(video.id, prompt="what if he wore a blue coat")
        assert remix.remixed_from_video_id == video.id and remix.status in ("queued", "in_progress")
        extra = remix.model_extra or {}
        assert (extra["seed"], extra["project"], remix.size) == (11, "openai-flow", "96x64")
        deleted = client.videos.delete(remix.id)
        assert (deleted.id, deleted.deleted, deleted.object) == (remix.id, True, "video.deleted")
        assert client.videos.retrieve(remix.id).status == "cancelled"

        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve("vid_000000000000000000000000")
        listed = [item.id for item in client.videos.list(limit=1, extra_query={"project": "openai-flow"})]
    assert listed == [remix.id, video.id]  # the package pages through with the `after` cursor
    deleted = client.videos.delete(video.id)  # a finished video is deleted, as OpenAI's API does
    assert (deleted.deleted, deleted.object) == (True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_six_shot_storyboard_with_two_seeds_each_completes_with_links(
    cluster: Cluster, tmp_path: Path
) -> None:
    shots = [
        {"name": f"{index + 1}A", "shot": {"character": "a fremen scout", "action": action}}
        for index, action in enumerate(["runs", "kneels", "looks up", "signals", "hides", "leaps"])
    ]
    board = {
        "project": "dune-board",
        "title": "act one",
        "shots": [{**shot, "size": "96x64", "seconds": 0.25, "steps": 3} for shot in shots],
        "variants": {"seeds": 2},
        "labels": {"scene": "7"},
    }
    http = cluster.client("dune-board").http
    created = http.post("/v1/storyboards", json=board, headers={"Idempotency-Key": "board-act-one"})
    assert created.status_code == 201, created.text
    board_id = created.json()["id"]
    replay = http.post("/v1/storyboards", json=board, headers={"Idempotency-Key": "board-act-one"})
    assert (replay.status_code, replay.json()["id"]) == (200, board_id)

    deadline = time.monotonic() + 300
    while (state := http.get(f"/v1/storyboards/{board_id}").json())["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, state["counts"]
        time.sleep(0.5)
    assert (
        state["status"] == "completed" and state["num_videos"] == 12 and state["counts"] == {"completed": 12}
    )
    assert [shot["name"] for shot in state["shots"]] == ["1A", "2A", "3A", "4A", "5A", "6A"]
    for shot in state["shots"]:
        assert len(shot["videos"]) == 2 and shot["prompt"].startswith("a fremen scout")
        first, second = shot["videos"]
        assert second["seed"] == first["seed"] + 1
        for video in shot["videos"]:
            assert video["content_url"] == f"/v1/videos/{video['video_id']}/content"
    one = state["shots"][0]["videos"][0]
    clip = http.get(one["content_url"], follow_redirects=True)
    (tmp_path / "shot.mp4").write_bytes(clip.raise_for_status().content)
    assert read_video_info(tmp_path / "shot.mp4").num_frames == 5
    listed = http.get("/v1/videos", params={"storyboard_id": board_id, "limit": 100}).json()["data"]
    assert len(listed) == 12 and all(video["labels"] == {"scene": "7"} for video in listed)


def test_events_stream_stage_and_step_progress_until_done(cluster: Cluster) -> None:
    http = cluster.client("events").http
    body = {"prompt": "a train crosses a bridge", "project": "events", "size": "96x64", "seconds": 0.5}
    video = http.post("/v1/videos", json={**body, "steps": 8}).json()
    kinds, statuses, stage_events = [], [], []
    with http.stream("GET", f"/v1/videos/{video['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
                kinds.append(kind)
            elif line.startswith("data: ") and kind == "status":
                statuses.append(json.loads(line.removeprefix("data: ")))
            elif line.startswith("data: ") and kind == "stage":
                stage_events.append(json.loads(line.removeprefix("data: "))["stage"])
            elif line.startswith("data: ") and kind == "done":
                done = json.loads(line.removeprefix("data: "))
    assert kinds[0] == "created" and kinds[-1] == "done" and "succeeded" in kinds
    assert done["status"] == "completed" and done["id"] == video["id"]
    assert stage_events == ["denoising_high", "denoising_low", "decoding", "upscaling", "finishing"]
    assert statuses[-1]["stage"] == "succeeded"
    progress = [status["progress"] for status in statuses]
    assert progress == sorted(progress) and progress[-1] == 100
