"""Parallel VAE decode over a process group: each rank decodes one block of every frame.

The ranks form a grid of `rows x cols` blocks over the latent frame (`grid_shape`: the factorisation of
the world size whose blocks have the shortest edges, since the halo a convolution exchanges is a block's
perimeter; 720p's 90 x 160 latents go 1 x 2 on 2 ranks, 2 x 2 on 4, 2 x 4 on 8). Blocks are unequal when
a side does not divide (the first blocks one latent row or column more); every block needs one latent row
and column at least.

The Wan VAE decoder is causal in time, so a block needs nothing from the other ranks in time, only a halo
in space: before every convolution whose kernel is wider than one pixel, each rank swaps edge rows with
the blocks above and below it, then edge columns (of the rows so extended, which brings the corners) with
the blocks left and right of it, point to point (zeros at the frame's edges, as the convolution's own
padding would give). The decoder's norms are per pixel (RMS over channels) and its upsampling is nearest,
so they need nothing; the mid-block's attention, which attends over the whole frame, all-gathers its
input (cheap at latent resolution), attends on every rank and keeps its block. The frames are
all-gathered at the end of each chunk.

Written by hand on diffusers' `AutoencoderKLWan` (0.42): diffusers only tiles this VAE. Checked first:
xDiT's `xfuser` parallelises image VAEs (`AutoencoderKL`) through DistVAE's `DecoderAdapter`, not the Wan
VAE; DistVAE itself (PyPI `distvae` 0.1.0, github.com/xdit-project/DistVAE) rebuilds decoders from patch
convolutions that split ONE dimension into bands (`Patchify`, height by default) and swap halos by
all-gather; LightX2V's own Wan VAE has a parallel decode with a 2-D split option (`use_2d_split`), the
idea followed here. None is a dependency of this project (nor built on diffusers' Wan classes), so this
module patches the few layers that need it (WanCausalConv3d, the upsamplers' Conv2d, WanAttentionBlock)
on a copy of the VAE, keeping diffusers' own decode loop and feature cache; the grid choice and the
point-to-point halo swap are this module's own.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d, WanResample
from torch import nn

from pipeline.vae import VAEDecoder
from pipeline.vae_memory import DecodePlan, plan_decode

Axis = Literal["rows", "cols"]


def band_rows(num_rows: int, num_bands: int) -> list[tuple[int, int]]:
    """(start, stop) of each of `num_bands` bands of `num_rows` latent rows (or columns): as equal as they
    come, the first bands one more."""
    if num_rows < num_bands:
        raise ValueError(
            f"A parallel decode in {num_bands} bands needs at least {num_bands} latent rows or columns, but "
            f"the latents have {num_rows} ({num_rows * 8} pixels)."
        )
    base, extra = divmod(num_rows, num_bands)
    starts = [band * base + min(band, extra) for band in range(num_bands + 1)]
    return list(zip(starts[:-1], starts[1:], strict=True))


def grid_shape(latent_height: int, latent_width: int, world_size: int) -> tuple[int, int]:
    """(rows, cols) of the blocks `world_size` ranks split a latent frame into: of the factorisations with a
    latent row and column for every block, the one whose largest block has the shortest half-perimeter
    (what each convolution exchanges); a tie splits rows (whole rows gather in one piece)."""
    best: tuple[int, int, int] | None = None  # (half-perimeter, cols, rows)
    for rows in range(1, world_size + 1):
        cols, rest = divmod(world_size, rows)
        if rest or rows > latent_height or cols > latent_width:
            continue
        edge = -(-latent_height // rows) + -(-latent_width // cols)
        if best is None or (edge, cols) < best[:2]:
            best = (edge, cols, rows)
    if best is None:
        raise ValueError(
            f"A parallel decode over {world_size} ranks cannot split latents of {latent_height} x "
            f"{latent_width} ({latent_width * 8}x{latent_height * 8} pixels): every rank needs a latent row "
            "and column."
        )
    return best[2], best[1]


class Grid:
    """This rank's block of the frame among the ranks of `group`, and the exchanges a block needs.

    `layout` places the blocks for one clip's latent size; rank r holds block (r // cols, r % cols)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.row_bands: list[tuple[int, int]] = [(0, 1)]  # latent rows of each grid row
        self.col_bands: list[tuple[int, int]] = [(0, 1)]  # latent columns of each grid column

    def layout(self, latent_height: int, latent_width: int) -> tuple[int, int, int, int]:
        """Place the blocks for latents of this size; returns this rank's (row start, row stop, column
        start, column stop) in latent pixels."""
        rows, cols = grid_shape(latent_height, latent_width, self.world_size)
        self.row_bands, self.col_bands = band_rows(latent_height, rows), band_rows(latent_width, cols)
        return (*self.row_bands[self.row], *self.col_bands[self.col])

    @property
    def cols(self) -> int:
        return len(self.col_bands)

    @property
    def row(self) -> int:
        return self.rank // self.cols

    @property
    def col(self) -> int:
        return self.rank % self.cols

    def neighbours(self, axis: Axis) -> tuple[int | None, int | None]:
        """The ranks of the blocks before and after this one along `axis` (None at the frame's edge)."""
        if axis == "rows":
            count, at, step = len(self.row_bands), self.row, self.cols
        else:
            count, at, step = self.cols, self.col, 1
        return (self.rank - step if at > 0 else None, self.rank + step if at < count - 1 else None)

    def with_halo(self, x: torch.Tensor, halo: int, dim: int, axis: Axis) -> torch.Tensor:
        """`x` with `halo` rows (or columns, along `dim`) of the neighbouring blocks before and after it
        (zeros beyond the frame's edge). Neighbours along an axis share the other side's size, so the
        swapped edges match in shape."""
        before, after = self.neighbours(axis)
        first = x.narrow(dim, 0, halo).contiguous()
        last = x.narrow(dim, x.shape[dim] - halo, halo).contiguous()
        from_before, from_after = torch.zeros_like(first), torch.zeros_like(last)
        ops = []
        for peer, mine, theirs in ((before, first, from_before), (after, last, from_after)):
            if peer is not None:
                peer = peer if self.group is None else dist.get_global_rank(self.group, peer)
                ops += [
                    dist.P2POp(dist.isend, mine, peer, self.group),
                    dist.P2POp(dist.irecv, theirs, peer, self.group),
                ]
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return torch.cat([from_before, x, from_after], dim)

    def gather(self, x: torch.Tensor, height_dim: int, width_dim: int) -> torch.Tensor:
        """Every block's `x` put together in the grid (blocks differ in size where a side does not divide).
        `x` is at any resolution of the decoder: its block's latent size times one scale."""
        (row_start, row_stop), (col_start, col_stop) = self.row_bands[self.row], self.col_bands[self.col]
        scale_h, scale_w = (
            x.shape[height_dim] // (row_stop - row_start),
            x.shape[width_dim] // (col_stop - col_start),
        )
        heights = [(stop - start) * scale_h for start, stop in self.row_bands]
        widths = [(stop - start) * scale_w for start, stop in self.col_bands]
        pad = [0] * (2 * x.ndim)
        pad[2 * (x.ndim - 1 - height_dim) + 1] = max(heights) - x.shape[height_dim]
        pad[2 * (x.ndim - 1 - width_dim) + 1] = max(widths) - x.shape[width_dim]
        padded = F.pad(x, tuple(pad)).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        rows = [
            torch.cat(
                [
                    parts[row * self.cols + col].narrow(height_dim, 0, height).narrow(width_dim, 0, width)
                    for col, width in enumerate(widths)
                ],
                width_dim,
            )
            for row, height in enumerate(heights)
        ]
        return torch.cat(rows, height_dim)

    def crop(self, whole: torch.Tensor, block: torch.Tensor, height_dim: int, width_dim: int) -> torch.Tensor:
        """This rank's block of `whole` (a gathered frame), at the resolution of `block`."""
        (row_start, row_stop), (col_start, col_stop) = self.row_bands[self.row], self.col_bands[self.col]
        scale_h, scale_w = (
            block.shape[height_dim] // (row_stop - row_start),
            block.shape[width_dim] // (col_stop - col_start),
        )
        rows = whole.narrow(height_dim, row_start * scale_h, block.shape[height_dim])
        return rows.narrow(width_dim, col_start * scale_w, block.shape[width_dim])


