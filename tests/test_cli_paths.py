"""Every file the `previz` CLI writes stays in the folder it writes to: names from a storyboard file or the
server (shot names, ids, package members) become one safe file name each, and a path that still lands
outside the folder (a symlink in it) is refused. Against the Ingress app behind a real loopback server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve.cli.common import CliError, file_name, target_in
from tests.support.api_app import TINY, LocalApi, finish, http_server, local_api
from tests.support.cli_run import previz
from tests.test_editorial_api import cut_of, finish_with_clip


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalApi]:
    """The app behind a loopback server, the CLI pointed at it, and the working folder `tmp_path/work`."""
    with local_api(tmp_path) as api, http_server() as url:
        monkeypatch.setenv("PREVIZ_SERVER", url)
        monkeypatch.setenv("PREVIZ_API_KEY", api.admin_key)
        (tmp_path / "work").mkdir()
        monkeypatch.chdir(tmp_path / "work")
        yield api


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if not path.is_dir())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "etc_passwd"),
        ("a/b", "a_b"),
        ("..", "fallback"),
        ("..\\..\\boot.ini", "boot.ini"),
        (".hidden", "hidden"),
        ("Opening shot: dawn", "Opening_shot_dawn"),
        ("カット１", "カット１"),
        ("line\nbreak\x00", "line_break"),
        ("NUL", "_NUL"),
        ("con.mp4", "_con.mp4"),
        ("é" * 100, "é" * 60),  # 120 bytes of UTF-8
    ],
)
def test_a_name_becomes_one_file_name_in_its_folder(name: str, expected: str) -> None:
    assert file_name(name, "fallback") == expected


def test_a_path_through_a_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "clips").symlink_to(tmp_path / "elsewhere")
    assert target_in(tmp_path / "out", "clips/../x", "a b.mp4") == tmp_path / "out" / "clips_.._x" / "a_b.mp4"
    with pytest.raises(CliError) as refused:
        target_in(tmp_path / "out", "clips", "1.mp4")
    assert str(refused.value) == (
        f"refusing to write {str(tmp_path / 'out' / 'clips' / '1.mp4')!r}: "
        f"it resolves outside {str(tmp_path / 'out')!r}"
    )


def test_submit_storyboard_writes_every_clip_inside_the_output_folder_whatever_the_shot_names(
    api: LocalApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    board = {
        "shots": [
            {"name": "x/../../../escaped", "prompt": "a door", **TINY},
            {"name": "a/b", "prompt": "a hall", **TINY},
            {"name": "..", "prompt": "a stair", **TINY},
        ]
    }
    (tmp_path / "board.json").write_text(json.dumps(board))
    # the board exists and is finished before the CLI sends it again with the same key (a replay)
    created = api.client.post("/v1/storyboards", json=board, headers={"Idempotency-Key": "paths-1"}).json()
    for shot in created["shots"]:
        for video in shot["videos"]:
            finish(api, video["video_id"])
    args = ["submit", "--storyboard", str(tmp_path / "board.json"), "--idempotency-key", "paths-1"]
    code, out, err = previz([*args, "-o", "out/clips"], monkeypatch, capsys)
    assert code == 0, err
    assert out.strip() == created["id"]
    written = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*.mp4"))
    assert [name for name in written if not name.startswith("artifacts/")] == [
        "work/out/clips/01-x_.._.._.._escaped-take1.mp4",  # `01-x/../../../escaped-take1.mp4` was work/…
        "work/out/clips/02-a_b-take1.mp4",  # was a folder `02-a` with `b-take1.mp4` in it
        "work/out/clips/03-shot-take1.mp4",
    ]
    assert files_under(tmp_path / "work") == [name.removeprefix("work/") for name in written[-3:]]


def test_fetch_never_writes_outside_the_working_folder_for_an_id_with_a_path_in_it(
    api: LocalApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for args in (["fetch", "--storyboard", "../sb_escaped"], ["fetch", "nested/dir/vid_x"]):
        code, _out, err = previz(args, monkeypatch, capsys)
        assert code == 2 and "not_found" in err, err
    assert files_under(tmp_path / "work") == [] and list((tmp_path / "work").iterdir()) == []
    assert not (tmp_path / "sb_escaped").exists()


def test_fetch_storyboard_refuses_to_write_through_a_symlink_out_of_its_folder(
    api: LocalApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    created = api.client.post("/v1/storyboards", json={"shots": [{"name": "1A", "prompt": "a door", **TINY}]})
    board = created.json()
    finish_with_clip(api, board["shots"][0]["videos"][0]["video_id"], 40)
    cut_of(api, board["id"], {"fps": 16})
    (tmp_path / "work" / "sb").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "work" / "sb" / "clips").symlink_to(tmp_path / "elsewhere")
    code, _out, err = previz(["fetch", "--storyboard", board["id"], "-o", "sb"], monkeypatch, capsys)
    assert code == 2
    assert "refusing to write 'sb/clips/001_1A_take1.mp4': it resolves outside 'sb'" in err
    assert list((tmp_path / "elsewhere").iterdir()) == []
