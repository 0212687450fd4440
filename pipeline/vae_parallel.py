"""Parallel VAE decode over a process group: each rank decodes a band of rows of every frame.

The Wan VAE decoder is causal in time, so a rank's band needs nothing from the other ranks in time, only
a halo in space: before every convolution whose kernel is taller than one row, each rank takes the rows it
lacks from the ranks above and below it (zeros at the frame's top and bottom, as the convolution's own
padding would give). The decoder's norms are per pixel (RMS over channels) and its upsampling is nearest,
so they need nothing; the mid-block's attention, which attends over the whole frame, all-gathers its
input (cheap at latent resolution), attends on every rank and keeps its band. The frames are all-gathered
at the end of each chunk. Bands are unequal when the latent height does not divide: every rank needs one
latent row at least.

Written by hand on diffusers' `AutoencoderKLWan` (0.42): diffusers only tiles this VAE. xDiT's DistVAE
(PyPI `distvae` 0.1.0, github.com/xdit-project/DistVAE) has a `WanDecoderAdapter` that rebuilds the
decoder from sharded convolutions the same way; it is not a dependency of this project, so this module
patches the few layers that need it (WanCausalConv3d, the upsamplers' Conv2d, WanAttentionBlock) on a
copy of the VAE instead, keeping diffusers' own decode loop and feature cache.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d, WanResample
from torch import nn

from pipeline.vae import VAEDecoder
from pipeline.vae_memory import DecodePlan, plan_decode


def band_rows(num_rows: int, world_size: int) -> list[tuple[int, int]]:
    """(start, stop) latent rows of each rank: as equal as they come, the first ranks one row more."""
    if num_rows < world_size:
        raise ValueError(
            f"A parallel decode over {world_size} ranks needs at least {world_size} latent rows, but the "
            f"latents have {num_rows} (height {num_rows * 8} pixels)."
        )
    base, extra = divmod(num_rows, world_size)
    starts = [rank * base + min(rank, extra) for rank in range(world_size + 1)]
    return list(zip(starts[:-1], starts[1:], strict=True))


class Band:
    """This rank's place among the ranks of `group`, and the two collectives a band needs."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def with_halo(self, x: torch.Tensor, halo: int, dim: int) -> torch.Tensor:
        """`x` with `halo` rows of the neighbouring bands above and below it along `dim` (zeros beyond
        the frame's first and last rows)."""
        edges = torch.stack([x.narrow(dim, 0, halo), x.narrow(dim, x.shape[dim] - halo, halo)]).contiguous()
        gathered = [torch.empty_like(edges) for _ in range(self.world_size)]
        dist.all_gather(gathered, edges, group=self.group)
        above = gathered[self.rank - 1][1] if self.rank > 0 else torch.zeros_like(edges[1])
        below = gathered[self.rank + 1][0] if self.rank < self.world_size - 1 else torch.zeros_like(edges[0])
        return torch.cat([above, x, below], dim)

    def sizes(self, size: int) -> list[int]:
        """Every rank's `size`, in rank order."""
        sizes = [torch.zeros((), dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor(size, dtype=torch.int64), group=self.group)
        return [int(value) for value in sizes]

    def offset(self, size: int) -> int:
        """Where this band starts when every rank's band has its `size`."""
        return sum(self.sizes(size)[: self.rank])

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every band's `x` concatenated along `dim` in rank order (bands may differ in size along it)."""
        sizes = self.sizes(x.shape[dim])
        largest = max(sizes)
        padded = F.pad(x, _pad_along(x.ndim, dim, largest - x.shape[dim])).contiguous()
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded, group=self.group)
        return torch.cat([part.narrow(dim, 0, size) for part, size in zip(gathered, sizes, strict=True)], dim)


def _pad_along(ndim: int, dim: int, amount: int) -> tuple[int, ...]:
    """F.pad's argument that adds `amount` zeros at the end of `dim` only."""
    pad = [0] * (2 * ndim)
    pad[2 * (ndim - 1 - dim) + 1] = amount
    return tuple(pad)


def _causal_conv_forward(conv: WanCausalConv3d, band: Band, x: torch.Tensor, cache_x=None) -> torch.Tensor:
    """WanCausalConv3d.forward with the height padding taken from the neighbouring bands."""
    padding = list(conv._padding)  # (w, w, h, h, time before, time after)
    if cache_x is not None and padding[4] > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        padding[4] -= cache_x.shape[2]
    if padding[2] > 0:
        x = band.with_halo(x, padding[2], dim=3)
        padding[2] = padding[3] = 0
    return nn.Conv3d.forward(conv, F.pad(x, padding))


def _conv2d_forward(conv: nn.Conv2d, band: Band, x: torch.Tensor) -> torch.Tensor:
    """An upsampler's Conv2d (padding 1) with its height padding taken from the neighbouring bands."""
    halo, width_pad = conv.padding
    x = band.with_halo(x, halo, dim=2)
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, (0, width_pad), conv.dilation, conv.groups)


def _attention_forward(block: WanAttentionBlock, band: Band, forward, x: torch.Tensor) -> torch.Tensor:
    """The mid-block attention over the whole frame: gather the bands, attend, keep this band's rows."""
    whole = band.gather(x, dim=3)
    return forward(whole).narrow(3, band.offset(x.shape[3]), x.shape[3])


def shard_decoder(vae: AutoencoderKLWan, band: Band) -> AutoencoderKLWan:
    """A copy of `vae` whose decoder works on one band of rows (the original is left as it is)."""
    vae = copy.deepcopy(vae)
    for module in vae.decoder.modules():
        if isinstance(module, WanCausalConv3d):
            module.forward = functools.partial(_causal_conv_forward, module, band)
        elif isinstance(module, WanResample):
            for layer in module.resample:
                if isinstance(layer, nn.Conv2d):
                    if layer.padding[0] != layer.kernel_size[0] // 2 or layer.stride != (1, 1):
                        raise ValueError(f"A parallel decode cannot split {layer} (an encoder's resample?).")
                    layer.forward = functools.partial(_conv2d_forward, layer, band)
        elif isinstance(module, WanAttentionBlock):
            module.forward = functools.partial(_attention_forward, module, band, module.forward)
    return vae


class ParallelVAEDecoder(VAEDecoder):
    """A VAEDecoder over the ranks of `group`: every rank calls `decode` with the same latents, decodes
    its band of rows and gets the whole clip. Equal to the one-device decode within float rounding (the
    convolutions see the same numbers; only their summation order may differ)."""

    def __init__(
        self,
        vae: AutoencoderKLWan,
        group: dist.ProcessGroup | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.band = Band(group)
        super().__init__(shard_decoder(vae, self.band), dtype=dtype)

    def plan(self, latent_shape: tuple[int, ...]) -> DecodePlan:
        """Full frames always: the band is the split (tiles would cut it again)."""
        return plan_decode(self.vae.config, tuple(latent_shape), self.dtype, None)

    def decode_chunks(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """The whole frames, chunk by chunk: this rank's band decoded, every band gathered."""
        start, stop = band_rows(latents.shape[2], self.band.world_size)[self.band.rank]
        for chunk in super().decode_chunks(latents[:, :, start:stop]):
            yield self.band.gather(chunk, dim=1)  # (frames, height, width, 3): bands along height
