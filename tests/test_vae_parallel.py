"""Parallel VAE decode on gloo ranks: bands of rows with halos equal the one-device decode."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.vae import VAEDecoder
from pipeline.vae_parallel import band_rows
from tests.test_vae import latents, preset_vae

MAX_ABS_DIFF = 1e-5  # fp32: the bands see the same numbers, convolutions may sum in another order
# (preset, latent shape): heights 7 and 9 split unevenly over 2 and 4 ranks (4+3, 2+2+2+1, 5+4, 3+2+2+2)
CASES = {"tiny": (16, 3, 7, 5), "small": (16, 2, 9, 6)}


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
        for name, shape in CASES.items():
            decoder = ParallelVAEDecoder(preset_vae(name))
            z = latents(shape, seed=7)
            chunks = torch.cat(list(decoder.decode_chunks(z)))
            results[name] = (chunks, decoder.decode(z, fps=16).pixels)
        if rank == 0:
            torch.save(results, out / f"ranks{world_size}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_device() -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    results = {}
    for name, shape in CASES.items():
        decoder, z = VAEDecoder(preset_vae(name)), latents(shape, seed=7)
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
        float_frames, pixels = parallel[name]
        reference_float, reference_pixels = one_device[name]
        diff = (float_frames - reference_float).abs().max().item()
        print(f"{name} on {world_size} gloo ranks: max abs diff {diff:.2e}")
        assert diff <= MAX_ABS_DIFF, (name, diff)
        assert_same_uint8(pixels, reference_pixels, reference_float.numpy(), diff)


def assert_same_uint8(
    pixels: np.ndarray, reference: np.ndarray, reference_float: np.ndarray, diff: float
) -> None:
    """uint8 frames equal, except where the reference's value sits within the float difference of a
    rounding boundary (k + 0.5 levels): any change of summation order may round those either way."""
    levels = reference_float * 255
    near_boundary = np.abs(levels - np.floor(levels) - 0.5) <= diff * 255
    differ = pixels != reference
    assert not (differ & ~near_boundary).any(), np.argwhere(differ & ~near_boundary)[:5]
    assert np.abs(pixels.astype(int) - reference.astype(int)).max() <= 1
    print(f"  uint8: {int(differ.sum())} of {differ.size} values rounded the other way at a boundary")


def test_bands_split_the_rows_as_evenly_as_they_come() -> None:
    assert band_rows(7, 2) == [(0, 4), (4, 7)]
    assert band_rows(9, 4) == [(0, 3), (3, 5), (5, 7), (7, 9)]
    with pytest.raises(ValueError, match="needs at least 4 latent rows, but the latents have 3"):
        band_rows(3, 4)
