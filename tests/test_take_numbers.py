"""Take numbers (issue 28): each video of a board's shot is a take numbered 1, 2, ... in creation order and
stored; a remix or a promoted final is a new take; the same number is on the board, in the CLI's file
names, on the cut's slates and clips and in every timeline, which also carry the take's stable id."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import opentimelineio as otio
import pytest
from sqlalchemy import update

from serve.editorial.timeline import take_ids
from serve.jobs.schema import jobs
from tests.support.api_app import TINY, LocalApi, http_server, local_api
from tests.support.cli_run import previz
from tests.test_editorial_api import cut_of, finish_with_clip

BOARD = {
    "title": "rooftops",
    "shots": [
        {"name": "1A", "prompt": "a courier jumps", **TINY, "quality": "draft"},
        {"name": "1B", "prompt": "she lands", **TINY, "quality": "draft"},
    ],
    "variants": {"seeds": [5, 6]},
}


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalApi]:
    """The app behind a loopback server and the CLI pointed at it, working in `tmp_path/work`."""
    with local_api(tmp_path) as api, http_server() as url:
        monkeypatch.setenv("PREVIZ_SERVER", url)
        monkeypatch.setenv("PREVIZ_API_KEY", api.admin_key)
        (tmp_path / "work").mkdir()
        monkeypatch.chdir(tmp_path / "work")
        yield api


def shot_takes(api: LocalApi, board_id: str, shot: int) -> list[dict]:
    return api.client.get(f"/v1/storyboards/{board_id}").json()["shots"][shot]["videos"]


def test_takes_are_numbered_per_shot_in_creation_order_and_a_remix_or_a_promote_is_a_new_take(
    api: LocalApi,
) -> None:
    board = api.client.post("/v1/storyboards", json=BOARD).json()
    assert [[video["take"] for video in shot["videos"]] for shot in board["shots"]] == [[1, 2], [1, 2]]
    first, second = (video["video_id"] for video in board["shots"][0]["videos"])
    remix = api.client.post(f"/v1/videos/{first}/remix", json={"prompt": "a courier leaps"}).json()
    assert remix["take"] == 3 and api.store.get(remix["id"]).take == 3
    final = api.client.post(f"/v1/videos/{second}/promote", json={}).json()
    assert final["take"] == 4 and final["promoted_from"] == second
    takes = {video["video_id"]: video for video in shot_takes(api, board["id"], 0)}
    assert (takes[final["id"]]["take"], takes[final["id"]]["promoted_from_take"]) == (4, 2)
    assert takes[second]["promoted_to"] == final["id"] and takes[second]["promoted_from_take"] is None
    # the other shot counts its own takes; a board promote numbers each final in its own shot
    other = shot_takes(api, board["id"], 1)[0]["video_id"]
    (promoted,) = api.client.post(
        f"/v1/storyboards/{board['id']}/promote", json={"video_ids": [other]}
    ).json()["data"]
    assert promoted["take"] == 3
    loose = api.client.post("/v1/videos", json={"prompt": "a door", **TINY}).json()
    assert loose["take"] is None  # a video of no board is no shot's take


def test_a_deleted_take_keeps_its_number_so_the_next_take_never_reuses_it(api: LocalApi) -> None:
    board = api.client.post("/v1/storyboards", json=BOARD).json()
    first, second = (video["video_id"] for video in board["shots"][0]["videos"])
    api.client.post(f"/v1/videos/{second}/cancel")
    assert api.client.delete(f"/v1/videos/{second}").status_code == 200
    remix = api.client.post(f"/v1/videos/{first}/remix", json={"prompt": "a courier leaps"}).json()
    assert remix["take"] == 3


def test_the_page_the_cli_file_names_the_slates_and_every_timeline_say_the_same_take(
    api: LocalApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "work" / "board.json").write_text(json.dumps(BOARD))
    board = api.client.post("/v1/storyboards", json=BOARD, headers={"Idempotency-Key": "takes-1"}).json()
    for shot in board["shots"]:
        for video in shot["videos"]:
            finish_with_clip(api, video["video_id"], 40 + 10 * video["variant"])
    draft = board["shots"][0]["videos"][1]["video_id"]  # 1A take 2
    final = api.client.post(f"/v1/videos/{draft}/promote", json={}).json()
    finish_with_clip(api, final["id"], 90)
    url = f"/v1/storyboards/{board['id']}"
    api.client.patch(url, json={"takes": {"0": final["id"]}})

    cut = cut_of(api, board["id"], {"fps": 24, "slates": True, "slate_seconds": 0.5})
    assert [(clip["name"], clip["take"]) for clip in cut["clips"]] == [("1A", 3), ("1B", 1)]
    assert api.store.get_storyboard(board["id"]).cut.clips[0].take == 3  # what the slate says
    used = [clip["video_id"] for clip in cut["clips"]]
    for fmt, adapter, options in (
        ("otio", "otio_json", {}),
        ("edl", "cmx_3600", {"rate": 24}),
        ("fcpxml", "fcp_xml", {}),
    ):
        text = api.client.get(f"{url}/timeline", params={"format": fmt}).text
        timeline = otio.adapters.read_from_string(text, adapter_name=adapter, **options)
        assert [clip.name for clip in timeline.find_clips()] == ["1A take 3", "1B take 1"], fmt
        assert take_ids(timeline) == used, fmt

    # the CLI: a replay of the board's create follows it and downloads every take, named by its number
    args = ["submit", "--storyboard", "board.json", "--idempotency-key", "takes-1", "-o", "clips"]
    code, _out, err = previz(args, monkeypatch, capsys)
    assert code == 0, err
    assert sorted(path.name for path in (tmp_path / "work" / "clips").iterdir()) == [
        "01-1A-take1.mp4", "01-1A-take2.mp4", "01-1A-take3.mp4", "02-1B-take1.mp4", "02-1B-take2.mp4",
    ]  # fmt: skip
    code, _out, err = previz(["fetch", "--storyboard", board["id"], "-o", "cut"], monkeypatch, capsys)
    assert code == 0, err
    assert sorted(path.name for path in (tmp_path / "work" / "cut" / "clips").iterdir()) == [
        "001_1A_take3.mp4", "002_1B_take1.mp4",
    ]  # fmt: skip
    code, out, err = previz(["status", board["id"]], monkeypatch, capsys)
    assert code == 0 and "take" in out, err


def test_a_store_without_take_numbers_numbers_its_takes_per_shot_in_creation_order(api: LocalApi) -> None:
    board = api.client.post("/v1/storyboards", json=BOARD).json()
    first = board["shots"][0]["videos"][0]["video_id"]
    remix = api.client.post(f"/v1/videos/{first}/remix", json={"prompt": "a courier leaps"}).json()
    with api.store.db.write() as conn:  # as a store of the version before the column left them
        conn.execute(update(jobs).values(take=None))
    assert api.store.get(remix["id"]).take is None
    api.store.create_schema()
    videos = api.store.list(storyboard_id=board["id"], order="asc")
    numbers = [(job.request.storyboard.shot, job.take) for job in videos]
    assert numbers == [(0, 1), (0, 2), (1, 1), (1, 2), (0, 3)]
