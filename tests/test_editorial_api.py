"""Editorial delivery through the API: frame rates, LUT looks, selected takes, the cut and its timeline."""

from __future__ import annotations

import io
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import opentimelineio as otio
import pytest

from pipeline.frames import Frames
from pipeline.interpolate import conform_frame_count
from pipeline.video import VideoWriter, read_video_info
from serve.storage import JobArtifacts
from serve.webhooks import open_job_store
from tests.support.api_app import TINY, LocalApi, http_server, local_api
from tests.support.cli_run import previz
from tests.support.cuts import rendering_cuts, run_cuts


@pytest.fixture
def api(tmp_path: Path) -> Iterator[LocalApi]:
    with local_api(tmp_path) as running:
        yield running


def test_a_video_reports_its_delivered_frame_rate_and_frames(api: LocalApi) -> None:
    default = api.client.post("/v1/videos", json={"prompt": "a door opens", **TINY}).json()
    assert (default["fps"], default["num_frames"]) == (16, 9)  # 0.5 s at 16 fps: 4·2 + 1 frames
    conformed = api.client.post("/v1/videos", json={"prompt": "a door opens", **TINY, "fps": 24}).json()
    assert (conformed["fps"], conformed["num_frames"]) == (24, 14)  # round(9 · 24 / 16)
    assert api.store.get(conformed["id"]).request.finish.fps == 24


def test_the_project_default_fps_applies_when_a_request_names_none(api: LocalApi) -> None:
    answer = api.client.patch("/v1/admin/projects/default", json={"default_fps": 25})
    assert answer.status_code == 200 and answer.json()["settings"]["default_fps"] == 25
    video = api.client.post("/v1/videos", json={"prompt": "a door opens", **TINY}).json()
    assert video["fps"] == 25
    own = api.client.post("/v1/videos", json={"prompt": "a door opens", **TINY, "fps": 16}).json()
    assert own["fps"] == 16


def test_a_frame_rate_outside_16_24_25_is_refused(api: LocalApi) -> None:
    answer = api.client.post("/v1/videos", json={"prompt": "a door opens", **TINY, "fps": 30})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "fps"


def test_a_storyboard_fps_applies_to_shots_that_name_none(api: LocalApi) -> None:
    board = {
        "fps": 24,
        "shots": [
            {"name": "1A", "prompt": "a door", **TINY},
            {"name": "1B", "prompt": "a hall", **TINY, "fps": 25},
        ],
    }
    created = api.client.post("/v1/storyboards", json=board).json()
    rates = [api.client.get(shot["videos"][0]["url"]).json()["fps"] for shot in created["shots"]]
    assert rates == [24, 25]


def warm_cube() -> str:
    """A 3³ .cube with a visible warm cast, red changing fastest."""
    rows = []
    for b in (0.0, 0.5, 1.0):
        for g in (0.0, 0.5, 1.0):
            for r in (0.0, 0.5, 1.0):
                rows.append(f"{min(1.0, r * 0.9 + 0.1):.4f} {g:.4f} {b * 0.8:.4f}")
    return 'TITLE "warm"\nLUT_3D_SIZE 3\n' + "\n".join(rows) + "\n"


def test_an_admin_registers_a_lut_and_a_video_uses_it_by_name(api: LocalApi) -> None:
    put = api.client.put("/v1/admin/projects/default/luts/warm", json={"cube": warm_cube()})
    assert put.status_code == 201, put.text
    assert (put.json()["size"], put.json()["interpolation"]) == (3, "tetrahedral")
    video = api.client.post("/v1/videos", json={"prompt": "a door", **TINY, "look": "warm"}).json()
    assert video["look"] == "warm"
    lut = api.store.get(video["id"]).request.finish.lut
    assert lut is not None and api.state.artifacts.read_bytes(lut.key).decode() == warm_cube()
    listed = api.client.get("/v1/admin/projects/default/luts").json()["data"]
    assert [item["name"] for item in listed] == ["warm"]
    replaced = api.client.put(
        "/v1/admin/projects/default/luts/warm", json={"cube": warm_cube(), "interpolation": "trilinear"}
    )
    assert replaced.status_code == 200 and replaced.json()["interpolation"] == "trilinear"


