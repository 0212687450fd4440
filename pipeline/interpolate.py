"""Frame-rate conform: a clip generated at 16 fps retimed to 24 or 25 fps by motion interpolation.

Output frame j shows source time j / target_fps, i.e. source position p = j · source_fps / target_fps;
a position between frames a = floor(p) and a + 1 is synthesised at t = p − a by an `Interpolator`:

- `FlowInterpolator` (no weights): OpenCV's DIS optical flow both ways between the two frames, each
  frame backward-warped to time t (the flow to t approximated from the two flows, as Super SloMo does)
  and the two blended by distance in time.
- `ModelInterpolator`: a RIFE-family network. There is no well-kept loader library for RIFE checkpoints
  (spandrel, which loads the SR weights, covers single-image models only), so the weights are a
  `torch.export` program (`.pt2`) of the network with RIFE v4's call `model(img0, img1, timestep) -> img`,
  images (1, 3, h, w) in [0, 1] and timestep (1, 1, h, w), h and w dynamic multiples of `pad_to`.

The output has round(num_frames · target / source) frames, so its duration at the target rate is the
source's (exact whenever that product is whole, e.g. 16 → 24 of 16 or 80 frames); positions past the
last source frame hold it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.frames import Frames

CONFORM_RATES = (16, 24, 25)  # what `fps` may be: Wan2.2's own rate and the two editorial ones
_DIS_PRESET = cv2.DISOPTICAL_FLOW_PRESET_MEDIUM


def conform_frame_count(num_frames: int, source_fps: int, target_fps: int) -> int:
    """Frames of a `num_frames` clip at `source_fps` retimed to `target_fps` (same duration)."""
    if num_frames <= 0 or source_fps <= 0 or target_fps <= 0:
        raise ValueError(
            f"`num_frames`, `source_fps` and `target_fps` must be positive but are "
            f"{num_frames}, {source_fps} and {target_fps}."
        )
    return max(1, round(num_frames * target_fps / source_fps))


class Interpolator(ABC):
    """Makes the frames between two frames of a clip."""

    @abstractmethod
    def between(self, first: np.ndarray, second: np.ndarray, times: list[float]) -> list[np.ndarray]:
        """(h, w, 3) uint8 frames at each t in `times` (0 < t < 1) between `first` (t=0) and `second`."""


class FlowInterpolator(Interpolator):
    """Bidirectional DIS optical flow and backward warping; needs no weights."""

    def __init__(self, preset: int = _DIS_PRESET) -> None:
        self._dis = cv2.DISOpticalFlow_create(preset)

    def between(self, first: np.ndarray, second: np.ndarray, times: list[float]) -> list[np.ndarray]:
        gray0 = cv2.cvtColor(first, cv2.COLOR_RGB2GRAY)
        gray1 = cv2.cvtColor(second, cv2.COLOR_RGB2GRAY)
        flow01 = self._dis.calc(gray0, gray1, None)  # (h, w, 2): where each pixel of `first` goes
        flow10 = self._dis.calc(gray1, gray0, None)
        height, width = gray0.shape
        grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        out = []
        for t in times:
            # flows from time t back to each frame (linear motion through t, Super SloMo's approximation)
            flow_t0 = -(1 - t) * t * flow01 + t * t * flow10
            flow_t1 = (1 - t) * (1 - t) * flow01 - t * (1 - t) * flow10
            warped0 = _warp(first, grid_x, grid_y, flow_t0)
            warped1 = _warp(second, grid_x, grid_y, flow_t1)
            blended = (1 - t) * warped0.astype(np.float32) + t * warped1.astype(np.float32)
            out.append(np.clip(blended + 0.5, 0, 255).astype(np.uint8))
        return out


def _warp(image: np.ndarray, grid_x: np.ndarray, grid_y: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """`image` sampled at (x, y) + flow: backward warping, edges replicated."""
    map_x = grid_x + flow[..., 0]
    map_y = grid_y + flow[..., 1]
    return cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


class ModelInterpolator(Interpolator):
    """A RIFE-family network: `model(img0, img1, timestep) -> img` on (n, 3, h, w) tensors in [0, 1]."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", pad_to: int = 32) -> None:
        if pad_to <= 0:
            raise ValueError(f"`pad_to` must be positive but is {pad_to}.")
        self.model = model.to(device)
        self.device = torch.device(device)
        self.pad_to = pad_to  # RIFE's pyramid halves the image several times: sizes must divide

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> ModelInterpolator:
        """Load a `torch.export.save` program (.pt2) of a RIFE-family network."""
        try:
            program = torch.export.load(str(path))
        except (RuntimeError, ValueError, KeyError, OSError) as error:
            raise ValueError(
                f"`path` {str(path)!r} is not a torch.export program of a frame-interpolation network: "
                f"{error}"
            ) from None
        return cls(program.module(), device)

    def between(self, first: np.ndarray, second: np.ndarray, times: list[float]) -> list[np.ndarray]:
        if not times:
            return []
        height, width = first.shape[:2]
        pad_h, pad_w = -height % self.pad_to, -width % self.pad_to
        with torch.inference_mode():
            pair = torch.from_numpy(np.stack([first, second])).to(self.device)
            pair = pair.permute(0, 3, 1, 2).float() / 255.0
            pair = torch.nn.functional.pad(pair, (0, pad_w, 0, pad_h), mode="replicate")
            out = []
            for t in times:  # one timestep a call: RIFE v4 runs its whole pyramid per timestep anyway
                timestep = torch.full((1, 1, height + pad_h, width + pad_w), t, device=self.device)
                result = self.model(pair[0:1], pair[1:2], timestep)[:, :, :height, :width]
                result = (result.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
                out.append(result[0].permute(1, 2, 0).cpu().numpy())
        return out


def conform(frames: Frames, target_fps: int, interpolator: Interpolator | None = None) -> Frames:
    """`frames` retimed to `target_fps` with the same duration; the clip itself when the rate is already
    `target_fps`. Whole positions reuse source frames; the ones between are made by `interpolator`
    (default: FlowInterpolator)."""
    if target_fps <= 0:
        raise ValueError(f"`target_fps` must be positive but is {target_fps}.")
    if target_fps == frames.fps:
        return frames
    interpolator = interpolator or FlowInterpolator()
    num_out = conform_frame_count(frames.num_frames, frames.fps, target_fps)
    last = frames.num_frames - 1
    # source frame a -> [(output index, t)] for the outputs between frames a and a + 1
    pending: dict[int, list[tuple[int, float]]] = {}
    out = np.empty((num_out, frames.height, frames.width, 3), dtype=np.uint8)
    for index in range(num_out):
        # exact rational position: index · fps / target, split into a whole frame and a remainder
        whole, remainder = divmod(index * frames.fps, target_fps)
        if whole >= last or remainder == 0:
            out[index] = frames.pixels[min(whole, last)]
        else:
            pending.setdefault(whole, []).append((index, remainder / target_fps))
    for first, wanted in pending.items():
        made = interpolator.between(
            frames.pixels[first], frames.pixels[first + 1], [t for _index, t in wanted]
        )
        for (index, _t), frame in zip(wanted, made, strict=True):
            out[index] = frame
    return Frames(pixels=out, fps=target_fps)
