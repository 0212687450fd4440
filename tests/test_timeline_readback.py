"""An edited timeline read back: OTIO, EDL and FCP XML exported from a board's cut, edited as an editor
would (a clip moved, one trimmed by 8 frames, one dropped, a take swapped), PUT back; the board, the next
cut and its timeline agree. Foreign and unknown timelines change nothing. AAF and 24/25 fps export."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import opentimelineio as otio
import pytest

from pipeline.interpolate import conform_frame_count
from serve.editorial.timeline import take_id
from tests.support.api_app import TINY, LocalApi, http_server, local_api
from tests.support.cli_run import previz
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
    if "UserComments" in clip.metadata.get("AAF", {}):
        clip.metadata["AAF"]["UserComments"]["Previz Take"] = video_id
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
    assert [shot["trim"] for shot in shown["shots"]] == [applied["trims"]["0"], None, None, None]
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
    cleared = api.client.patch(url, json={"trims": {"0": None}}).json()
    assert cleared["shots"][0]["trim"] is None and cleared["order"] == [2, 0, 1]


def stored_edit(api: LocalApi, board: dict) -> object:
    return api.store.get_storyboard(board["id"]).edit


def test_a_timeline_of_another_board_or_with_unknown_clips_is_refused_with_nothing_changed(
    api: LocalApi, board: dict
) -> None:
    cut_of(api, board["id"], {"fps": 24})
    other = make_board(api, {**BOARD, "title": "act 3"})
    cut_of(api, other["id"], {"fps": 24})
    before = stored_edit(api, board)

    foreign = put(api, board, "otio", write(export(api, other, "otio"), "otio"))
    assert (foreign.status_code, foreign.json()["error"]["code"]) == (409, "foreign_timeline")
    assert "nothing was changed" in foreign.json()["error"]["message"]
    assert [
        (clip["position"], clip["name"], clip["video_id"], clip["reason"])
        for clip in foreign.json()["error"]["clips"]
    ] == [(shot + 1, f"3{'ABCD'[shot]} take 1", take(other, shot, 0), "not_this_board") for shot in range(4)]

    timeline = edit(export(api, board, "edl"), board)
    stranger = otio.schema.Clip(
        name="B-roll",
        source_range=otio.opentime.TimeRange(
            otio.opentime.RationalTime(0, 24), otio.opentime.RationalTime(10, 24)
        ),
    )
    timeline.video_tracks()[0].append(stranger)
    unknown = put(api, board, "edl", write(timeline, "edl"))
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (422, "unmatched_clips")
    assert "clip 4 'B-roll': it carries no Previz take id" in unknown.json()["error"]["message"]
    assert unknown.json()["error"]["clips"] == [
        {
            "position": 4,
            "name": "B-roll",
            "video_id": None,
            "reason": "no_take_id",
            "message": "it carries no Previz take id",
        }
    ]

    mixed = export(api, board, "otio")
    swap_take(list(mixed.find_clips())[3], take(other, 3, 0))  # a take of another board among ours
    refused = put(api, board, "otio", write(mixed, "otio"))
    assert refused.json()["error"]["code"] == "unmatched_clips"
    assert f"(take {take(other, 3, 0)}): it is no take of this board" in refused.json()["error"]["message"]
    assert [(c["position"], c["video_id"], c["reason"]) for c in refused.json()["error"]["clips"]] == [
        (4, take(other, 3, 0), "not_this_board")
    ]

    twice = export(api, board, "otio")
    swap_take(list(twice.find_clips())[1], take(board, 0, 1))  # shot 0 twice
    duplicate = put(api, board, "otio", write(twice, "otio"))
    assert duplicate.json()["error"]["code"] == "unmatched_clips"
    assert "its shot is already used by clip 1" in duplicate.json()["error"]["message"]
    assert [(c["position"], c["reason"]) for c in duplicate.json()["error"]["clips"]] == [
        (2, "shot_used_twice")
    ]

    garbage = put(api, board, "fcpxml", "<xmeml><nothing/>")
    assert (garbage.status_code, garbage.json()["error"]["code"]) == (400, "invalid_timeline")
    assert "clips" not in garbage.json()["error"]  # only a refused timeline's answers list clips
    elsewhere = put(
        api, board, "otio", write(export(api, board, "otio"), "otio"), client=api.client_for("other")
    )
    assert elsewhere.status_code == 404
    assert stored_edit(api, board) == before
    assert api.client.get(f"/v1/storyboards/{board['id']}").json()["order"] == [0, 1, 2, 3]
    schema = api.client.get("/openapi.json").json()
    assert "422" in schema["paths"]["/v1/storyboards/{storyboard_id}/timeline"]["put"]["responses"]
    clip = schema["components"]["schemas"]["UnmatchedClip"]["properties"]
    assert clip["reason"]["enum"] == [
        "no_take_id",
        "not_this_board",
        "shot_used_twice",
        "empty",
        "slate_only",
        "no_clips",
    ]


def test_a_16_fps_board_exports_to_every_format_at_24_and_reads_back_there(api: LocalApi) -> None:
    board = make_board(api, {**BOARD, "fps": 16})
    cut = cut_of(api, board["id"], {})
    assert cut["fps"] == 16 and cut["num_frames"] == 4 * 9
    refused = api.client.get(f"/v1/storyboards/{board['id']}/timeline", params={"format": "fcpxml"})
    assert refused.json()["error"]["code"] == "timeline_rate_unsupported"
    for fmt in ("edl", "fcpxml"):
        clips = list(export(api, board, fmt, rate=24).find_clips())
        assert [clip.duration() for clip in clips] == [otio.opentime.RationalTime(PER_SHOT, 24)] * 4, fmt
    packaged = api.client.get(
        f"/v1/storyboards/{board['id']}/timeline", params={"format": "edl", "rate": 24, "package": "true"}
    )
    with zipfile.ZipFile(io.BytesIO(packaged.content)) as archive:
        text = archive.read(f"{board['id']}/timeline.edl").decode()
    in_package = otio.adapters.read_from_string(text, adapter_name="cmx_3600", rate=24).find_clips()
    assert [clip.duration().value for clip in in_package] == [PER_SHOT] * 4
    edited = edit(export(api, board, "edl", rate=24), board)
    applied = put(api, board, "edl", write(edited, "edl"), rate=24).json()
    assert applied["trims"] == {"0": {"fps": 24, "start": 4, "num_frames": PER_SHOT - 8}}
    again = cut_of(api, board["id"], {})  # at 16 fps the trim of 4 + 6 frames at 24 is 3 + 4
    assert [clip["num_frames"] for clip in again["clips"]] == [9, 4, 9]
    assert again["clips"][1]["content_start"] == 3


def test_review_statuses_and_notes_ride_in_otio_metadata_edl_comments_fcp_xml_and_aaf_mob_comments(
    api: LocalApi, board: dict, tmp_path: Path
) -> None:
    first = take(board, 0, 0)
    reviewer = api.client_with(api.store.create_key("default", "member", "kim")[1])
    reviewer.put(f"/v1/videos/{first}/review", json={"status": "needs-changes"})
    reviewer.post(f"/v1/videos/{first}/notes", json={"text": "door opens too early", "frame": 4})
    reviewer.post(f"/v1/videos/{first}/notes", json={"text": "warmer overall"})
    cut_of(api, board["id"], {"fps": 24})

    exported = export(api, board, "otio")  # held: its clips live as long as it does
    clip, second_clip = list(exported.find_clips())[:2]
    previz = clip.metadata["previz"]
    assert (previz["review"], previz["review_by"]) == ("needs-changes", "kim")
    assert [(note["author"], note["text"], note["frame"]) for note in previz["notes"]] == [
        ("kim", "door opens too early", 4),
        ("kim", "warmer overall", None),
    ]
    frame_6_at_24 = round(4 * 24 / 16)  # the note's frame 4 at the take's 16 fps, in the 24 fps clip
    assert [(m.name, m.marked_range.start_time.value) for m in clip.markers][1:] == [
        ("kim: door opens too early", frame_6_at_24)
    ]
    second = second_clip.metadata["previz"]
    assert (second["review"], len(second["notes"])) == ("pending", 0)

    edl = api.client.get(f"/v1/storyboards/{board['id']}/timeline", params={"format": "edl"}).text
    assert "* PREVIZ REVIEW NEEDS-CHANGES BY kim" in edl
    assert "* PREVIZ NOTE F4 kim: door opens too early" in edl
    assert "* PREVIZ NOTE kim: warmer overall" in edl
    assert "* PREVIZ REVIEW PENDING" in edl
    xml = api.client.get(f"/v1/storyboards/{board['id']}/timeline", params={"format": "fcpxml"}).text
    assert "PREVIZ REVIEW NEEDS-CHANGES BY kim" in xml and "kim: door opens too early" in xml
    aaf = tmp_path / "cut.aaf"
    aaf.write_bytes(
        api.client.get(f"/v1/storyboards/{board['id']}/timeline", params={"format": "aaf"}).content
    )
    read = list(otio.adapters.read_from_file(str(aaf), adapter_name="AAF").find_clips())
    assert [dict(clip.metadata["AAF"]["UserComments"]) for clip in read[:2]] == [
        {
            "Previz Take": first,
            "Previz Review": "needs-changes",
            "Previz Review By": "kim",
            "Previz Note 1": "F4 kim: door opens too early",
            "Previz Note 2": "kim: warmer overall",
        },
        {"Previz Take": take(board, 1, 0), "Previz Review": "pending"},
    ]
    # another project sees neither the board's timeline nor the take's notes
    other = api.client_for("other")
    assert other.get(f"/v1/storyboards/{board['id']}/timeline").status_code == 404


def test_the_aaf_of_a_3_shot_board_reads_back_through_the_adapter_with_the_same_clips(
    api: LocalApi, tmp_path: Path
) -> None:
    board = make_board(api, {**BOARD, "shots": BOARD["shots"][:3]})
    cut = cut_of(api, board["id"], {"fps": 25})
    answer = api.client.get(f"/v1/storyboards/{board['id']}/timeline", params={"format": "aaf"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/octet-stream"
    path = tmp_path / "cut.aaf"
    path.write_bytes(answer.content)
    timeline = otio.adapters.read_from_file(str(path), adapter_name="AAF")
    clips = list(timeline.find_clips())
    assert [clip.name for clip in clips] == [f"{clip['name']} take {clip['take']}" for clip in cut["clips"]]
    assert [clip.duration() for clip in clips] == [
        otio.opentime.RationalTime(clip["num_frames"], 25) for clip in cut["clips"]
    ]
    assert [take_id(clip) for clip in clips] == [clip["video_id"] for clip in cut["clips"]]
    sixteen = make_board(api, {**BOARD, "shots": BOARD["shots"][:3], "fps": 16})
    cut_of(api, sixteen["id"], {})
    conformed = api.client.get(
        f"/v1/storyboards/{sixteen['id']}/timeline", params={"format": "aaf", "rate": 24}
    )
    assert conformed.status_code == 200, conformed.text


def test_the_cli_reads_an_edited_edl_back_and_reviews_a_take(
    api: LocalApi,
    board: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cut_of(api, board["id"], {"fps": 24})
    path = tmp_path / "edited.edl"
    path.write_text(write(edit(export(api, board, "edl"), board), "edl"))
    with http_server() as url:
        monkeypatch.setenv("PREVIZ_SERVER", url)
        monkeypatch.setenv("PREVIZ_API_KEY", api.admin_key)
        code, out, err = previz(["timeline", board["id"], str(path)], monkeypatch, capsys)
        assert code == 0, err
        lines = out.splitlines()
        assert [line.split()[0] for line in lines[:3]] == ["2", "0", "1"]
        assert lines[1].endswith(f"frames 4+{PER_SHOT - 8} at 24 fps") and lines[3] == "dropped shots: 3"
        code, _out, err = previz(["timeline", board["id"], str(tmp_path / "cut.mov")], monkeypatch, capsys)
        assert code == 2 and ".otio, .edl, .xml (FCP 7) or .aaf" in err
        first = take(board, 0, 0)
        code, out, err = previz(
            ["review", first, "--status", "approved", "--note", "keep this one", "--frame", "3"],
            monkeypatch,
            capsys,
        )
        assert code == 0, err
        assert out.splitlines()[0].startswith(f"{first} approved by ") and "@3: keep this one" in out
        code, _out, err = previz(["review", first, "--status", "maybe"], monkeypatch, capsys)
        assert code == 2 and "needs-changes" in err
    assert api.client.get(f"/v1/storyboards/{board['id']}").json()["order"] == [2, 0, 1]


def test_an_edited_aaf_reads_back_like_the_other_formats(api: LocalApi, tmp_path: Path) -> None:
    board = make_board(api)
    cut_of(api, board["id"], {"fps": 24})
    exported = tmp_path / "cut.aaf"
    exported.write_bytes(
        api.client.get(f"/v1/storyboards/{board['id']}/timeline", params={"format": "aaf"}).content
    )
    timeline = edit(otio.adapters.read_from_file(str(exported), adapter_name="AAF"), board)
    edited = tmp_path / "edited.aaf"
    otio.adapters.write_to_file(timeline, str(edited), adapter_name="AAF")
    answer = api.client.put(
        f"/v1/storyboards/{board['id']}/timeline",
        params={"format": "aaf"},
        content=edited.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert answer.status_code == 200, answer.text
    applied = answer.json()
    assert (applied["order"], applied["dropped"]) == ([2, 0, 1], [3])
    assert applied["trims"] == {"0": {"fps": 24, "start": 4, "num_frames": PER_SHOT - 8}}
    assert applied["takes"]["1"] == take(board, 1, 1)