def test_a_malformed_lut_is_refused_at_upload_naming_its_line(api: LocalApi) -> None:
    lines = warm_cube().splitlines()
    lines[4] = "0.1 0.2"
    answer = api.client.put("/v1/admin/projects/default/luts/warm", json={"cube": "\n".join(lines)})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_lut", "cube")
    assert "line 5: expected a table row of three numbers" in error["message"]
    assert api.store.get_lut("default", "warm") is None
    reserved = api.client.put("/v1/admin/projects/default/luts/film", json={"cube": warm_cube()})
    assert reserved.json()["error"]["code"] == "reserved_look_name"


def test_an_unknown_look_is_a_400_at_create_with_nothing_stored(api: LocalApi) -> None:
    answer = api.client.post("/v1/videos", json={"prompt": "a door", **TINY, "look": "noir"})
    assert answer.status_code == 400
    assert (answer.json()["error"]["code"], answer.json()["error"]["param"]) == ("unknown_look", "look")
    board = {"shots": [{"prompt": "a door", **TINY}], "variants": {"grid": {"look": ["none", "noir"]}}}
    refused = api.client.post("/v1/storyboards", json=board)
    assert refused.json()["error"]["code"] == "unknown_look"
    assert api.store.list(project="default") == []


def test_a_project_cannot_use_or_see_another_projects_lut(api: LocalApi) -> None:
    assert (
        api.client.put("/v1/admin/projects/default/luts/warm", json={"cube": warm_cube()}).status_code == 201
    )
    other = api.client_for("other")
    answer = other.post("/v1/videos", json={"prompt": "a door", **TINY, "look": "warm"})
    assert answer.json()["error"]["code"] == "unknown_look"
    other_admin = api.client_with(api.key_for("other", "admin"))
    assert other_admin.get("/v1/admin/projects/default/luts").status_code == 404
    assert other_admin.put("/v1/admin/projects/default/luts/x", json={"cube": warm_cube()}).status_code == 404
    assert other_admin.get("/v1/admin/projects/other/luts").json()["data"] == []


def finish_with_clip(api: LocalApi, video_id: str, shade: int) -> None:
    """Run a queued job to SUCCEEDED by hand with a real mp4 of its delivered size, rate and frames."""
    job = api.store.claim(video_id, "test-scheduler")
    assert job is not None
    resolved, finish = job.request.resolved, job.request.finish
    num_frames = conform_frame_count(resolved.num_frames, resolved.fps, finish.fps)
    pixels = np.full((num_frames, resolved.height, resolved.width, 3), shade, dtype=np.uint8)
    pixels[:, :, : 8 + shade % 40] = 255  # something that moves between takes, for the eye
    keys = JobArtifacts(job.project, job.id)
    with tempfile.TemporaryDirectory() as scratch:
        path = VideoWriter().write(Frames(pixels=pixels, fps=finish.fps), Path(scratch) / "clip.mp4")
        stored = api.state.artifacts.put_file(keys.clip(job.attempt), path, "video/mp4")
    assert api.store.succeed(
        job.id, job.attempt, artifact_uri=keys.clip(job.attempt), artifact_bytes=stored.size_bytes
    )


BOARD = {
    "title": "act 1",
    "shots": [
        {"name": "1A", "prompt": "a door opens", **TINY},
        {"name": "1B", "prompt": "a hall, lit", **TINY},
        {"name": "2A", "prompt": "a garden at dusk", **TINY},
    ],
    "variants": {"seeds": [1, 2]},
}


@pytest.fixture
def board(api: LocalApi) -> dict:
    """A board of 3 shots × 2 takes, every take finished with a real 16 fps clip of 9 frames."""
    created = api.client.post("/v1/storyboards", json=BOARD).json()
    for shot in created["shots"]:
        for video in shot["videos"]:
            finish_with_clip(api, video["video_id"], 30 + 20 * shot["index"] + 5 * video["variant"])
    return api.client.get(f"/v1/storyboards/{created['id']}").json()


