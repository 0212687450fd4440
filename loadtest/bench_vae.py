"""VAE decode variants side by side: one rank, two ranks, tiled, the fast draft decoder, bf16.

    python -m loadtest.bench_vae --preset small
    python -m loadtest.bench_vae --preset small --size 416x240 --frames 9 --json vae.json

Every variant decodes the same seeded latents of the preset's VAE; `max_abs_diff` is the largest
difference of its float frames (in [0, 1]) from the one-device float32 full decode's, so a variant's row
says both what it costs and how far it strays. `2 ranks` runs the parallel decode (pipeline.vae_parallel)
on spawned gloo processes on this machine (on one CPU, two ranks share its cores: the figure shows the
exchange's cost, not a speed-up). `tiled` forces the smallest tiles the memory plan has (64 pixels, stride
48), which blend differently at the seams. `fast` is TAEHV with the preset's random weights: a different
network, so its difference measures nothing but its frame count and speed carry over. bf16 runs where
the device has bf16 in hardware (CUDA, or a CPU with AVX512-BF16 or AMX). Wall times are the median of
`--repeats` decodes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

from pipeline._compat import cpu_has_bf16
from pipeline.taehv import FastDecoder, fast_decoder_network
from pipeline.vae import VAEDecoder
from pipeline.vae_memory import TILES, DecodePlan, estimate_bytes
from pipeline.weights import build_preset, pick_device


@dataclass(frozen=True, slots=True)
class Variant:
    """One row: how the clip was decoded, how long it took and how far it is from the reference."""

    name: str
    ranks: int  # processes the decode ran over
    decoder: str  # vae | fast
    dtype: str  # float32 | bfloat16
    seconds: float  # median wall time of one decode, latents in, uint8 frames on the host out
    max_abs_diff: float  # of float frames in [0, 1], against the one-device float32 full decode


def has_bf16(device: torch.device) -> bool:
    """The device runs bf16 in hardware: CUDA, or a CPU with AVX512-BF16 or AMX."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())


def latents_for(preset: str, width: int, height: int, frames: int) -> torch.Tensor:
    shape = build_preset(preset).model.latent_shape(width, height, frames)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def timed(call: Callable[[], object], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def float_frames(decoder: VAEDecoder | FastDecoder, z: torch.Tensor) -> torch.Tensor:
    return torch.cat([chunk.cpu() for chunk in decoder.decode_chunks(z)])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parallel_rank(
    rank: int, world_size: int, port: int, preset: str, z: torch.Tensor, repeats: int, out: Path
):
    import torch.distributed as dist

    from pipeline.vae_parallel import ParallelVAEDecoder

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        decoder = ParallelVAEDecoder(build_preset(preset).vae, dtype=torch.float32)
        frames = float_frames(decoder, z)
        dist.barrier()
        seconds = timed(lambda: decoder.decode(z, fps=16), repeats, torch.device("cpu"))
        if rank == 0:
            torch.save({"frames": frames, "seconds": seconds}, out)
    finally:
        dist.destroy_process_group()


def run(preset: str, width: int, height: int, num_frames: int, repeats: int, ranks: int) -> list[Variant]:
    device = pick_device()
    z = latents_for(preset, width, height, num_frames)
    rows: list[Variant] = []

    def full_vae(dtype: torch.dtype) -> VAEDecoder:
        return VAEDecoder(build_preset(preset).vae.to(device), dtype=dtype)

    one = full_vae(torch.float32)
    reference = float_frames(one, z)

    def row(name: str, decoder, ranks: int, kind: str, dtype: torch.dtype, plan: DecodePlan | None = None):
        frames = float_frames(decoder, z)
        diff = (frames - reference).abs().max().item() if frames.shape == reference.shape else float("nan")
        if kind == "vae":
            seconds = timed(lambda: decoder.decode(z, fps=16, plan=plan), repeats, device)
        else:
            seconds = timed(lambda: decoder.decode(z, fps=16), repeats, device)
        dtype_name = str(dtype).removeprefix("torch.")
        rows.append(Variant(name, ranks, kind, dtype_name, seconds, diff))

    row("1 rank", one, 1, "vae", torch.float32)
    if ranks > 1:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "rank0.pt"
            args = (ranks, free_port(), preset, z, repeats, out)
            mp.start_processes(parallel_rank, args=args, nprocs=ranks, join=True, start_method="spawn")
            result = torch.load(out, weights_only=False)
        diff = (result["frames"] - reference).abs().max().item()
        rows.append(Variant(f"{ranks} ranks", ranks, "vae", "float32", result["seconds"], diff))
    tiled = full_vae(torch.float32)
    shape = tuple(z.shape)
    plan = DecodePlan(
        "tiled", TILES[-1], estimate_bytes(tiled.vae.config, shape, torch.float32, TILES[-1]), None, True
    )
    tiled.apply(plan)
    row("tiled", tiled, 1, "vae", torch.float32, plan)
    fast = FastDecoder(fast_decoder_network("builtin", preset, device), dtype=torch.float32)
    row("fast", fast, 1, "fast", torch.float32)
    if has_bf16(device):
        row("bf16", full_vae(torch.bfloat16), 1, "vae", torch.bfloat16)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=("tiny", "small"))
    parser.add_argument("--size", default="416x240", help="WIDTHxHEIGHT of the clip, multiples of 16.")
    parser.add_argument("--frames", type=int, default=9, help="Video frames (4k+1).")
    parser.add_argument("--ranks", type=int, default=2, help="Gloo ranks of the parallel row (1: none).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="Also write {'variants': [...]} here.")
    args = parser.parse_args(argv)
    width, height = (int(side) for side in args.size.split("x"))
    rows = run(args.preset, width, height, args.frames, args.repeats, args.ranks)
    device = pick_device()
    command = " ".join(argv if argv is not None else sys.argv[1:])
    print(
        f"VAE decode, preset {args.preset}, {width}x{height}, {args.frames} frames, on {device} "
        f"({os.cpu_count()} CPUs): python -m loadtest.bench_vae {command}"
    )
    header = ("variant", "ranks", "decoder", "dtype", "seconds", "vs 1 rank", "max abs diff")
    print("{:<10} {:>5} {:<8} {:<9} {:>9} {:>9} {:>13}".format(*header))
    base = rows[0].seconds
    for r in rows:
        ratio = f"{r.seconds / base:.2f}x"
        print(
            f"{r.name:<10} {r.ranks:>5} {r.decoder:<8} {r.dtype:<9} {r.seconds:>9.3f} {ratio:>9} "
            f"{r.max_abs_diff:>13.2e}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"variants": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
