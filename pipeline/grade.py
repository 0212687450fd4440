"""Grader: colour looks applied to decoded frames before encoding: the built-in `none` and `film`, or a
project's .cube LUT (pipeline.lut)."""

from __future__ import annotations

import numpy as np

from pipeline.frames import Frames
from pipeline.lut import Lut

LOOKS = ("none", "film")
LOOK_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"  # a look's name: `none`, `film` or a project's LUT
_CHUNK_FRAMES = 8  # frames graded per float32 pass: bounds memory to ~8 x 4 bytes x pixels x 3

# film look parameters, in [0, 1] display values
_BLACK_LIFT = 0.035  # where pure black lands: milky film blacks
_WHITE_ROLLOFF = 0.955  # where pure white lands: highlights roll off instead of clipping
_S_CURVE_AMOUNT = 0.4  # blend of smoothstep into identity: soft contrast in the midtones
_HIGHLIGHT_TINT = np.array([0.030, 0.010, -0.025], dtype=np.float32)  # warm amber in the highlights
_SHADOW_TINT = np.array([0.008, 0.0, 0.015], dtype=np.float32)  # faint cool-violet in the shadows
_GRAIN_STRENGTH = 0.03  # std of the luminance grain at mid-grey
_LUMA = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)  # Rec.709 luma weights


class Grader:
    """Applies one look: `none` (identity), `film` (tone curve, warm split-tone, seeded grain), or a LUT
    registered under the look's name (`lut`)."""

    def __init__(self, look: str = "none", lut: Lut | None = None) -> None:
        if lut is None and look not in LOOKS:
            raise ValueError(f"`look` must be one of {', '.join(LOOKS)} but is {look!r}.")
        if lut is not None and look in LOOKS:
            raise ValueError(f"`look` {look!r} is built in; a LUT cannot be given for it.")
        self.look = look
        self.lut = lut

    def grade(self, frames: Frames, seed: int) -> Frames:
        """Grade `frames`; the same seed gives identical bytes, a different seed different grain."""
        if self.lut is not None:
            return self.lut.apply(frames)
        if self.look == "none":
            return frames
        rng = np.random.default_rng(seed)
        out = np.empty_like(frames.pixels)
        for start in range(0, frames.num_frames, _CHUNK_FRAMES):
            stop = min(start + _CHUNK_FRAMES, frames.num_frames)
            out[start:stop] = _film(frames.pixels[start:stop], rng)
        return Frames(pixels=out, fps=frames.fps)


def _film(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, h, w, 3) uint8 -> film-graded uint8; draws fresh grain for every frame from `rng`."""
    x = pixels.astype(np.float32) * np.float32(1 / 255)
    # tone curve: soft S (smoothstep blended into identity), then lifted blacks and rolled-off whites
    s_curve = x * x * (3.0 - 2.0 * x)
    x = x + np.float32(_S_CURVE_AMOUNT) * (s_curve - x)
    x = np.float32(_BLACK_LIFT) + np.float32(_WHITE_ROLLOFF - _BLACK_LIFT) * x
    # split-tone by luminance: warm highlights, faintly cool shadows
    luma = x @ _LUMA  # (n, h, w)
    luma = luma[..., None]
    x = x + luma * luma * _HIGHLIGHT_TINT + (1.0 - luma) ** 2 * _SHADOW_TINT
    # luminance grain: same offset on all channels, strongest in the midtones, new per frame
    grain = rng.standard_normal(luma.shape, dtype=np.float32)
    midtones = np.float32(0.35) + np.float32(2.6) * luma * (1.0 - luma)  # 0.35 at black/white, 1.0 at grey
    x = x + np.float32(_GRAIN_STRENGTH) * midtones * grain
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