def cut_of(api: LocalApi, board_id: str, body: dict) -> dict:
    """Ask for the board's cut (202, queued), render it as the Scheduler would, and read it back."""
    answer = api.client.post(f"/v1/storyboards/{board_id}/cut", json=body)
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "queued"
    run_cuts(api)
    cut = api.client.get(f"/v1/storyboards/{board_id}/cut").json()
    assert (cut["id"], cut["status"], cut["progress"]) == (answer.json()["id"], "completed", 100), cut
    return cut


def take(board: dict, shot: int, variant: int) -> str:
    return next(v["video_id"] for v in board["shots"][shot]["videos"] if v["variant"] == variant)


def test_a_board_keeps_selected_takes_and_a_shot_order(api: LocalApi, board: dict) -> None:
    url = f"/v1/storyboards/{board['id']}"
    assert board["order"] == [0, 1, 2]
    patched = api.client.patch(url, json={"order": [2, 0, 1], "takes": {"1": take(board, 1, 1)}})
    assert patched.status_code == 200, patched.text
    assert patched.json()["order"] == [2, 0, 1]
    assert [shot["selected_video_id"] for shot in patched.json()["shots"]] == [None, take(board, 1, 1), None]
    assert api.client.get(url).json()["order"] == [2, 0, 1]
    wrong = api.client.patch(url, json={"takes": {"0": take(board, 1, 0)}}).json()["error"]
    assert (wrong["code"], wrong["param"]) == ("invalid_take", "takes.0")
    assert api.client.patch(url, json={"order": [0, 5]}).json()["error"]["code"] == "invalid_shot"
    assert api.client.patch(url, json={"order": [0, 0]}).status_code == 400
    cleared = api.client.patch(url, json={"takes": {"1": None}, "order": None}).json()
    assert cleared["order"] == [0, 1, 2] and cleared["shots"][1]["selected_video_id"] is None


def test_the_cut_is_the_selected_takes_in_order_and_its_timeline_reads_back(
    api: LocalApi, board: dict
) -> None:
    url = f"/v1/storyboards/{board['id']}"
    api.client.patch(url, json={"order": [2, 0, 1], "takes": {"1": take(board, 1, 1)}})
    answer = api.client.post(f"{url}/cut", json={"fps": 24})
    assert answer.status_code == 202, answer.text
    queued = answer.json()
    assert (queued["status"], queued["progress"], queued["num_clips"]) == ("queued", 0, 3)
    assert (queued["content_url"], queued["num_frames"], queued["clips"]) == (None, None, [])
    assert api.client.get(f"{url}/cut").json()["status"] == "queued"
    assert api.client.get(f"{url}/timeline").json()["error"]["code"] == "no_cut"  # nothing rendered yet
    run_cuts(api)
    cut = api.client.get(f"{url}/cut").json()
    assert (cut["id"], cut["status"], cut["progress"]) == (queued["id"], "completed", 100)
    per_shot = conform_frame_count(9, 16, 24)  # each take: 0.5 s, 9 frames at 16 fps
    assert (cut["fps"], cut["size"], cut["num_frames"]) == (24, "96x64", 3 * per_shot)
    assert [clip["video_id"] for clip in cut["clips"]] == [
        take(board, 2, 0),
        take(board, 0, 0),
        take(board, 1, 1),
    ]
    record = api.store.get_storyboard(board["id"]).cut
    info = read_video_info(api.state.artifacts.local_path(record.key))
    assert (info.num_frames, info.fps, info.width) == (cut["num_frames"], 24.0, 96)

    timeline = otio.adapters.read_from_string(
        api.client.get(f"{url}/timeline").text, adapter_name="otio_json"
    )
    clips = list(timeline.find_clips())
    assert [clip.name for clip in clips] == ["2A take 1", "1A take 1", "1B take 2"]
    assert all(clip.duration().rate == 24 for clip in clips)
    assert sum(clip.duration().value for clip in clips) == cut["num_frames"]
    assert clips[0].media_reference.target_url.startswith("http://testserver/v1/artifacts/")

    edl = api.client.get(f"{url}/timeline", params={"format": "edl"})
    assert edl.headers["content-type"].startswith("text/plain")
    read_back = list(otio.adapters.read_from_string(edl.text, adapter_name="cmx_3600", rate=24).find_clips())
    assert [clip.name for clip in read_back] == ["2A take 1", "1A take 1", "1B take 2"]
    assert [clip.duration().value for clip in read_back] == [per_shot] * 3
    xml = api.client.get(f"{url}/timeline", params={"format": "fcpxml"}).text
    assert len(list(otio.adapters.read_from_string(xml, adapter_name="fcp_xml").find_clips())) == 3


