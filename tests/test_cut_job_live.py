"""A 6-shot cut as a job on the session cluster: the Scheduler has the Finisher render it, its progress
streams on the board's cut events, killing the Finisher replica mid-cut still ends with one cut (its rerun
overwrites the lost run's files), a cancel stops the next one, and the Ingress answers other requests
while a cut renders (timed and printed; only "it answered" is asserted)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import ray

from pipeline.video import read_video_info
from tests.support.cluster import ARTIFACT_BUCKET, Cluster, replica_actor_names, wait_for_replicas

pytestmark = pytest.mark.cluster
TINY = {"size": "96x64", "seconds": "0.5", "steps": 4}
# 480p with 1 s slates: a second or more a shot on this box, long enough to kill or cancel mid-cut
CUT = {"fps": 24, "size": "480p", "slates": True, "slate_seconds": 1}
WAIT_S = 600  # bound of every wait (a loaded 2-core box); no timing is asserted


def wait_until(condition, what: str, poll_s: float = 0.05):
    deadline = time.monotonic() + WAIT_S
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(poll_s)
    return value


def cut_files(s3_server, project: str, board_id: str) -> list[str]:
    listed = s3_server.client().list_objects_v2(Bucket=ARTIFACT_BUCKET, Prefix=f"clips/{project}/{board_id}/")
    return sorted(item["Key"].rsplit("/", 1)[1] for item in listed.get("Contents", []))


def stream_events(url: str, key: str, board_id: str, events: list[tuple[str, dict]]) -> None:
    """Collect the board's cut events (`event:`, data) until `done`."""
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream(
        "GET", f"{url}/v1/storyboards/{board_id}/cut/events", headers=headers, timeout=WAIT_S
    ) as r:
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: ") and kind is not None:
                events.append((kind, json.loads(line.removeprefix("data: "))))
                if kind == "done":
                    return


def test_a_six_shot_cut_is_a_job_that_survives_its_finisher_and_can_be_cancelled(
    cluster: Cluster, s3_server, tmp_path
) -> None:
    project = "cut-job-live"
    client = cluster.client(project)
    board = client.create_storyboard(
        {
            "shots": [
                {"name": f"{index + 1}A", "prompt": f"shot {index}", "seed": index, **TINY}
                for index in range(6)
            ]
        }
    )
    videos = [shot["videos"][0]["video_id"] for shot in board["shots"]]
    finished = cluster.wait_for(videos)
    assert all(job["status"] == "completed" for job in finished.values()), finished

    # 1. The cut is queued (202) and its progress streams while the Finisher renders it.
    started = time.perf_counter()
    client.get_storyboard(board["id"])
    idle_s = time.perf_counter() - started  # the same request with no cut rendering, for the ratio
    events: list[tuple[str, dict]] = []
    queued = client.create_cut(board["id"], **CUT)
    assert (queued["status"], queued["num_clips"]) in {("queued", 6), ("in_progress", 6)}
    listener = threading.Thread(
        target=stream_events, args=(cluster.url, cluster.keys[project], board["id"], events), daemon=True
    )
    listener.start()
    wait_until(lambda: 0 < client.get_cut(board["id"])["progress"] < 100, "the cut never showed progress")
    started = time.perf_counter()
    answered = client.get_storyboard(board["id"])  # another request, while the cut renders
    busy_s = time.perf_counter() - started
    print(
        f"\nGET /v1/storyboards/{{id}}: {idle_s:.3f} s with no cut, {busy_s:.3f} s during the cut "
        f"({busy_s / idle_s:.2f}x)"
    )
    assert answered["id"] == board["id"]

    # 2. Kill the Finisher replica mid-cut: the cut goes back to the queue and a new replica renders it.
    (finisher,) = replica_actor_names("Finisher")
    ray.kill(ray.get_actor(finisher, namespace="serve"), no_restart=True)
    killed_at = time.monotonic()
    cut = client.wait_for_cut(board["id"], timeout_s=WAIT_S)
    assert cut["status"] == "completed", cut
    seconds_per_shot = (time.monotonic() - killed_at) / 6  # the rerun (replica start-up included)
    print(f"the rerun after the kill took {time.monotonic() - killed_at:.1f} s for 6 shots")
    listener.join(WAIT_S)
    wait_for_replicas("Finisher", 1)
    store = cluster.store()
    try:
        assert store.get_cut(cut["id"]).attempt == 2  # the lost run, then the one that finished
    finally:
        store.close()
    progress = [data["progress"] for kind, data in events if kind == "status"]
    assert any(0 < value < 100 for value in progress) and events[-1][0] == "done", events
    assert events[-1][1]["status"] == "completed" and events[-1][1]["id"] == cut["id"]
    assert [clip["video_id"] for clip in cut["clips"]] == videos
    names = cut_files(s3_server, project, board["id"])
    assert [name for name in names if "-shot" not in name] == [f"{cut['id']}-a2.mp4"]  # one cut file
    assert len(names) == 7  # and its 6 clips: none of the lost attempt's
    path = tmp_path / "cut.mp4"
    path.write_bytes(httpx.get(cut["content_url"], timeout=60).content)
    info = read_video_info(path)
    assert (info.num_frames, info.height, info.fps) == (cut["num_frames"], 480, 24.0)
    assert cut["num_frames"] == 6 * (24 + 14)  # a 1 s slate and 9 frames at 16 fps conformed to 24

    # 3. A cancel stops the next cut: nothing of it stays, the board keeps the cut it had.
    again = client.create_cut(board["id"], **CUT)
    wait_until(lambda: 0 < client.get_cut(board["id"])["progress"] < 100, "the second cut never progressed")
    cancelled = client.cancel_cut(board["id"])
    assert (cancelled["id"], cancelled["status"]) == (again["id"], "cancelled")
    wait_until(
        lambda: not any(name.startswith(again["id"]) for name in cut_files(s3_server, project, board["id"])),
        "the cancelled cut's files stayed",
    )
    time.sleep(2 * seconds_per_shot)  # a render that was not stopped would store its next shot by now
    assert client.get_cut(board["id"])["status"] == "cancelled"
    assert cut_files(s3_server, project, board["id"]) == names
    kept = httpx.get(
        f"{cluster.url}/v1/storyboards/{board['id']}/cut/content",
        headers={"Authorization": f"Bearer {cluster.keys[project]}"},
        follow_redirects=False,
    )
    assert kept.status_code == 307  # the first cut is still the board's
