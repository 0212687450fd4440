"""VAEDecoder stage: latents → 8-bit RGB frames, one latent frame (4 video frames) at a time.

AutoencoderKLWan is causal in time and decodes latent frame by latent frame with a feature cache; this
stage runs the same loop but converts each chunk to uint8 as it comes, so peak memory is the uint8 clip
plus one float chunk instead of the whole float video.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from pipeline._compat import unpatchify
from pipeline.frames import Frames


class VAEDecoder:
    """Decode one request's latents to frames."""

    def __init__(self, vae: AutoencoderKLWan, *, spatial_tiling: bool = False) -> None:
        self.vae = vae
        if spatial_tiling:
            vae.enable_tiling()

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
        """Float frames in [0, 1], shaped (frames, height, width, 3), chunk by chunk in order.

        `latents` is (channels, latent_frames, latent_height, latent_width) as the denoisers produce it.
        """
        z = self.denormalize(latents[None].to(self.device, torch.float32))
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

    def decode(
        self, latents: torch.Tensor, *, fps: int, progress: Callable[[int, int], None] | None = None
    ) -> Frames:
        """The whole clip as uint8 frames."""
        num_chunks = latents.shape[1]
        chunks = []
        for done, chunk in enumerate(self.decode_chunks(latents), start=1):
            chunks.append(to_uint8(chunk))
            if progress is not None:
                progress(done, num_chunks)
        return Frames(pixels=np.concatenate(chunks), fps=fps)


def _to_unit_frames(video: torch.Tensor) -> torch.Tensor:
    """(1, 3, frames, height, width) in [-1, 1] → (frames, height, width, 3) in [0, 1], float32 on CPU."""
    return (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).cpu()


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Float frames in [0, 1] → uint8, rounding like diffusers' numpy_to_pil."""
    return (frames.numpy() * 255).round().astype(np.uint8)