def test_the_package_zip_holds_the_cut_the_clips_and_a_timeline_of_relative_paths(
    api: LocalApi, board: dict
) -> None:
    url = f"/v1/storyboards/{board['id']}"
    cut_of(api, board["id"], {"fps": 25})
    answer = api.client.get(f"{url}/timeline", params={"format": "otio", "package": "true"})
    assert answer.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        names = set(archive.namelist())
        timeline = otio.adapters.read_from_string(
            archive.read(f"{board['id']}/timeline.otio").decode(), adapter_name="otio_json"
        )
        targets = [clip.media_reference.target_url for clip in timeline.find_clips()]
        assert targets == ["clips/001_1A_take1.mp4", "clips/002_1B_take1.mp4", "clips/003_2A_take1.mp4"]
        assert {f"{board['id']}/{target}" for target in targets} | {f"{board['id']}/cut.mp4"} <= names


def test_slates_lengthen_every_clip_and_the_cut_by_their_frames(api: LocalApi, board: dict) -> None:
    cut = cut_of(api, board["id"], {"fps": 24, "slates": True, "slate_seconds": 0.5})
    assert [clip["slate_frames"] for clip in cut["clips"]] == [12, 12, 12]
    assert cut["num_frames"] == 3 * (12 + conform_frame_count(9, 16, 24))
    record = api.store.get_storyboard(board["id"]).cut
    assert read_video_info(api.state.artifacts.local_path(record.key)).num_frames == cut["num_frames"]


def test_a_16_fps_cut_has_an_otio_timeline_but_no_edl(api: LocalApi, board: dict) -> None:
    url = f"/v1/storyboards/{board['id']}"
    assert cut_of(api, board["id"], {"fps": 16})["num_frames"] == 27
    assert api.client.get(f"{url}/timeline").status_code == 200
    refused = api.client.get(f"{url}/timeline", params={"format": "edl"})
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "timeline_rate_unsupported")


def test_no_cut_before_every_shot_of_it_has_a_completed_take(api: LocalApi) -> None:
    created = api.client.post("/v1/storyboards", json=BOARD).json()
    url = f"/v1/storyboards/{created['id']}"
    refused = api.client.post(f"{url}/cut", json={})
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "cut_not_ready")
    assert api.client.get(f"{url}/timeline").json()["error"]["code"] == "no_cut"
    other = api.client_for("other")
    assert other.post(f"{url}/cut", json={}).status_code == 404


