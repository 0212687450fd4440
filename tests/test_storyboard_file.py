"""The example storyboard file in the repository reads as the README says: board-level settings are every
shot's defaults, a shot's own setting wins, and the CLI and the API read the same file the same way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from serve.cli.common import read_mapping
from serve.http.storyboards import StoryboardCreate, expand
from tests.support.api_app import LocalApi, local_api

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "storyboard.yaml"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[LocalApi]:
    with local_api(tmp_path) as running:
        yield running


def test_the_example_file_queues_every_shot_with_the_board_defaults(api: LocalApi) -> None:
    response = api.client.post(
        "/v1/storyboards", content=EXAMPLE.read_bytes(), headers={"Content-Type": "application/yaml"}
    )
    assert response.status_code == 201, response.text
    board = response.json()
    assert board["num_videos"] == 6 and [shot["name"] for shot in board["shots"]] == ["12A", "12B", "12C"]
    for shot in board["shots"]:
        for take in shot["videos"]:
            video = api.client.get(f"/v1/videos/{take['video_id']}").json()
            assert video["size"] == "832x480" and video["quality"] == "draft"
            assert video["seconds"] == ("3" if shot["name"] == "12B" else "5"), video


def test_the_cli_reads_the_example_as_the_api_does() -> None:
    document = read_mapping(EXAMPLE, "storyboard")
    planned = expand(StoryboardCreate.model_validate(document))
    assert len(planned) == 6
    assert {item.settings.look for item in planned} == {"film"}
    assert [item.settings.seconds for item in planned] == [5, 5, 3, 3, 5, 5]


@pytest.mark.parametrize(
    ("shot", "expected"),
    [
        ({}, {"size": "832x480", "seconds": 2}),
        ({"resolution": "480p", "aspect": "9:16"}, {"size": None, "resolution": "480p", "aspect": "9:16"}),
        ({"duration": 1.5}, {"seconds": None, "duration": 1.5}),
        ({"steps": 8}, {"steps": 8, "look": "film"}),
    ],
    ids=["inherits", "own-size-group", "own-length-group", "own-steps"],
)
def test_a_shot_keeps_its_own_settings_and_takes_the_rest_from_the_board(
    shot: dict[str, object], expected: dict[str, object]
) -> None:
    board = {"size": "832x480", "seconds": 2, "steps": 4, "look": "film"}
    document = {**board, "shots": [{"prompt": "a lighthouse", **shot}]}
    (planned,) = expand(StoryboardCreate.model_validate(document))
    settings = planned.settings.model_dump()
    assert {name: settings[name] for name in expected} == expected


def test_a_bad_board_default_is_refused_by_name(api: LocalApi) -> None:
    response = api.client.post("/v1/storyboards", json={"size": "832x481", "shots": [{"prompt": "a storm"}]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] in ("size", "shots.0.size")
