"""VAEDecoder stage: latents → 8-bit RGB frames, one latent frame (4 video frames) at a time, or in
spatial tiles when full frames would not fit the device's free memory (pipeline.vae_memory).

AutoencoderKLWan is causal in time and decodes latent frame by latent frame with a feature cache; this
stage runs the same loop but converts each chunk to uint8 on the device as it comes, into one uint8 clip
preallocated there, so peak memory is the uint8 clip plus one float chunk instead of the whole float
video, and the clip crosses to the host in one copy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from pipeline._compat import unpatchify
from pipeline.frames import Frames
from pipeline.vae_memory import DecodePlan, free_device_bytes, plan_decode

logger = logging.getLogger(__name__)

# The decoder's compute dtype: `auto` is bfloat16 on CUDA (the official VAE decodes 480p/81 frames in bf16
# in about 5.5 s on an H100) and float32 elsewhere (bf16 convolutions on CPU are slow and inexact).
DecodeDtype = Literal["auto", "float32", "bfloat16"]
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def decode_dtype(setting: DecodeDtype, device: torch.device) -> torch.dtype:
    """The torch dtype a decoder on `device` computes in for `setting`."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[setting]


def num_video_frames(num_latent_frames: int, temporal_stride: int = 4) -> int:
    """Frames a causal decoder makes of `num_latent_frames`: the first latent frame is one video frame,
    every later one `temporal_stride` (81 frames of 21 latent frames)."""
    return (num_latent_frames - 1) * temporal_stride + 1


class VAEDecoder:
    """Decode one request's latents to frames.

    The decoder owns its VAE's dtype: it casts the VAE to `dtype` once (None: `decode_dtype("auto")` for
    the VAE's device), so a replica that shares its VAE with nothing else decodes in bf16 on a GPU. Each
    `decode` plans full frames or tiles for the memory free at that moment (`plan`), bounded further by
    `memory_bound_bytes` when given; `spatial_tiling` always tiles.
    """

    def __init__(
        self,
        vae: AutoencoderKLWan,
        *,
        spatial_tiling: bool = False,
        dtype: torch.dtype | None = None,
        memory_bound_bytes: int | None = None,
    ) -> None:
        self.vae = vae
        self.dtype = dtype if dtype is not None else decode_dtype("auto", self.device)
        if vae.dtype != self.dtype:
            vae.to(dtype=self.dtype)
        self.spatial_tiling = spatial_tiling
        self.memory_bound_bytes = memory_bound_bytes

    def plan(self, latent_shape: tuple[int, ...]) -> DecodePlan:
        """How latents of `latent_shape` (channels, frames, height, width) are decoded now: full frames if
        they fit the smaller of the device's free memory and the configured bound, else tiles."""
        return plan_decode(
            self.vae.config,
            tuple(latent_shape),
            self.dtype,
            self.budget_bytes(),
            force_tiling=self.spatial_tiling,
        )

    def budget_bytes(self) -> int | None:
        """The memory a decode may plan for now: the smaller of the device's free memory and the configured
        bound (None: neither is known, as on CPU without a bound)."""
        bounds = [b for b in (free_device_bytes(self.device), self.memory_bound_bytes) if b is not None]
        return min(bounds) if bounds else None

    def apply(self, plan: DecodePlan) -> None:
        """Switch the VAE to `plan`'s way of decoding (diffusers' tiling, with the plan's tile)."""
        if plan.tile is None:
            self.vae.disable_tiling()
            return
        side, stride = plan.tile
        self.vae.enable_tiling(side, side, stride, stride)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the latent normalisation the DiT works in (latents / std + mean), as WanPipeline does."""
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents)
        return latents / inv_std + mean

    @torch.inference_mode()
    def decode_chunks(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Float frames in [0, 1], shaped (frames, height, width, 3), float32 on the decoder's device,
        chunk by chunk in order.

        `latents` is (channels, latent_frames, latent_height, latent_width) as the denoisers produce it;
        the normalisation is undone in float32, then the VAE runs in the decoder's dtype.
        """
        z = self.denormalize(latents[None].to(self.device, torch.float32)).to(self.dtype)
        vae = self.vae
        if vae.use_tiling:
            yield _to_unit_frames(vae.decode(z, return_dict=False)[0])
            return
        vae.clear_cache()
        try:
            x = vae.post_quant_conv(z)
            for index in range(x.shape[2]):
                vae._conv_idx = [0]
                out = vae.decoder(
                    x[:, :, index : index + 1],
                    feat_cache=vae._feat_map,
                    feat_idx=vae._conv_idx,
                    first_chunk=index == 0,
                )
                if vae.config.patch_size is not None:
                    out = unpatchify(out, patch_size=vae.config.patch_size)
                yield _to_unit_frames(torch.clamp(out, min=-1.0, max=1.0))
        finally:
            vae.clear_cache()

    @torch.inference_mode()
    def decode(
        self,
        latents: torch.Tensor,
        *,
        fps: int,
        progress: Callable[[int, int], None] | None = None,
        plan: DecodePlan | None = None,
    ) -> Frames:
        """The whole clip as uint8 frames, made on the device and copied to the host once, the way `plan`
        says (None: `self.plan(latents.shape)`)."""
        plan = plan if plan is not None else self.plan(latents.shape)
        if plan.tile is not None:
            log = logger.info if plan.fits else logger.warning
            log("VAE decode of latents %s in %s", tuple(latents.shape), plan.describe())
        self.apply(plan)
        _, num_latent_frames, latent_height, latent_width = latents.shape
        scale = self.vae.spatial_compression_ratio
        clip = torch.empty(
            (num_video_frames(num_latent_frames), latent_height * scale, latent_width * scale, 3),
            dtype=torch.uint8,
            device=self.device,
        )
        pixels = fill_clip(clip, self.decode_chunks(latents), num_latent_frames, progress)
        return Frames(pixels=pixels, fps=fps)


def fill_clip(
    clip: torch.Tensor,
    chunks: Iterator[torch.Tensor],
    num_chunks: int,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Write float chunks in [0, 1] into the preallocated uint8 `clip` in order, then copy it to the host
    (one copy). A chunk may hold the whole clip (tiled decode): progress then jumps to the end."""
    start = 0
    for done, chunk in enumerate(chunks, start=1):
        clip[start : start + chunk.shape[0]] = to_uint8(chunk)
        start += chunk.shape[0]
        if progress is not None:
            progress(num_chunks if start == clip.shape[0] else done, num_chunks)
    if start != clip.shape[0]:
        raise RuntimeError(f"The decoder made {start} frames but the clip has {clip.shape[0]}.")
    return clip.cpu().numpy()


def _to_unit_frames(video: torch.Tensor) -> torch.Tensor:
    """(1, 3, frames, height, width) in [-1, 1] → (frames, height, width, 3) in [0, 1], float32 in place."""
    return (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Float frames in [0, 1] → uint8 on their device, rounding half to even like diffusers' numpy_to_pil
    (`(frames * 255).round().astype(np.uint8)`), so CPU float32 frames equal the numpy path bit for bit."""
    return (frames * 255).round().to(torch.uint8)
