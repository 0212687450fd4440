"""Editorial delivery through the API: frame rates, LUT looks, selected takes, the cut and its timeline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api_app import TINY, LocalApi, local_api


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