def test_the_cli_selects_takes_renders_the_cut_and_fetches_it_with_clips_and_timeline(
    api: LocalApi,
    board: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with http_server() as url:
        monkeypatch.setenv("PREVIZ_SERVER", url)
        monkeypatch.setenv("PREVIZ_API_KEY", api.admin_key)
        code, out, err = previz(
            ["takes", board["id"], "--select", f"1={take(board, 1, 1)}", "--order", "2,0,1"],
            monkeypatch,
            capsys,
        )
        assert code == 0, err
        assert out.splitlines()[2].split() == ["1", "1B", take(board, 1, 1)]
        with rendering_cuts(api):
            code, out, err = previz(["cut", board["id"], "--fps", "24", "--slates"], monkeypatch, capsys)
        assert code == 0 and " 24 fps 96x64 " in out, err
        code, out, err = previz(
            ["fetch", "--storyboard", board["id"], "-o", str(tmp_path / "sb")], monkeypatch, capsys
        )
        assert code == 0, err
        code, _out, err = previz(["fetch", "--storyboard", board["id"], "vid_x"], monkeypatch, capsys)
        assert code == 2 and "not both" in err
    folder = tmp_path / "sb"
    clips = sorted(path.name for path in (folder / "clips").iterdir())
    assert clips == ["001_2A_take1.mp4", "002_1A_take1.mp4", "003_1B_take2.mp4"]
    timeline = otio.adapters.read_from_file(str(folder / "timeline.otio"))
    total = sum(clip.duration().value for clip in timeline.find_clips())
    assert (
        read_video_info(folder / "cut.mp4").num_frames == total == 3 * (24 + conform_frame_count(9, 16, 24))
    )


def test_a_store_of_an_earlier_version_gains_the_storyboard_edit_and_cut_columns(tmp_path: Path) -> None:
    from sqlalchemy import create_engine, inspect, text

    from serve.jobs import StoryboardEdit
    from serve.jobs.schema import ADDED_STORYBOARD_COLUMNS

    url = f"sqlite:///{tmp_path / 'old.db'}"
    open_job_store(url).create_schema()
    engine = create_engine(url)
    with engine.begin() as conn:  # the previous version's table
        for name in ADDED_STORYBOARD_COLUMNS:
            conn.execute(text(f"ALTER TABLE storyboards DROP COLUMN {name}"))
        conn.execute(
            text(
                "INSERT INTO storyboards (id, project, title, request, num_jobs, created_at) "
                "VALUES ('sb_old', 'default', 'old', '{\"shots\": [{}]}', 0, '2026-01-01 00:00:00')"
            )
        )
    store = open_job_store(url)
    store.create_schema()
    assert {"edit", "cut"} <= {column["name"] for column in inspect(engine).get_columns("storyboards")}
    engine.dispose()
    assert store.get_storyboard("sb_old").edit is None
    old = store.get_storyboard("sb_old")  # a format-1 request of one unnamed shot
    assert [shot.name for shot in old.request.shots] == [None] and old.request.shot_name(0) == "shot 1"
    updated = store.update_storyboard("sb_old", edit=StoryboardEdit(order=[0]))
    assert updated.edit == StoryboardEdit(order=[0], takes={}) and updated.cut is None
    store.close()


def test_the_admin_cli_registers_lists_and_removes_a_lut_and_sets_the_default_fps(
    api: LocalApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good, bad = tmp_path / "warm.cube", tmp_path / "bad.cube"
    good.write_text(warm_cube())
    bad.write_text(warm_cube().replace("LUT_3D_SIZE 3", "LUT_3D_SIZE 4"))
    with http_server() as url:
        monkeypatch.setenv("PREVIZ_SERVER", url)
        monkeypatch.setenv("PREVIZ_API_KEY", api.admin_key)
        code, out, err = previz(["admin", "lut", "add", "default", "warm", str(good)], monkeypatch, capsys)
        assert code == 0 and "look warm of default: 3³, tetrahedral" in out, err
        code, out, err = previz(["admin", "lut", "add", "default", "bad", str(bad)], monkeypatch, capsys)
        assert (
            code == 2 and "invalid_lut (cube)" in err and "line 2: LUT_3D_SIZE 4 needs 64 table rows" in err
        )
        code, out, err = previz(["admin", "lut", "list", "default"], monkeypatch, capsys)
        assert code == 0 and "warm" in out and "bad" not in out, err
        code, out, err = previz(["admin", "lut", "remove", "default", "warm"], monkeypatch, capsys)
        assert code == 0 and api.store.get_lut("default", "warm") is None, err
        code, out, err = previz(
            ["admin", "project", "update", "default", "--default-fps", "24"], monkeypatch, capsys
        )
        assert code == 0 and api.store.get_project("default").settings.default_fps == 24, err
