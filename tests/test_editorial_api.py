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
