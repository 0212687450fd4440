"""Upscaler: exact target sizes, seeded compact nets, and the spandrel save/load round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from spandrel.architectures.Compact import Compact

from pipeline.frames import Frames
from pipeline.upscale import Upscaler, upscale_target_size


def _frames(num_frames: int, width: int, height: int, seed: int = 0) -> Frames:
    pixels = np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)
    return Frames(pixels=pixels, fps=16)


@pytest.fixture(scope="module")
def upscaler() -> Upscaler:
    return Upscaler.compact_random(seed=0)


@pytest.mark.parametrize(
    ("target", "width", "height", "expected"),
    [
        ("720p", 832, 480, (1248, 720)),
        ("720p", 480, 832, (720, 1248)),
        ("1080p", 1280, 720, (1920, 1080)),
        ("1080p", 720, 1280, (1080, 1920)),
        ("720p", 1280, 720, (1280, 720)),
        ("720p", 600, 600, (720, 720)),
        ("720p", 1920, 1080, (1280, 720)),  # smaller than the input: a resize
        ("none", 832, 480, (832, 480)),
    ],
)
def test_upscale_target_size_sets_short_side_and_keeps_aspect(
    target: str, width: int, height: int, expected: tuple[int, int]
) -> None:
    assert upscale_target_size(target, width, height) == expected


def test_upscale_target_size_rounds_long_side_to_even() -> None:
    width, height = upscale_target_size("720p", 835, 480)  # 835 * 1.5 = 1252.5
    assert height == 720
    assert width % 2 == 0
    assert abs(width - 1252.5) <= 1.5


def test_upscale_target_size_rejects_unknown_target() -> None:
    with pytest.raises(ValueError, match=r"`upscale` must be one of none, 720p, 1080p but is '4k'\."):
        upscale_target_size("4k", 832, 480)


@pytest.mark.parametrize(("width", "height"), [(64, 36), (36, 64)])
@pytest.mark.parametrize("target", ["720p", "1080p"])
def test_upscale_output_has_exact_target_size(
    upscaler: Upscaler, target: str, width: int, height: int
) -> None:
    frames = _frames(3, width, height)
    target_width, target_height = upscale_target_size(target, width, height)
    out = upscaler.upscale(frames, target_width, target_height)
    assert out.pixels.shape == (3, target_height, target_width, 3)
    assert out.pixels.dtype == np.uint8
    assert out.fps == frames.fps


def test_upscale_to_smaller_target_resizes_exactly(upscaler: Upscaler) -> None:
    out = upscaler.upscale(_frames(2, 64, 48), 32, 24)
    assert out.pixels.shape == (2, 24, 32, 3)


def test_upscale_to_identical_size_returns_input_unchanged(upscaler: Upscaler) -> None:
    frames = _frames(2, 64, 48)
    assert upscaler.upscale(frames, 64, 48) is frames


@pytest.mark.parametrize(
    ("target_width", "target_height", "message"),
    [
        (129, 96, r"`target_width` must be a positive even number .* but is 129\."),
        (128, 97, r"`target_height` must be a positive even number .* but is 97\."),
        (0, 96, r"`target_width` must be a positive even number .* but is 0\."),
        (128, -2, r"`target_height` must be a positive even number .* but is -2\."),
    ],
)
def test_upscale_rejects_odd_or_non_positive_target(
    upscaler: Upscaler, target_width: int, target_height: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        upscaler.upscale(_frames(1, 64, 48), target_width, target_height)


def test_upscale_output_does_not_depend_on_chunking_and_reports_progress(upscaler: Upscaler) -> None:
    frames = _frames(9, 32, 24)
    calls: list[tuple[int, int]] = []
    chunked = upscaler.upscale(
        frames, 64, 48, chunk_frames=4, progress=lambda done, total: calls.append((done, total))
    )
    whole = upscaler.upscale(frames, 64, 48, chunk_frames=9)
    np.testing.assert_array_equal(chunked.pixels, whole.pixels)
    assert calls == [(4, 9), (8, 9), (9, 9)]


def test_compact_random_is_deterministic_for_a_seed() -> None:
    frames = _frames(2, 32, 24)
    first = Upscaler.compact_random(seed=7).upscale(frames, 64, 48)
    second = Upscaler.compact_random(seed=7).upscale(frames, 64, 48)
    np.testing.assert_array_equal(first.pixels, second.pixels)


def test_compact_random_differs_across_seeds() -> None:
    frames = _frames(2, 32, 24)
    first = Upscaler.compact_random(seed=7).upscale(frames, 64, 48)
    second = Upscaler.compact_random(seed=8).upscale(frames, 64, 48)
    assert not np.array_equal(first.pixels, second.pixels)


def test_compact_random_builds_spandrel_compact_with_requested_shape() -> None:
    upscaler = Upscaler.compact_random(seed=0, scale=4, num_feat=8, num_conv=2)
    model = upscaler.descriptor.model
    assert isinstance(model, Compact)
    assert (upscaler.scale, model.num_feat, model.num_conv) == (4, 8, 2)


def test_compact_random_leaves_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    Upscaler.compact_random(seed=5)
    np.testing.assert_array_equal(torch.rand(4).numpy(), expected.numpy())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_then_from_file_gives_identical_outputs(tmp_path: Path, suffix: str) -> None:
    original = Upscaler.compact_random(seed=3, scale=2)
    loaded = Upscaler.from_file(original.save(tmp_path / f"weights{suffix}"))
    assert loaded.descriptor.architecture.id == "Compact"
    frames = _frames(3, 32, 24)
    expected = original.descriptor(torch.tensor(frames.pixels).permute(0, 3, 1, 2).float() / 255)
    actual = loaded.descriptor(torch.tensor(frames.pixels).permute(0, 3, 1, 2).float() / 255)
    assert (expected - actual).abs().max().item() == 0
    np.testing.assert_array_equal(
        original.upscale(frames, 64, 48).pixels, loaded.upscale(frames, 64, 48).pixels
    )


def test_from_file_rejects_a_model_that_is_not_super_resolution(tmp_path: Path) -> None:
    restoration = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=1, upscale=1)
    torch.save(restoration.state_dict(), tmp_path / "denoise.pth")
    with pytest.raises(ValueError, match=r"must be a super-resolution model \(purpose 'SR'\).*'Restoration'"):
        Upscaler.from_file(tmp_path / "denoise.pth")
