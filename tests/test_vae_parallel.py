"""Parallel VAE decode on gloo ranks: blocks of the frame (a grid of rows x columns) with halos equal the
one-device decode."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.vae import VAEDecoder
from pipeline.vae_parallel import band_rows, grid_shape
from tests.test_vae import latents, preset_vae

MAX_ABS_DIFF = 1e-5  # fp32: the blocks see the same numbers, convolutions may sum in another order
# bf16: a block's convolution may sum in another order and round a value the other way, by an ulp (2^-8 in
# [0.5, 1)), which the layers after may double; a missing halo moved the seams by 0.35 (gpu_probe's tiny VAE)
BF16_MAX_ABS_DIFF = 2**-7
MAX_FLIPPED = 1e-3  # of uint8 values: a value rounds the other way only next to a k + 0.5 boundary
# case -> (preset, latent shape), each split unevenly (grid_shape picks the grid): `rows` 7 x 5 goes 2 x 1
# over 2 ranks (rows 4+3) and 4 x 1 over 4 (2+2+2+1); `cols` 5 x 9 goes 1 x 2 (columns 5+4) and 2 x 2
# (rows 3+2, columns 5+4); `small` 7 x 9 goes 1 x 2 (5+4) and 2 x 2 (rows 4+3, columns 5+4).
CASES = {
    "tiny rows": ("tiny", (16, 3, 7, 5)),
    "tiny cols": ("tiny", (16, 2, 5, 9)),
    "small": ("small", (16, 2, 7, 9)),
}
GRIDS = {
    2: {"tiny rows": (2, 1), "tiny cols": (1, 2), "small": (1, 2)},
    4: {"tiny rows": (4, 1), "tiny cols": (2, 2), "small": (2, 2)},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def decode_rank(rank: int, world_size: int, port: int, out: Path) -> None:
    import torch.distributed as dist

    from pipeline.vae_parallel import ParallelVAEDecoder

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {}
        for name, (preset, shape) in CASES.items():
            decoder = ParallelVAEDecoder(preset_vae(preset))
            z = latents(shape, seed=7)
            chunks = torch.cat(list(decoder.decode_chunks(z)))
            grid = (len(decoder.grid.row_bands), len(decoder.grid.col_bands))
            results[name] = (chunks, decoder.decode(z, fps=16).pixels, grid)
        if rank == 0:
            torch.save(results, out / f"ranks{world_size}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_device() -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    results = {}
    for name, (preset, shape) in CASES.items():
        decoder, z = VAEDecoder(preset_vae(preset)), latents(shape, seed=7)
        results[name] = (torch.cat(list(decoder.decode_chunks(z))), decoder.decode(z, fps=16).pixels)
    return results


@pytest.mark.parametrize("world_size", [2, 4])
def test_parallel_decode_equals_one_device_decode(world_size: int, one_device, tmp_path: Path) -> None:
    mp.start_processes(
        decode_rank,
        args=(world_size, free_port(), tmp_path),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
    parallel = torch.load(tmp_path / f"ranks{world_size}.pt", weights_only=False)
    for name in CASES:
        float_frames, pixels, grid = parallel[name]
        reference_float, reference_pixels = one_device[name]
        assert grid == GRIDS[world_size][name]
        diff = (float_frames - reference_float).abs().max().item()
        print(f"{name} on {world_size} gloo ranks ({grid[0]} x {grid[1]} blocks): max abs diff {diff:.2e}")
        assert diff <= MAX_ABS_DIFF, (name, diff)
        assert_same_uint8(pixels, reference_pixels, reference_float.numpy(), diff)


def assert_same_uint8(
    pixels: np.ndarray, reference: np.ndarray, reference_float: np.ndarray, diff: float
) -> None:
    """uint8 frames equal, except where the reference's value sits within the float difference of a
    rounding boundary (k + 0.5 levels): any change of summation order may round those either way, by one
    level, and they are a tiny share of the values (at most MAX_FLIPPED; about 1 in 50,000 measured)."""
    levels = reference_float * 255
    near_boundary = np.abs(levels - np.floor(levels) - 0.5) <= diff * 255
    differ = pixels != reference
    assert not (differ & ~near_boundary).any(), np.argwhere(differ & ~near_boundary)[:5]
    assert np.abs(pixels.astype(int) - reference.astype(int)).max() <= 1
    assert differ.mean() <= MAX_FLIPPED
    print(f"  uint8: {int(differ.sum())} of {differ.size} values rounded the other way at a boundary")


def test_bands_split_the_rows_as_evenly_as_they_come() -> None:
    assert band_rows(7, 2) == [(0, 4), (4, 7)]
    assert band_rows(9, 4) == [(0, 3), (3, 5), (5, 7), (7, 9)]
    with pytest.raises(ValueError, match="needs at least 4 latent rows or columns, but the latents have 3"):
        band_rows(3, 4)


def test_the_grid_has_the_shortest_block_edges_that_fit() -> None:
    assert grid_shape(90, 160, 1) == (1, 1)
    assert [grid_shape(90, 160, ranks) for ranks in (2, 4, 8)] == [(1, 2), (2, 2), (2, 4)]  # 720p
    assert [grid_shape(160, 90, ranks) for ranks in (2, 4, 8)] == [(2, 1), (2, 2), (4, 2)]  # portrait
    assert grid_shape(60, 104, 4) == (2, 2)  # 480p
    assert grid_shape(3, 40, 4) == (1, 4)  # too few rows for 2 bands of 2: columns only
    with pytest.raises(ValueError, match="cannot split latents of 1 x 3"):
        grid_shape(1, 3, 4)


def describe(tensor: torch.Tensor) -> tuple:
    return (
        tuple(tensor.shape),
        str(tensor.dtype).removeprefix("torch."),
        tensor.is_contiguous(),
        tensor.device.type,
    )


def collectives_rank(rank: int, world_size: int, port: int, out: Path) -> None:
    """A bf16 parallel decode of the 4 x 1 and 2 x 2 cases that records every tensor its collectives carry
    (the wrappers pass each call on to gloo unchanged)."""
    import torch.distributed as dist

    from pipeline.vae_parallel import ParallelVAEDecoder

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    calls: list[tuple] = []
    all_gather, batch_isend_irecv = dist.all_gather, dist.batch_isend_irecv

    def recording_all_gather(parts, tensor, group=None, async_op=False):
        calls.append(("all_gather", None, describe(tensor), [describe(part) for part in parts]))
        return all_gather(parts, tensor, group=group, async_op=async_op)

    def recording_batch_isend_irecv(ops):
        calls.extend((op.op.__name__, op.peer, describe(op.tensor), None) for op in ops)
        return batch_isend_irecv(ops)

    dist.all_gather, dist.batch_isend_irecv = recording_all_gather, recording_batch_isend_irecv
    try:
        results = {}
        for name in ("tiny rows", "tiny cols"):
            preset, shape = CASES[name]
            decoder = ParallelVAEDecoder(preset_vae(preset), dtype=torch.bfloat16)
            calls.clear()
            results[name] = (torch.cat(list(decoder.decode_chunks(latents(shape, seed=7)))), list(calls))
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.all_gather, dist.batch_isend_irecv = all_gather, batch_isend_irecv
        dist.destroy_process_group()


def test_bf16_parallel_decode_sends_what_nccl_needs_and_matches_one_device(tmp_path: Path) -> None:
    """What NCCL needs and gloo forgives, checked on gloo: every tensor a collective carries contiguous and
    on the decoder's device, halos in bf16 (the decoder's dtype), the same all-gathers in the same order on
    every rank, and each rank's sends to a peer matching that peer's receives, in order and shape (a
    mismatch hangs NCCL). The bf16 frames equal the one-device bf16 decode's within BF16_MAX_ABS_DIFF
    (equal here: measured 0 on this CPU)."""
    world_size = 4
    mp.start_processes(
        collectives_rank, args=(world_size, free_port(), tmp_path), nprocs=world_size, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
    for name in ("tiny rows", "tiny cols"):
        preset, shape = CASES[name]
        reference = torch.cat(
            list(VAEDecoder(preset_vae(preset), dtype=torch.bfloat16).decode_chunks(latents(shape, seed=7)))
        )
        calls = [rank[name][1] for rank in ranks]
        for rank, frames in enumerate(rank[name][0] for rank in ranks):
            diff = (frames - reference).abs().max().item()
            print(f"{name}: rank {rank}'s bf16 frames against one device's: max abs diff {diff:.2e}")
            assert diff <= BF16_MAX_ABS_DIFF, (name, rank, diff)
        tensors = [call[2] for rank_calls in calls for call in rank_calls]
        assert all(contiguous and device == "cpu" for _, _, contiguous, device in tensors)
        halos = [call[2] for rank_calls in calls for call in rank_calls if call[0] in ("isend", "irecv")]
        assert halos and all(dtype == "bfloat16" for _, dtype, _, _ in halos)
        gathers = [[call[2] for call in rank_calls if call[0] == "all_gather"] for rank_calls in calls]
        assert all(rank_gathers == gathers[0] for rank_gathers in gathers)
        assert {dtype for _, dtype, _, _ in gathers[0]} == {"bfloat16", "float32"}  # mid-block, frames
        for sender in range(world_size):
            for receiver in range(world_size):
                sent = [call[2] for call in calls[sender] if call[:2] == ("isend", receiver)]
                received = [call[2] for call in calls[receiver] if call[:2] == ("irecv", sender)]
                assert sent == received, (name, sender, receiver)
