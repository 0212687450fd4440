"""Grader: `none` is the identity, `film` is a deterministic seeded look."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.frames import Frames
from pipeline.grade import LOOKS, Grader


@pytest.fixture
def frames() -> Frames:
    ramp = np.linspace(0, 255, 64, dtype=np.float32).round().astype(np.uint8)
    pixels = np.broadcast_to(ramp[None, None, :, None], (9, 48, 64, 3)).copy()
    return Frames(pixels=pixels, fps=24)


def test_looks_are_none_and_film() -> None:
    assert LOOKS == ("none", "film")


def test_grade_none_returns_input_unchanged(frames: Frames) -> None:
    assert Grader().grade(frames, seed=0) is frames
    assert Grader("none").grade(frames, seed=1) is frames


def test_grade_film_keeps_shape_dtype_and_fps(frames: Frames) -> None:
    out = Grader("film").grade(frames, seed=0)
    assert out.pixels.shape == frames.pixels.shape
    assert out.pixels.dtype == np.uint8
    assert out.fps == frames.fps


def test_grade_film_changes_the_image(frames: Frames) -> None:
    out = Grader("film").grade(frames, seed=0)
    assert np.abs(out.pixels.astype(np.int16) - frames.pixels).mean() > 2


def test_grade_film_is_deterministic_for_a_seed(frames: Frames) -> None:
    first = Grader("film").grade(frames, seed=42)
    second = Grader("film").grade(frames, seed=42)
    assert first.pixels.tobytes() == second.pixels.tobytes()


def test_grade_film_grain_differs_across_seeds(frames: Frames) -> None:
    first = Grader("film").grade(frames, seed=1)
    second = Grader("film").grade(frames, seed=2)
    assert not np.array_equal(first.pixels, second.pixels)


def test_grade_film_grain_varies_from_frame_to_frame(frames: Frames) -> None:
    out = Grader("film").grade(frames, seed=0)  # every input frame is identical
    assert not np.array_equal(out.pixels[0], out.pixels[1])
    assert not np.array_equal(out.pixels[0], out.pixels[8])


def test_grade_film_lifts_blacks_rolls_off_whites_and_warms_highlights() -> None:
    black = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    white = np.full((4, 32, 32, 3), 255, dtype=np.uint8)
    graded = Grader("film").grade(Frames(pixels=np.concatenate([black, white]), fps=16), seed=0).pixels
    graded_black = graded[:4].reshape(-1, 3).mean(axis=0)
    graded_white = graded[4:].reshape(-1, 3).mean(axis=0)
    assert graded_black.mean() > 5  # lifted blacks
    assert graded_white.mean() < 250  # rolled-off highlights
    assert graded_white[0] > graded_white[2]  # warm: more red than blue in the highlights


def test_grader_rejects_unknown_look() -> None:
    with pytest.raises(ValueError, match=r"`look` must be one of none, film but is 'noir'\."):
        Grader("noir")
