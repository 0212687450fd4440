"""Decoded video frames: the typed boundary between VAEDecoder, Upscaler, Grader and VideoWriter."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Frames:
    """A clip as 8-bit RGB frames; uint8 keeps a 720p × 81 clip at ~224 MB for the object store."""

    pixels: np.ndarray  # (num_frames, height, width, 3) uint8 RGB
    fps: int  # playback rate the clip was generated for

    def __post_init__(self) -> None:
        if self.pixels.ndim != 4 or self.pixels.shape[-1] != 3:
            raise ValueError(
                f"`pixels` must have shape (frames, height, width, 3) but has {self.pixels.shape}."
            )
        if self.pixels.dtype != np.uint8:
            raise ValueError(f"`pixels` must be uint8 but is {self.pixels.dtype}.")
        if self.fps <= 0:
            raise ValueError(f"`fps` must be positive but is {self.fps}.")

    @property
    def num_frames(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[2])
