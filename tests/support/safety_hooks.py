"""Content-policy hooks the tests configure by import path (`tests.support.safety_hooks:...`); Ray workers
import them too, so they are real module-level functions."""

from __future__ import annotations

import numpy as np

BLOCKED_WIDTH = 80  # the session cluster's frame check refuses clips this wide (no other test uses it)


def block_test_width(pixels: np.ndarray) -> str | None:
    """The session cluster's frame check: clips BLOCKED_WIDTH pixels wide count as `violence_graphic`."""
    return "violence_graphic" if pixels.shape[2] == BLOCKED_WIDTH else None


def block_bright_frames(pixels: np.ndarray) -> str | None:
    """Frames brighter than mid-grey on average count as `sexual_explicit` (decides on the pixels)."""
    return "sexual_explicit" if float(pixels.mean()) > 128 else None


def classify_likeness(text: str) -> str | None:
    """A stand-in for a studio's own classifier: any prompt naming "jane roe" is a real person."""
    return "real_person_likeness" if "jane roe" in text.lower() else None


def broken_classifier(text: str) -> str | None:
    raise RuntimeError("the classifier model is not loaded")


def confused_classifier(text: str) -> str | None:
    return 0.93  # type: ignore[return-value]  # a score, not a category: must be refused


NOT_CALLABLE = "a string"
