"""The client commands of `previz` against the live cluster: submit (one shot, a storyboard), status,
fetch, ls, cancel; errors are one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.video import read_video_info
from tests.support.cli_run import previz
from tests.support.cluster import Cluster

pytestmark = pytest.mark.cluster
TINY = ["--size", "96x64", "--seconds", "0.5", "--steps", "4"]


def test_submit_wait_status_fetch_ls_and_cancel(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PREVIZ_SERVER", cluster.url)
    monkeypatch.setenv("PREVIZ_API_KEY", cluster.key_for("cli-test"))
    shot = tmp_path / "shot.yaml"
    shot.write_text(yaml.safe_dump({"character": "a courier", "action": "runs across a rooftop"}))
    code, out, err = previz(
        ["submit", "at dusk", "--shot", str(shot), *TINY, "--project", "cli-test", "--tag", "take=2",
         "--wait", "-o", str(tmp_path / "clips")],
        monkeypatch, capsys,
    )  # fmt: skip
    assert code == 0, err
    video_id = out.split()[0]
    assert video_id.startswith("vid_")
    assert read_video_info(tmp_path / "clips" / f"{video_id}.mp4").num_frames == 9

    code, out, err = previz(["status", video_id], monkeypatch, capsys)
    assert code == 0 and f"{video_id} completed" in out and "/content" in out, err
    code, out, err = previz(["fetch", video_id, "-o", str(tmp_path / "again.mp4")], monkeypatch, capsys)
    assert code == 0 and read_video_info(tmp_path / "again.mp4").width == 96, err
    code, out, err = previz(
        ["fetch", video_id, "--thumbnail", "-o", str(tmp_path / "p.jpg")], monkeypatch, capsys
    )
    assert code == 0 and (tmp_path / "p.jpg").read_bytes()[:3] == b"\xff\xd8\xff", err
    code, out, err = previz(["ls", "--project", "cli-test"], monkeypatch, capsys)
    assert code == 0 and video_id in out and "completed" in out, err

    code, out, err = previz(["cancel", video_id], monkeypatch, capsys)
    assert code == 2 and "already_finished" in err and len(err.strip().splitlines()) == 1
    code, out, err = previz(["submit", "too long", "--seconds", "12"], monkeypatch, capsys)
    assert code == 2 and "invalid_value (seconds)" in err
    code, out, err = previz(["status", "vid_000000000000000000000000"], monkeypatch, capsys)
    assert code == 2 and "not_found" in err


def test_submit_a_storyboard_and_download_every_clip(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    board = tmp_path / "board.yaml"
    board.write_text(
        yaml.safe_dump(
            {
                "title": "rooftops",
                "shots": [{"name": "1A", "prompt": "a courier jumps"}, {"name": "1B", "prompt": "she lands"}],
                "variants": {"seeds": [5, 6]},
            }
        )
    )
    monkeypatch.setenv("PREVIZ_API_KEY", cluster.key_for("cli-board"))
    args = ["submit", "--storyboard", str(board), "--size", "96x64", "--seconds", "0.25", "--steps", "3"]
    code, out, err = previz(
        [*args, "--project", "cli-board", "--server", cluster.url, "-o", str(tmp_path / "board")],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert out.split()[0].startswith("sb_")
    assert sorted(path.name for path in (tmp_path / "board").iterdir()) == [
        "01-1A-take1.mp4", "01-1A-take2.mp4", "02-1B-take1.mp4", "02-1B-take2.mp4",
    ]  # fmt: skip
    code, out, err = previz(["status", out.split()[0], "--server", cluster.url], monkeypatch, capsys)
    assert code == 0 and "completed" in out, err
