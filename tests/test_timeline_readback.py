"""An edited timeline read back: OTIO, EDL and FCP XML exported from a board's cut, edited as an editor
would (a clip moved, one trimmed by 8 frames, one dropped, a take swapped), PUT back; the board, the next
cut and its timeline agree. Foreign and unknown timelines change nothing. AAF and 24/25 fps export."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import opentimelineio as otio
import pytest

from pipeline.interpolate import conform_frame_count
from serve.editorial.timeline import take_id
from tests.support.api_app import TINY, LocalApi, local_api
from tests.test_editorial_api import cut_of, finish_with_clip

READERS = {"otio": "otio_json", "edl": "cmx_3600", "fcpxml": "fcp_xml"}
PER_SHOT = conform_frame_count(9, 16, 24)  # each take: 0.5 s, 9 frames at 16 fps -> 14 at 24
BOARD = {
    "title": "act 2",
    "shots": [{"name": name, "prompt": f"shot {name}", **TINY} for name in ("3A", "3B", "3C", "3D")],
    "variants": {"seeds": [1, 2]},
}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[LocalApi]:
    with local_api(tmp_path) as running:
        yield running


def make_board(api: LocalApi, body: dict = BOARD) -> dict:
    """A board of 4 shots x 2 takes, every take finished with a real 16 fps clip of 9 frames."""
    created = api.client.post("/v1/storyboards", json=body).json()
    for shot in created["shots"]:
        for video in shot["videos"]:
            finish_with_clip(api, video["video_id"], 30 + 20 * shot["index"] + 5 * video["variant"])
    return api.client.get(f"/v1/storyboards/{created['id']}").json()


@pytest.fixture
def board(api: LocalApi) -> dict:
    return make_board(api)


def take(board: dict, shot: int, variant: int) -> str:
    return next(v["video_id"] for v in board["shots"][shot]["videos"] if v["variant"] == variant)


def export(api: LocalApi, board: dict, fmt: str, **params: object) -> otio.schema.Timeline:
    answer = api.client.get(f"/v1/storyboards/{board['id']}/timeline", params={"format": fmt, **params})
    assert answer.status_code == 200, answer.text
    options = {"rate": params.get("rate", 24)} if fmt == "edl" else {}
    return otio.adapters.read_from_string(answer.text, adapter_name=READERS[fmt], **options)


def swap_take(clip: otio.schema.Clip, video_id: str) -> None:
    """What swapping a clip for another take leaves in each format: its take id (metadata, the EDL
    locator, the FCP XML clip comment) names the other take."""
    if "previz" in clip.metadata:
        clip.metadata["previz"]["take_id"] = video_id
    for marker in clip.markers:
        if marker.name.upper().startswith("PREVIZ TAKE"):
            marker.name = f"PREVIZ TAKE {video_id}"
    comments = clip.metadata.get("fcp_xml", {}).get("comments", {})
    for key in list(comments.keys()):
        if str(comments[key]).upper().startswith("PREVIZ TAKE"):
            comments[key] = f"PREVIZ TAKE {video_id}"


def edit(timeline: otio.schema.Timeline, board: dict) -> otio.schema.Timeline:
    """Shots A B C D become C A' B'': C moved first, A trimmed by 8 frames (4 off each end), B swapped
    for its second take, D dropped."""
    track = timeline.video_tracks()[0]
    a, b, c, _d = list(track.find_clips())
    span = a.source_range
    a.source_range = otio.opentime.TimeRange(
        span.start_time + otio.opentime.RationalTime(4, 24), span.duration - otio.opentime.RationalTime(8, 24)
    )
    swap_take(b, take(board, 1, 1))
    kept = [c, a, b]
    while len(track):
        del track[0]
    for clip in kept:
        track.append(clip)
    return timeline


def write(timeline: otio.schema.Timeline, fmt: str) -> str:
    return otio.adapters.write_to_string(timeline, adapter_name=READERS[fmt])


CONTENT = {"otio": "application/json", "edl": "text/plain", "fcpxml": "application/xml"}


def put(api: LocalApi, board: dict, fmt: str, text: str, client=None, **params: object):  # noqa: ANN001, ANN201
    return (client or api.client).put(
        f"/v1/storyboards/{board['id']}/timeline",
        params={"format": fmt, **params},
        content=text.encode(),
        headers={"Content-Type": CONTENT[fmt]},
    )


@pytest.mark.parametrize("fmt", ["otio", "edl", "fcpxml"])
def test_an_edited_timeline_read_back_sets_order_takes_and_trims_and_the_next_cut_agrees(
    api: LocalApi, board: dict, fmt: str
) -> None:
    url = f"/v1/storyboards/{board['id']}"
    cut_of(api, board["id"], {"fps": 24})
    edited = edit(export(api, board, fmt), board)
    answer = put(api, board, fmt, write(edited, fmt))
    assert answer.status_code == 200, answer.text
    applied = answer.json()
    assert (applied["order"], applied["dropped"], applied["rate"]) == ([2, 0, 1], [3], 24)
    assert applied["trims"] == {"0": {"fps": 24, "start": 4, "num_frames": PER_SHOT - 8}}
    assert applied["num_frames"] == 3 * PER_SHOT - 8

    shown = api.client.get(url).json()
    assert shown["order"] == [2, 0, 1]
    assert [shot["selected_video_id"] for shot in shown["shots"][:3]] == [
        take(board, 0, 0),
        take(board, 1, 1),
        take(board, 2, 0),
    ]
    cut = cut_of(api, board["id"], {"fps": 24})
    used = [take(board, 2, 0), take(board, 0, 0), take(board, 1, 1)]
    assert [clip["video_id"] for clip in cut["clips"]] == used
    assert [clip["num_frames"] for clip in cut["clips"]] == [PER_SHOT, PER_SHOT - 8, PER_SHOT]
    assert cut["num_frames"] == applied["num_frames"]
    assert cut["clips"][1]["content_start"] == 4

    again = export(api, board, "otio")
    clips = list(again.find_clips())
    assert [take_id(clip) for clip in clips] == used
    assert sum(clip.duration().value for clip in clips) == cut["num_frames"]
    # the trimmed cut read back as it is keeps its trim (counted from the take's first frame)
    unchanged = put(api, board, "otio", write(again, "otio")).json()
    assert unchanged["trims"] == applied["trims"] and unchanged["order"] == [2, 0, 1]
