"""`previz generate` end to end: a real mp4 from the tiny model, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.video import read_frames, read_video_info
from serve.cli import main
from tests.support import cli_run
from tests.support.safety_hooks import BLOCKED_WIDTH

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
    assert info.metadata["title"] == "穿黑色风衣的男人从塔顶跃下。风格：slow motion。"  # Chinese glue


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
        (["x", "--lut", "/no/such/look.cube"], "`--lut` '/no/such/look.cube' is not a file."),
        (["x", "--look", "film", "--lut", "/no/such/look.cube"], "give `--look` or `--lut`, not both."),
        (["x", "--frame-check", "no_such_module:check"], "`safety.frame_check` 'no_such_module:check'"),
        (["x", "-o", "clip.mov"], "`--output` must end in .mp4"),
        (["x", "--model", "/no/such/model"], "is not a folder"),
        (["x", "--model", "s3://"], "s3://bucket/prefix"),
        (["x", "--no-such-flag"], "No such option: --no-such-flag"),
        (["x", "--draft-decoder", "taehv"], "`--draft-decoder` must be vae or fast but is 'taehv'."),
        (["x", "--draft-decoder", "fast"], "`--draft-decoder fast` is for `--quality draft`: a final always"),
        (
            ["x", "--quality", "draft", "--draft-decoder", "fast", "--fast-weights", "/no/such/taew2_1.pth"],
            "`--fast-weights`: ",
        ),
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


def test_generate_a_draft_with_the_fast_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.taehv import FastDecoder

    calls: list[int] = []
    decode = FastDecoder.decode
    monkeypatch.setattr(
        FastDecoder, "decode", lambda self, *a, **kw: calls.append(1) or decode(self, *a, **kw)
    )
    out = tmp_path / "draft.mp4"
    args = [
        "x",
        "--quality",
        "draft",
        "--draft-decoder",
        "fast",
        "--resolution",
        "64x64",
        "--duration",
        "0.25",
    ]
    monkeypatch.setattr(sys, "argv", ["previz", "generate", *args, "-o", str(out)])
    main()  # returns on success (exits only on errors)
    assert calls == [1]  # TAEHV (the preset's random weights) decoded the draft
    assert read_video_info(out).num_frames == 5  # the full VAE's frame count


def test_unknown_field_in_shot_file_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    shot = tmp_path / "shot.json"
    shot.write_text('{"character": "a cat", "lighting": "noon"}')
    code, stderr = previz_in_process(["generate", "--shot", str(shot)], monkeypatch, capsys)
    assert code == 2
    assert "unknown field `lighting`" in stderr


# -- the one finisher: a LUT look, a delivered rate and the frame check, as a cluster finishes --------------


def grey_cube(level: float = 0.25) -> str:
    """A 2³ .cube in the real format that maps every colour to one grey."""
    rows = "\n".join(f"{level} {level} {level}" for _ in range(8))
    return f'TITLE "grey"\nLUT_3D_SIZE 2\n{rows}\n'


def test_generate_grades_with_a_cube_lut_after_conforming_to_24_fps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "grey.cube").write_text(grey_cube())
    out = tmp_path / "grey.mp4"
    code, _out, stderr = cli_run.previz(
        ["generate", "a lighthouse in fog", "--resolution", "96x64", "--duration", "0.5", "--steps", "2",
         "--lut", str(tmp_path / "grey.cube"), "--fps", "24", "--no-label", "-o", str(out)],
        monkeypatch, capsys,
    )  # fmt: skip
    assert code == 0, stderr
    frames = read_frames(out)
    assert (frames.num_frames, frames.fps) == (14, 24)  # 9 frames at 16 fps, conformed
    assert np.abs(frames.pixels.astype(np.int16) - 64).max() <= 1  # 0.25 grey everywhere, after H.264


def test_generate_stops_a_clip_the_frame_check_blocks_writes_nothing_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "blocked.mp4"
    code, _out, stderr = cli_run.previz(
        ["generate", "a lighthouse in fog", "--resolution", f"{BLOCKED_WIDTH}x64", "--duration", "0.25",
         "--steps", "2", "--frame-check", "tests.support.safety_hooks:block_test_width", "-o", str(out)],
        monkeypatch, capsys,
    )  # fmt: skip
    assert code == 2
    assert stderr.strip().splitlines()[-1] == (
        "previz: error: the generated clip was blocked by the content policy (category `violence_graphic`)"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_malformed_cube_is_refused_naming_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.cube").write_text(grey_cube().replace("0.25 0.25 0.25", "0.25 0.25", 1))
    args = ["generate", "x", "--lut", str(tmp_path / "bad.cube")]
    code, stderr = previz_in_process(args, monkeypatch, capsys)
    assert code == 2
    assert "is not a 3D .cube LUT: line 3:" in stderr


def test_generate_a_shot_from_a_storyboard_panel_on_the_i2v_preset(tmp_path: Path) -> None:
    from PIL import Image

    panel = tmp_path / "panel.png"
    Image.new("RGB", (200, 120), (230, 120, 40)).save(panel)  # another aspect: fitted, then cropped
    out = tmp_path / "panel.mp4"
    result = previz(
        "generate", "the hero leaps out of the fireball", "--model", "tiny-i2v", "--image", str(panel),
        "--resolution", "96x64", "--duration", "0.5", "--steps", "2", "--seed", "3", "-o", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert read_video_info(out).num_frames == 9
    assert "VAE encode (keyframes)" in result.stdout
    refused = previz(
        "generate", "a man leaps", "--model", "tiny", "--image", str(panel), "--resolution", "96x64",
        "--duration", "0.5", "--steps", "2", "-o", str(tmp_path / "no.mp4"),
    )  # fmt: skip
    assert refused.returncode != 0 and "needs an image-to-video model" in refused.stderr
    assert not (tmp_path / "no.mp4").exists()
