"""VAEEncoder stage: a shot's keyframes (its first frame, optionally its last) → the I2V condition.

Wan2.2-I2V-A14B's experts take 36 input channels: the 16 noise latents plus a 20-channel condition made
once per request and fixed for every step: 4 mask channels (which video frames of each latent frame are
given) and the VAE latents of a clip-length video that holds the keyframes and zeros elsewhere. This
module makes it exactly as diffusers' `WanImageToVideoPipeline.prepare_latents` does (diffusers 0.42,
`expand_timesteps=False`, the A14B path), so the engine's rows equal the reference's: the video
condition is encoded whole (a clip-length tensor: about as costly as a decode), its latents taken at the
distribution's mode (`sample_mode="argmax"`) and normalised with the VAE's latents mean and std.

Keyframes arrive as uint8 RGB arrays already at the request's size (the job's stored artifacts are
resized and cropped by the input side: serve.jobs.keyframes); they are mapped to [-1, 1] as diffusers'
VaeImageProcessor does (x / 255 * 2 - 1, float32). A last frame is what `last_image` does in diffusers:
an experimental first-and-last-frame shot (Wan2.2 I2V was not trained for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from pipeline.vae import decode_dtype


@dataclass(frozen=True, slots=True)
class Keyframes:
    """The images a shot is conditioned on, uint8 (height, width, 3) RGB at the request's size."""

    first: np.ndarray  # the shot's first frame (a storyboard panel, or the previous take's last frame)
    last: np.ndarray | None = None  # its last frame (experimental: Wan2.2 I2V was not trained for it)

    def __post_init__(self) -> None:
        for name, image in (("first", self.first), ("last", self.last)):
            if image is None:
                continue
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(
                    f"keyframe `{name}` must be uint8 (height, width, 3) RGB but is {image.dtype} "
                    f"{tuple(image.shape)}."
                )
        if self.last is not None and self.last.shape != self.first.shape:
            raise ValueError(
                f"keyframes `first` {tuple(self.first.shape)} and `last` {tuple(self.last.shape)} must have "
                "the same size."
            )


def to_unit_range(image: np.ndarray) -> torch.Tensor:
    """uint8 (height, width, 3) → float32 (3, height, width) in [-1, 1], as VaeImageProcessor.preprocess."""
    pixels = torch.from_numpy(image.astype(np.float32) / 255.0)
    return (pixels * 2.0 - 1.0).permute(2, 0, 1)


def condition_mask(
    num_frames: int, latent_shape: tuple[int, int, int], *, has_last: bool, stride: int = 4
) -> torch.Tensor:
    """(`stride`, latent_frames, latent_height, latent_width) float32: 1 where a video frame is given (the
    first, and the last with `has_last`), the first frame repeated over the first latent frame's `stride`
    slots (the causal VAE's first latent frame is one video frame)."""
    latent_frames, height, width = latent_shape
    mask = torch.zeros(1, num_frames, height, width)
    mask[:, 0] = 1.0
    if has_last:
        mask[:, -1] = 1.0
    mask = torch.cat([mask[:, :1].repeat_interleave(stride, dim=1), mask[:, 1:]], dim=1)
    return mask.view(latent_frames, stride, height, width).transpose(0, 1).contiguous()


class VAEEncoder:
    """Encode one request's keyframes into its condition, on the VAE's device.

    It owns its VAE's dtype as the VAEDecoder does (None: bfloat16 on CUDA, float32 elsewhere); a VAE
    shared with a decoder in one process computes in whichever dtype both were given."""

    def __init__(self, vae: AutoencoderKLWan, *, dtype: torch.dtype | None = None) -> None:
        self.vae = vae
        self.dtype = dtype if dtype is not None else decode_dtype("auto", self.device)
        if vae.dtype != self.dtype:
            vae.to(dtype=self.dtype)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def temporal_stride(self) -> int:
        return int(self.vae.config.scale_factor_temporal)

    @torch.inference_mode()
    def encode(self, keyframes: Keyframes, num_frames: int) -> torch.Tensor:
        """The condition of a clip of `num_frames` frames (4k + 1): (20, latent_frames, latent_height,
        latent_width) float32 on CPU, mask channels first, as the I2V experts take it after the latents."""
        stride = self.temporal_stride
        if num_frames < 1 or (num_frames - 1) % stride:
            raise ValueError(f"`num_frames` must be {stride}k + 1 but is {num_frames}.")
        if keyframes.last is not None and num_frames < 2:
            raise ValueError("a last keyframe needs a clip of at least 2 frames.")
        first = to_unit_range(keyframes.first)
        channels, height, width = first.shape
        scale = int(self.vae.config.scale_factor_spatial)
        if height % scale or width % scale:
            raise ValueError(
                f"keyframes must be a multiple of {scale} pixels a side but are {width}x{height}."
            )
        video = first.new_zeros(1, channels, num_frames, height, width)
        video[0, :, 0] = first
        if keyframes.last is not None:
            video[0, :, -1] = to_unit_range(keyframes.last)
        latents = self.vae.encode(video.to(self.device, self.dtype)).latent_dist.mode().float()
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents)
        latents = ((latents - mean) * inv_std)[0].cpu()
        has_last = keyframes.last is not None
        mask = condition_mask(num_frames, tuple(latents.shape[1:]), has_last=has_last, stride=stride)
        return torch.cat([mask, latents], dim=0)
