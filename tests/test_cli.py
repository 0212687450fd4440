"""`previz generate` end to end: a real mp4 from the tiny model, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.video import read_video_info
from serve.cli import main

PREVIZ = [sys.executable, "-c", "from serve.cli import main; main()"]


def previz(*args: str) -> subprocess.CompletedProcess[str]:
    """The real entry point in a child process."""
    return subprocess.run([*PREVIZ, *args], capture_output=True, text=True, timeout=600)


def previz_in_process(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """Exit code and stderr of `main()` run here (fast: no interpreter start per case)."""
    monkeypatch.setattr(sys, "argv", ["previz", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return int(exited.value.code), capsys.readouterr().err


def test_generate_writes_an_upscaled_graded_mp4_with_the_requested_frames(tmp_path: Path) -> None:
    out = tmp_path / "clips" / "leap.mp4"
    result = previz(
        "generate", "a man leaps from a tower", "--resolution", "96x64", "--duration", "0.5",
        "--steps", "4", "--seed", "3", "--upscale", "720p", "--look", "film", "--fps", "24", "-o", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = read_video_info(out)
    assert (info.num_frames, info.width, info.height, info.fps) == (14, 1080, 720, 24.0)  # 9 at 16 fps
    assert info.codec == "h264"
    assert info.metadata["comment"] == "AI-generated draft"
    assert info.metadata["previz_seed"] == "3"
    for stage in ("text encoder", "denoise (high-noise expert)", "VAE decode", "mp4 encode", "total"):
        assert stage in result.stdout


def test_generate_from_a_shot_file(tmp_path: Path) -> None:
    shot = tmp_path / "shot.yaml"
    shot.write_text("人物: 穿黑色风衣的男人\n动作: 从塔顶跃下\n风格: slow motion\n", encoding="utf-8")
    out = tmp_path / "shot.mp4"
    result = previz(
        "generate", "--shot", str(shot), "--resolution", "64x64", "--duration", "0.25", "--steps", "2",
        "-o", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = read_video_info(out)
    assert (info.num_frames, info.width, info.height) == (5, 64, 64)
    assert info.metadata["title"].startswith("穿黑色风衣的男人 从塔顶跃下")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x", "--resolution", "100x64"], "`resolution` width must be a multiple of 16"),
        (["x", "--resolution", "4k"], "`resolution` must be 480p, 720p or WxH"),
        (["x", "--duration", "30"], "`duration` must be between 0.25 and 10.0 seconds but is 30.0."),
        (["x", "--steps", "0"], "`steps` must be between 1 and 100 but is 0."),
        (["x", "--steps", "many"], "Invalid value for '--steps'"),
        (["x", "--cache-threshold", "2"], "`cache.threshold` must be between 0 and 1 but is 2.0."),
        (["x", "--quality", "draft", "--cache-threshold", "0.1"], "`cache` is for `quality: final` only"),
        (
            ["x", "--no-cache", "--cache-threshold", "0.1"],
            "give `--cache-threshold` or `--no-cache`, not both.",
        ),
        (["", "--steps", "2"], "`prompt` must not be empty"),
        (["x", "--upscale", "4k"], "`upscale` must be one of none, 720p, 1080p but is '4k'."),
        (["x", "--look", "noir"], "`look` must be one of none, film but is 'noir'."),
        (["x", "--fps", "30"], "`--fps` must be one of 16, 24, 25 but is 30."),
        (["x", "-o", "clip.mov"], "`--output` must end in .mp4"),
        (["x", "--model", "/no/such/model"], "is not a folder"),
        (["x", "--model", "s3://"], "s3://bucket/prefix"),
        (["x", "--no-such-flag"], "No such option: --no-such-flag"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(
    args: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stderr = previz_in_process(["generate", *args], monkeypatch, capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("previz: error: ") and message in lines[0]


def test_unknown_field_in_shot_file_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shot = tmp_path / "shot.json"
    shot.write_text('{"character": "a cat", "lighting": "noon"}')
    code, stderr = previz_in_process(["generate", "--shot", str(shot)], monkeypatch, capsys)
    assert code == 2
    assert "unknown field `lighting`" in stderr