def _causal_conv_forward(conv: WanCausalConv3d, grid: Grid, x: torch.Tensor, cache_x=None) -> torch.Tensor:
    """WanCausalConv3d.forward with the spatial padding taken from the neighbouring blocks."""
    padding = list(conv._padding)  # (w, w, h, h, time before, time after)
    if cache_x is not None and padding[4] > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        padding[4] -= cache_x.shape[2]
    if padding[2] > 0:
        x = grid.with_halo(x, padding[2], dim=3, axis="rows")
        padding[2] = padding[3] = 0
    if padding[0] > 0:
        x = grid.with_halo(x, padding[0], dim=4, axis="cols")
        padding[0] = padding[1] = 0
    return nn.Conv3d.forward(conv, F.pad(x, padding))


def _conv2d_forward(conv: nn.Conv2d, grid: Grid, x: torch.Tensor) -> torch.Tensor:
    """An upsampler's Conv2d (padding 1) with its padding taken from the neighbouring blocks."""
    x = grid.with_halo(x, conv.padding[0], dim=2, axis="rows")
    x = grid.with_halo(x, conv.padding[1], dim=3, axis="cols")
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def _attention_forward(block: WanAttentionBlock, grid: Grid, forward, x: torch.Tensor) -> torch.Tensor:
    """The mid-block attention over the whole frame: gather the blocks, attend, keep this block."""
    return grid.crop(forward(grid.gather(x, 3, 4)), x, 3, 4)


