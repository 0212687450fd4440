"""Upscaler: neural super-resolution (Real-ESRGAN family, loaded through spandrel) to an exact size.

Wan2.2 drafts come out at 480p; the SR stage turns them into 720p/1080p previews. The network runs
over chunks of frames so memory stays bounded by `chunk_frames`, then one resize lands on the exact
target size (the network's integer scale rarely matches it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from spandrel import ImageModelDescriptor, ModelLoader
from spandrel.architectures.Compact import Compact

from pipeline.frames import Frames

UPSCALE_TARGETS = ("none", "720p", "1080p")
_SHORT_SIDE = {"720p": 720, "1080p": 1080}  # target -> short side in pixels


def upscale_target_size(target: str, width: int, height: int) -> tuple[int, int]:
    """(width, height) for `target`: the short side becomes 720/1080, the long side keeps the aspect ratio."""
    if target not in UPSCALE_TARGETS:
        raise ValueError(f"`upscale` must be one of {', '.join(UPSCALE_TARGETS)} but is {target!r}.")
    if width <= 0 or height <= 0:
        raise ValueError(f"`width` and `height` must be positive but are {width} and {height}.")
    if target == "none":
        return width, height
    short = _SHORT_SIDE[target]
    if width >= height:
        return _round_even(width * short / height), short
    return short, _round_even(height * short / width)


def _round_even(value: float) -> int:
    return max(2, 2 * round(value / 2))


class Upscaler:
    """A super-resolution stage around a spandrel `ImageModelDescriptor` (RGB in, RGB out, integer scale)."""

    def __init__(self, descriptor: ImageModelDescriptor) -> None:
        if not isinstance(descriptor, ImageModelDescriptor):
            raise TypeError(
                f"`descriptor` must be a spandrel ImageModelDescriptor but is {type(descriptor).__name__}."
            )
        if descriptor.purpose != "SR":
            raise ValueError(
                f"`descriptor` must be a super-resolution model (purpose 'SR') but "
                f"{descriptor.architecture.name} has purpose {descriptor.purpose!r}."
            )
        if descriptor.input_channels != 3 or descriptor.output_channels != 3:
            raise ValueError(
                f"The SR model must map 3 RGB channels to 3 but maps "
                f"{descriptor.input_channels} to {descriptor.output_channels}."
            )
        if descriptor.scale < 2:
            raise ValueError(f"The SR model's `scale` must be at least 2 but is {descriptor.scale}.")
        self.descriptor = descriptor.eval()

    @property
    def scale(self) -> int:
        return int(self.descriptor.scale)

    @classmethod
    def from_file(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> Upscaler:
        """Load Real-ESRGAN-family weights (.pth / .safetensors) through spandrel."""
        with torch.random.fork_rng(devices=[]):  # spandrel builds the module with random init first
            descriptor = ModelLoader().load_from_file(path)
        if not isinstance(descriptor, ImageModelDescriptor):
            raise ValueError(
                f"`path` must hold an image-to-image SR model but {str(path)!r} is a "
                f"{type(descriptor).__name__} ({descriptor.architecture.name})."
            )
        return cls(descriptor.to(device=torch.device(device), dtype=dtype))

    @classmethod
    def compact_random(
        cls,
        seed: int,
        scale: int = 2,
        num_feat: int = 16,
        num_conv: int = 4,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Upscaler:
        """SRVGGNetCompact (Real-ESRGAN compact) with seeded random weights, identical on every machine.

        Weights are drawn on CPU from a private `torch.Generator` (the global RNG is untouched). The last
        conv is small, so the output is the nearest-upscaled frame plus a mild learned-looking residual.
        """
        if scale < 2:
            raise ValueError(f"`scale` must be at least 2 but is {scale}.")
        if num_feat <= 0 or num_conv <= 0:
            raise ValueError(f"`num_feat` and `num_conv` must be positive but are {num_feat} and {num_conv}.")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.device("meta"):
            template = Compact(num_in_ch=3, num_out_ch=3, num_feat=num_feat, num_conv=num_conv, upscale=scale)
        last_conv = f"body.{len(template.body) - 1}"
        state_dict: dict[str, torch.Tensor] = {}
        for name, param in template.state_dict().items():
            if name.endswith(".bias"):
                state_dict[name] = torch.zeros(param.shape)
            elif param.ndim == 1:  # PReLU slopes
                state_dict[name] = torch.full(param.shape, 0.25)
            else:  # conv weight (out, in, kh, kw): variance-preserving normal, last conv damped
                fan_in = param.shape[1] * param.shape[2] * param.shape[3]
                std = (0.1 if name.startswith(last_conv) else 1.0) / fan_in**0.5
                state_dict[name] = torch.randn(param.shape, generator=generator) * std
        with torch.random.fork_rng(devices=[]):  # spandrel builds the module with random init first
            descriptor = ModelLoader().load_from_state_dict(state_dict)
        return cls(descriptor.to(device=torch.device(device), dtype=dtype))

    def save(self, path: str | Path) -> Path:
        """Write the weights in the layout spandrel detects (.safetensors, otherwise a torch .pth)."""
        path = Path(path)
        state_dict = {
            k: v.detach().to("cpu").contiguous() for k, v in self.descriptor.model.state_dict().items()
        }
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state_dict, str(path))
        else:
            torch.save(state_dict, path)
        return path

    def upscale(
        self,
        frames: Frames,
        target_width: int,
        target_height: int,
        *,
        chunk_frames: int = 8,
        progress: Callable[[int, int], None] | None = None,
    ) -> Frames:
        """Super-resolve `frames` and resize to exactly `target_width` x `target_height` (even sizes).

        A target equal to the input returns the input unchanged; a target no larger than the input on
        both sides is a plain antialiased resize (the network would only add work). `progress` is
        called as progress(frames_done, num_frames) after each chunk.
        """
        for name, value in (("target_width", target_width), ("target_height", target_height)):
            if value <= 0 or value % 2:
                raise ValueError(
                    f"`{name}` must be a positive even number (H.264 yuv420p needs even sizes) "
                    f"but is {value}."
                )
        if chunk_frames <= 0:
            raise ValueError(f"`chunk_frames` must be positive but is {chunk_frames}.")
        if (target_width, target_height) == (frames.width, frames.height):
            return frames
        use_network = target_width > frames.width or target_height > frames.height
        out = np.empty((frames.num_frames, target_height, target_width, 3), dtype=np.uint8)
        with torch.inference_mode():
            for start in range(0, frames.num_frames, chunk_frames):
                stop = min(start + chunk_frames, frames.num_frames)
                out[start:stop] = self._upscale_chunk(
                    frames.pixels[start:stop], target_width, target_height, use_network
                )
                if progress is not None:
                    progress(stop, frames.num_frames)
        return Frames(pixels=out, fps=frames.fps)

    def _upscale_chunk(
        self, pixels: np.ndarray, target_width: int, target_height: int, use_network: bool
    ) -> np.ndarray:
        # (n, h, w, 3) uint8 -> (n, 3, h, w) in [0, 1] on the model's device and dtype
        x = torch.tensor(pixels, device=self.descriptor.device).permute(
            0, 3, 1, 2
        )  # copy: input may be read-only
        x = x.to(self.descriptor.dtype) / 255.0
        if use_network:
            x = self.descriptor(x)
        x = _resize(x, target_width, target_height)
        x = (x.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()


def resize_frames(frames: Frames, width: int, height: int) -> Frames:
    """Plain bicubic resize, for models configured without an SR network."""
    if (width, height) == (frames.width, frames.height):
        return frames
    x = torch.from_numpy(frames.pixels).permute(0, 3, 1, 2).float() / 255.0
    x = (_resize(x, width, height).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return Frames(pixels=x.permute(0, 2, 3, 1).contiguous().numpy(), fps=frames.fps)


def _resize(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(n, 3, h, w) float → (n, 3, height, width); antialiased when shrinking."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    downscaling = height < x.shape[-2] or width < x.shape[-1]
    return F.interpolate(x.float(), size=(height, width), mode="bicubic", antialias=downscaling)
