"""Frame-rate conform: exact frame counts and durations, and interpolation that follows motion."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from pipeline.frames import Frames
from pipeline.interpolate import (
    FlowInterpolator,
    ModelInterpolator,
    conform,
    conform_frame_count,
)
from pipeline.video import VideoWriter, read_video_info

WIDTH, HEIGHT = 96, 64
BAR_WIDTH, SPEED = 10, 3.0  # pixels; pixels per source frame


def bar_frame(position: float) -> np.ndarray:
    """A bright bar (soft-edged, so sub-pixel positions are drawable) on a dark, lightly textured field."""
    x = np.arange(WIDTH, dtype=np.float32)
    left = 20.0 + SPEED * position
    coverage = np.clip(x - left + 1, 0, 1) * np.clip(left + BAR_WIDTH - x, 0, 1)
    texture = (np.sin(np.arange(HEIGHT, dtype=np.float32) / 3.0)[:, None] * 20 + 40).astype(np.float32)
    row = 40.0 + coverage * 180.0
    gray = np.broadcast_to(row[None, :], (HEIGHT, WIDTH)) + texture * coverage[None, :] * 0.2
    return np.repeat(np.clip(gray + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def bar_clip(num_frames: int, fps: int = 16) -> Frames:
    return Frames(pixels=np.stack([bar_frame(i) for i in range(num_frames)]), fps=fps)


def test_16_to_24_fps_of_one_second_has_24_frames_and_lasts_one_second(tmp_path: Path) -> None:
    clip = conform(bar_clip(16), 24)
    assert (clip.num_frames, clip.fps) == (24, 24)
    path = VideoWriter(label=None).write(clip, tmp_path / "clip.mp4")
    info = read_video_info(path)
    assert (info.num_frames, info.fps) == (24, 24.0)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == Fraction(24)
        assert float(stream.duration * stream.time_base) == pytest.approx(1.0)
        # mp4's timescale is a multiple of the rate (ffmpeg doubles it past 10000): each frame lasts
        # the same whole number of ticks, 1/24 s
        ticks = 1 / (stream.time_base * 24)
        assert ticks.denominator == 1
        pts = sorted(packet.pts for packet in container.demux(stream) if packet.pts is not None)
        assert set(np.diff(pts)) == {ticks.numerator}


def test_frame_counts_keep_the_duration() -> None:
    assert conform_frame_count(16, 16, 24) == 24
    assert conform_frame_count(80, 16, 25) == 125
    assert conform_frame_count(81, 16, 16) == 81
    with pytest.raises(ValueError, match="positive"):
        conform_frame_count(0, 16, 24)


def test_same_rate_is_the_clip_itself() -> None:
    clip = bar_clip(5)
    assert conform(clip, 16) is clip


def between_frame_errors(interpolated: Frames) -> tuple[float, float]:
    """Mean absolute error, over the frames between source frames, of `interpolated` and of duplicating
    the nearest source frame, both against the bar drawn at its true in-between position."""
    source = bar_clip(16)
    errors, duplicate_errors = [], []
    for index in range(interpolated.num_frames):
        position = Fraction(index * 16, 24)
        if position.denominator == 1 or position >= 15:
            continue
        truth = bar_frame(float(position)).astype(np.float32)
        nearest = source.pixels[round(position)].astype(np.float32)
        errors.append(np.abs(interpolated.pixels[index].astype(np.float32) - truth).mean())
        duplicate_errors.append(np.abs(nearest - truth).mean())
    return float(np.mean(errors)), float(np.mean(duplicate_errors))


def test_flow_interpolation_is_closer_to_the_true_position_than_duplication() -> None:
    error, duplicate_error = between_frame_errors(conform(bar_clip(16), 24, FlowInterpolator()))
    assert error < 0.5 * duplicate_error, (error, duplicate_error)


class Blend(torch.nn.Module):
    """A RIFE-shaped network (img0, img1, timestep) -> img: a cross-fade, with one learnable weight."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.gain * ((1 - timestep) * img0 + timestep * img1)


def test_an_exported_interpolation_network_loads_and_runs_at_each_timestep(tmp_path: Path) -> None:
    path = tmp_path / "rife.pt2"
    example = (torch.zeros(1, 3, 64, 96), torch.zeros(1, 3, 64, 96), torch.zeros(1, 1, 64, 96))
    height, width = torch.export.Dim("height", min=32, max=4096), torch.export.Dim("width", min=32, max=4096)
    image = {2: height, 3: width}
    program = torch.export.export(Blend(), example, dynamic_shapes=(image, image, image))
    torch.export.save(program, str(path))
    interpolator = ModelInterpolator.from_file(path)
    black, white = np.zeros((HEIGHT, WIDTH, 3), np.uint8), np.full((HEIGHT, WIDTH, 3), 200, np.uint8)
    quarter, half = interpolator.between(black, white, [0.25, 0.5])
    assert quarter.shape == (HEIGHT, WIDTH, 3)
    assert (int(quarter[0, 0, 0]), int(half[0, 0, 0])) == (50, 100)
    clip = conform(bar_clip(16), 24, interpolator)
    assert clip.num_frames == 24


def test_a_file_that_is_no_exported_program_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a torch.export program"):
        ModelInterpolator.from_file(path)
