"""VideoWriter: exact H.264 mp4s that always carry the AI-generated marker; readers for info and posters."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.video
from pipeline.frames import Frames
from pipeline.video import AI_MARKER, VideoWriter, poster_frame_jpeg, read_video_info


def _frames(num_frames: int = 9, width: int = 64, height: int = 48, fps: int = 24) -> Frames:
    # a smooth bright gradient: survives H.264 well, so label differences stand out
    ramp = np.linspace(150, 230, width, dtype=np.float32).round().astype(np.uint8)
    pixels = np.broadcast_to(ramp[None, None, :, None], (num_frames, height, width, 3)).copy()
    return Frames(pixels=pixels, fps=fps)


def _decode(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.mark.parametrize(("num_frames", "fps"), [(17, 16), (9, 24)])
def test_written_mp4_has_requested_frame_count_size_fps_and_h264(
    tmp_path: Path, num_frames: int, fps: int
) -> None:
    path = VideoWriter(label=None).write(_frames(num_frames, 64, 48, fps), tmp_path / "clip.mp4")
    info = read_video_info(path)
    assert (info.num_frames, info.width, info.height) == (num_frames, 64, 48)
    assert info.fps == pytest.approx(fps)
    assert info.codec == "h264"


def test_written_mp4_always_carries_ai_generated_marker(tmp_path: Path) -> None:
    info = read_video_info(VideoWriter(label=None).write(_frames(), tmp_path / "clip.mp4"))
    assert info.metadata["comment"] == "AI-generated draft"
    assert info.metadata["previz_ai_generated"] == "true"


def test_caller_metadata_survives_next_to_the_marker(tmp_path: Path) -> None:
    metadata = {"previz_job_id": "job-123", "previz_project": "heist", "title": "Shot 12"}
    info = read_video_info(VideoWriter().write(_frames(), tmp_path / "clip.mp4", metadata=metadata))
    assert {key: info.metadata[key] for key in metadata} == metadata
    assert {key: info.metadata[key] for key in AI_MARKER} == AI_MARKER


def test_caller_metadata_cannot_override_the_marker(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"`metadata` key 'previz_ai_generated' is reserved"):
        VideoWriter().write(_frames(), tmp_path / "clip.mp4", metadata={"previz_ai_generated": "false"})
    assert not (tmp_path / "clip.mp4").exists()


def test_label_is_burned_into_bottom_left_and_leaves_top_right_alone(tmp_path: Path) -> None:
    frames = _frames()
    labelled = _decode(VideoWriter().write(frames, tmp_path / "label.mp4")).astype(np.int16)
    plain = _decode(VideoWriter(label=None).write(frames, tmp_path / "plain.mp4")).astype(np.int16)
    height, width = frames.height, frames.width
    corner = (slice(None), slice(-height // 4, None), slice(None, width // 4))  # bottom-left quarter
    bottom_left = np.abs(labelled[corner] - plain[corner]).mean(axis=(1, 2, 3))
    top_right = np.abs(labelled[:, : height // 4, -width // 4 :] - plain[:, : height // 4, -width // 4 :])
    top_right = top_right.mean(axis=(1, 2, 3))
    assert (bottom_left > 20).all()  # on every frame: a dark box over a bright image
    assert (top_right < 3).all()


def test_write_rejects_odd_frame_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"must be even for H.264 yuv420p but are 63 and 48\."):
        VideoWriter().write(_frames(width=63), tmp_path / "clip.mp4")


def test_failed_write_leaves_no_file_under_final_or_temp_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(rgb: np.ndarray, overlay: object) -> np.ndarray:
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(pipeline.video, "_burn", crash)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        VideoWriter().write(_frames(), tmp_path / "clip.mp4")
    assert list(tmp_path.iterdir()) == []


def test_write_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"stale")
    VideoWriter(label=None).write(_frames(5), path)
    assert read_video_info(path).num_frames == 5
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"crf": 52}, r"`crf` must be between 0 and 51 but is 52\."),
        ({"preset": "turbo"}, r"`preset` must be one of ultrafast, .*placebo but is 'turbo'\."),
        ({"label": "  "}, r"`label` must be None or non-blank text but is '  '\."),
    ],
)
def test_video_writer_rejects_bad_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VideoWriter(**kwargs)  # type: ignore[arg-type]


def test_poster_frame_jpeg_is_a_decodable_jpeg_of_the_video_size(tmp_path: Path) -> None:
    path = VideoWriter().write(_frames(), tmp_path / "clip.mp4")
    image = Image.open(io.BytesIO(poster_frame_jpeg(path)))
    assert image.format == "JPEG"
    assert image.size == (64, 48)
    first = _decode(path)[0].astype(np.int16)
    assert np.abs(np.asarray(image.convert("RGB"), dtype=np.int16) - first).mean() < 4
