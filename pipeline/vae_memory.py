"""How a decode fits the device: full frames, or spatial tiles small enough for the memory it has.

The estimate is a model, not a measurement: the peak of a causal Wan VAE decode is set by its full-
resolution stage (the last up block runs `base_dim * dim_mult[0]` channels over the chunk's 4 frames at
full size, and the upsample before it twice that), so it is ACTIVATION_FACTOR of those tensors, plus the
clip being built. The factor is calibrated on the published figure of the official VAE (bf16, 480p/81
frames: 10.1 GB on an H100, i.e. 33 such tensors with the float video the reference keeps) and checked
against CPU measurements on the `small` preset (18-20 at 480p); `loadtest/gpu_probe.py` prints the peak
a GPU reaches beside this estimate.

Tiled decode is diffusers' own (`AutoencoderKLWan.enable_tiling`): each tile runs the causal loop over
every frame, then the tiles are blended, so it keeps a few float copies of the whole video
(TILED_VIDEO_COPIES) but only one tile's activations at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ACTIVATION_FACTOR = 32  # full-resolution activation tensors alive at the peak of one chunk
TILED_VIDEO_COPIES = (
    4  # float copies of the whole video a tiled decode holds (tiles, blended rows, cat, clamp)
)
MEMORY_MARGIN = 0.9  # of the free memory a plan may use (allocator fragmentation, cuDNN workspaces)
# Square tiles tried in order, in output pixels, each with its stride (overlap = tile - stride, blended):
# diffusers' default 256/192 first, then smaller; strides are multiples of the VAE's 8-pixel stride.
TILES: tuple[tuple[int, int], ...] = ((256, 192), (128, 96), (64, 48))

DecodeMode = Literal["full", "tiled"]


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """How one clip is decoded, and why: what the decoder reports in its metrics and logs."""

    mode: DecodeMode  # full frames, or spatial tiles
    tile: tuple[int, int] | None  # (tile side, stride) in output pixels when tiled
    estimate_bytes: int  # device memory the plan is expected to hold at its peak
    budget_bytes: int | None  # the memory it had to fit (free memory, or the configured bound); None: any
    fits: bool  # False: even the smallest tile exceeds the budget (decoded with it anyway, and logged)

    def describe(self) -> str:
        how = "full frames" if self.tile is None else f"{self.tile[0]}-pixel tiles (stride {self.tile[1]})"
        budget = "no bound" if self.budget_bytes is None else f"{self.budget_bytes / 2**30:.2f} GiB free"
        return f"{how}: about {self.estimate_bytes / 2**30:.2f} GiB of {budget}"


def full_resolution_channels(vae_config) -> int:
    """Channels of the Wan decoder's last up block, which runs at full resolution (96 for Wan2.1)."""
    return int(vae_config.base_dim * vae_config.dim_mult[0])


def estimate_bytes(
    vae_config,
    latent_shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    tile: tuple[int, int] | None = None,
    temporal_stride: int = 4,
    spatial_stride: int = 8,
) -> int:
    """Peak device bytes of decoding latents of `latent_shape` (channels, frames, height, width) in `dtype`,
    in full frames (`tile` None) or in tiles of `tile` = (side, stride) output pixels."""
    _, num_latent_frames, latent_height, latent_width = latent_shape
    height, width = latent_height * spatial_stride, latent_width * spatial_stride
    num_frames = (num_latent_frames - 1) * temporal_stride + 1
    item = torch.empty((), dtype=dtype).element_size()
    clip = num_frames * height * width * 3  # the uint8 clip built on the device
    if tile is None:
        area, video = height * width, 0
    else:
        side = tile[0]
        area, video = (
            min(side, height) * min(side, width),
            TILED_VIDEO_COPIES * 3 * num_frames * height * width,
        )
    activations = ACTIVATION_FACTOR * full_resolution_channels(vae_config) * temporal_stride * area * item
    return int(activations + video * item + clip)


def plan_decode(
    vae_config,
    latent_shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    budget_bytes: int | None,
    *,
    force_tiling: bool = False,
) -> DecodePlan:
    """Full frames when they fit `budget_bytes` (None: always), else the largest tile that fits, else the
    smallest tile (`fits` False). `force_tiling` starts at the first tile (the `spatial_tiling` switch)."""
    usable = None if budget_bytes is None else int(budget_bytes * MEMORY_MARGIN)
    candidates: list[tuple[int, int] | None] = [*([] if force_tiling else [None]), *TILES]
    for tile in candidates:
        need = estimate_bytes(vae_config, latent_shape, dtype, tile)
        if usable is None or need <= usable:
            return DecodePlan("full" if tile is None else "tiled", tile, need, budget_bytes, True)
    return DecodePlan("tiled", TILES[-1], need, budget_bytes, False)


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device now (what the denoiser beside the decoder left); None elsewhere: on CPU
    the bound is the configured one only."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)
