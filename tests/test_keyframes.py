"""Keyframes as job artifacts: the fit rule, PNG round trips, copies for remixes, the last decoded frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve.jobs.keyframes import (
    copy_keyframes,
    fit_to_size,
    load_keyframes,
    load_last_frame,
    save_keyframes,
    save_last_frame,
)
from serve.jobs.request import JobRequest, Keyframes, KeyframeSource
from serve.storage import JobArtifacts, LocalArtifactStore


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


def _striped(width: int, height: int) -> Image.Image:
    """Red left third, green middle, blue right third: a crop shows which part survived."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 3, 0] = 255
    pixels[:, width // 3 : 2 * width // 3, 1] = 255
    pixels[:, 2 * width // 3 :, 2] = 255
    return Image.fromarray(pixels)


def test_fit_scales_to_cover_then_crops_the_centre() -> None:
    # 300x100 onto 64x64: scaled to 192x64, the middle 64 columns kept, all green
    fitted = np.asarray(fit_to_size(_striped(300, 100), 64, 64))
    assert fitted.shape == (64, 64, 3)
    assert (fitted[:, 8:56, 1] > 200).all() and (fitted[:, 8:56, 0] < 50).all()


def test_fit_converts_any_mode_to_rgb() -> None:
    rgba = Image.new("RGBA", (40, 30), (10, 20, 30, 128))
    assert fit_to_size(rgba, 16, 16).mode == "RGB"


def test_saved_keyframes_load_as_fitted_uint8_rgb(store: LocalArtifactStore) -> None:
    first, last = _striped(120, 90), Image.new("RGB", (50, 50), (7, 8, 9))
    save_keyframes(store, "p1", "job1", first, last, size=(32, 16))
    loaded_first, loaded_last = load_keyframes(store, "p1", "job1")
    assert loaded_first is not None and loaded_last is not None
    assert loaded_first.dtype == np.uint8 and loaded_first.shape == (16, 32, 3)
    np.testing.assert_array_equal(loaded_first, np.asarray(fit_to_size(first, 32, 16)))
    assert (loaded_last == [7, 8, 9]).all()


def test_a_job_without_a_last_keyframe_loads_none(store: LocalArtifactStore) -> None:
    save_keyframes(store, "p1", "job1", Image.new("RGB", (16, 16)), None)
    first, last = load_keyframes(store, "p1", "job1")
    assert first is not None and last is None
    assert not store.exists(JobArtifacts("p1", "job1").keyframe("last"))
    assert load_keyframes(store, "p1", "other") == (None, None)


def test_a_remix_gets_its_own_copy_of_the_keyframes(store: LocalArtifactStore) -> None:
    save_keyframes(store, "p1", "source", Image.new("RGB", (16, 16), (1, 2, 3)), None)
    copy_keyframes(store, "p1", "source", "remix")
    store.delete(JobArtifacts("p1", "source").keyframe("first"))
    first, last = load_keyframes(store, "p1", "remix")
    assert first is not None and (first == [1, 2, 3]).all() and last is None


def test_last_frame_round_trips_bit_exact(store: LocalArtifactStore) -> None:
    frame = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    key = save_last_frame(store, "p1", "job1", frame)
    assert key == JobArtifacts("p1", "job1").last_frame
    np.testing.assert_array_equal(load_last_frame(store, "p1", "job1"), frame)
    assert load_last_frame(store, "p1", "nothing") is None


def test_a_stored_request_without_keyframes_still_loads() -> None:
    keyframes = Keyframes(first=KeyframeSource(kind="image", sha256="ab" * 32))
    assert Keyframes.model_validate(keyframes.model_dump(mode="json")) == keyframes
    assert "keyframes" in JobRequest.model_fields and JobRequest.model_fields["keyframes"].default is None