def shard_decoder(vae: AutoencoderKLWan, grid: Grid) -> AutoencoderKLWan:
    """A copy of `vae` whose decoder works on one block of the frame (the original is left as it is)."""
    vae = copy.deepcopy(vae)
    for module in vae.decoder.modules():
        if isinstance(module, WanCausalConv3d):
            module.forward = functools.partial(_causal_conv_forward, module, grid)
        elif isinstance(module, WanResample):
            for layer in module.resample:
                if isinstance(layer, nn.Conv2d):
                    if layer.padding != (
                        layer.kernel_size[0] // 2,
                        layer.kernel_size[1] // 2,
                    ) or layer.stride != (1, 1):
                        raise ValueError(f"A parallel decode cannot split {layer} (an encoder's resample?).")
                    layer.forward = functools.partial(_conv2d_forward, layer, grid)
        elif isinstance(module, WanAttentionBlock):
            module.forward = functools.partial(_attention_forward, module, grid, module.forward)
    return vae


def block_plan(
    vae_config, latent_shape: tuple[int, ...], dtype: torch.dtype, world_size: int, budget_bytes: int | None
) -> DecodePlan | None:
    """The plan of the largest block of a decode of `latent_shape` over `world_size` ranks (the memory one
    rank needs), when it fits `budget_bytes` in full frames; None when the latents cannot be split over the
    ranks or the block would not fit: then one device decodes the clip, tiled as its own plan says."""
    channels, num_frames, height, width = latent_shape
    try:
        rows, cols = grid_shape(height, width, world_size)
    except ValueError:
        return None
    block = (channels, num_frames, -(-height // rows), -(-width // cols))
    plan = plan_decode(vae_config, block, dtype, budget_bytes)
    return plan if plan.mode == "full" else None


class ParallelVAEDecoder(VAEDecoder):
    """A VAEDecoder over the ranks of `group`: every rank calls `decode` (or `decode_chunks`) with the same
    latents, decodes its block of every frame and gets the whole clip. Equal to the one-device decode
    within float rounding (the convolutions see the same numbers; only their summation order may differ).
    Every rank builds it at the same time (its constructor is a barrier of the group).

    On NCCL (ranks on GPUs) every tensor a collective sends or receives is contiguous, on the decoder's
    device and in its dtype (bf16 halos are fine: NCCL and gloo both carry bf16), every rank makes the same
    all-gathers in the same order, and each halo swap is one batch of sends and receives (NCCL groups it,
    so the order of the ops in it cannot deadlock); tests/test_vae_parallel.py checks these on gloo."""

    def __init__(
        self,
        vae: AutoencoderKLWan,
        group: dist.ProcessGroup | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.grid = Grid(group)
        super().__init__(shard_decoder(vae, self.grid), dtype=dtype)
        # Every rank's first collective together, here, where every rank builds its decoder: NCCL sets a
        # group's communicator up on its first collective, which for a batched point-to-point swap must
        # involve every rank, and a halo swap leaves out the ranks with no neighbour along an axis.
        device = self.device
        on_nccl = dist.get_backend(group) == "nccl"
        ids = [device.index if device.index is not None else torch.cuda.current_device()] if on_nccl else None
        dist.barrier(group, device_ids=ids)

    def plan(self, latent_shape: tuple[int, ...]) -> DecodePlan:
        """Full frames always: the grid is the split (tiles would cut it again)."""
        return plan_decode(self.vae.config, tuple(latent_shape), self.dtype, None)

    def block_plan(self, latent_shape: tuple[int, ...], budget_bytes: int | None) -> DecodePlan | None:
        """`block_plan` for this group's ranks and this decoder's VAE and dtype."""
        return block_plan(self.vae.config, latent_shape, self.dtype, self.grid.world_size, budget_bytes)

    def take_part(self, latents: torch.Tensor) -> int:
        """A rank's share of a decode whose clip another rank keeps (rank 0 calls `decode` with the same
        latents at the same time): the same collectives, the frames dropped; returns their number."""
        return sum(chunk.shape[0] for chunk in self.decode_chunks(latents))

    def decode_chunks(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """The whole frames, chunk by chunk: this rank's block decoded, every block gathered."""
        if self.device.type == "cuda":  # NCCL's collectives run on the calling thread's current device
            torch.cuda.set_device(self.device)
        row_start, row_stop, col_start, col_stop = self.grid.layout(*latents.shape[2:])
        block = latents[:, :, row_start:row_stop, col_start:col_stop]
        for chunk in super().decode_chunks(block):
            yield self.grid.gather(chunk, 1, 2)  # (frames, height, width, 3)
