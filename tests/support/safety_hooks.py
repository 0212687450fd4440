"""Content-policy hooks the tests configure by import path (`tests.support.safety_hooks:...`); Ray workers
import them too, so they are real module-level functions."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

BLOCKED_WIDTH = 80  # the session cluster's frame check refuses clips this wide (no other test uses it)
HELD_WIDTH = 112  # ... and holds clips this wide while HOLD_FILE exists (no other test uses it)
# Ray's workers inherit the test process's environment, so they see the same temporary folder
HOLD_FILE = Path(tempfile.gettempdir()) / f"previz-test-hold-{HELD_WIDTH}"
MAX_HOLD_S = 600.0  # a hold file left behind by a killed test holds nothing for longer


def block_test_width(pixels: np.ndarray) -> str | None:
    """The session cluster's frame check: clips BLOCKED_WIDTH pixels wide count as `violence_graphic`;
    clips HELD_WIDTH wide wait in the check while HOLD_FILE exists, so that their jobs hold the Scheduler's
    slots for as long as a test needs (test_studio_director fills the slots to queue a board for certain)."""
    if pixels.shape[2] == HELD_WIDTH:
        deadline = time.monotonic() + MAX_HOLD_S
        while HOLD_FILE.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
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
