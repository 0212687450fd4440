"""Seconds per expert forward on 1 vs 2 ranks (Ulysses 2, CFG 2) and the all-to-all bytes per step.

    python -m loadtest.shard_bench                          # small preset, 160x96, 17 frames, CPU (gloo)
    python -m loadtest.shard_bench --size 320x192 --duration 1 --requests 2 --repeats 5

Each configuration runs in freshly spawned processes: the 1-rank baselines call guided_forward with
every core and with half of them; a 2-rank group runs ShardedForward on rank 0 and worker_loop on
rank 1 with half the cores each. Against the all-cores baseline the ratio is what a second process on
the same cores buys (on a shared CPU, little, and noisy); against the half-cores one it is the
scaling a second device of its own would give, less the gloo traffic.
"All-to-all bytes" are counted by wrapping diffusers' `_all_to_all_single` on rank 0 (the bytes that
leave the rank: (U-1)/U of each buffer) and printed next to `ulysses_bytes_per_forward`'s formula.
One step of a request with CFG is one forward here. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from pipeline.denoise.forward import GuidedInput, guided_forward
from pipeline.denoise.parallel import (
    ParallelDegree,
    ShardedForward,
    ShardGroup,
    ulysses_bytes_per_forward,
    worker_loop,
)
from pipeline.spec import RequestSpec, resolve
from pipeline.weights import build_preset


def bench_rank(
    rank: int, degree: ParallelDegree | None, port: int, args: argparse.Namespace, out: Path, threads: int
) -> None:
    world_size = degree.world_size if degree is not None else 1
    torch.set_num_threads(threads)
    components = build_preset(args.preset)
    transformer = components.transformer
    group = None
    if degree is not None:
        group = ShardGroup.init(
            rank, world_size, "127.0.0.1", port, ulysses=degree.ulysses, cfg=degree.cfg, timeout_s=600
        )
        group.shard(transformer)
        if rank != 0:
            worker_loop(group, {"high": transformer})
            group.close()
            return
    sent = _count_all_to_all(degree.ulysses if degree is not None else 1)
    inputs = _inputs(components, args)
    forward = ShardedForward(group, transformer, "high") if group is not None else None
    seconds = []
    with torch.inference_mode():
        for repeat in range(args.warmup + args.repeats):
            sent[0] = 0
            start = time.perf_counter()
            forward(inputs) if forward is not None else guided_forward(transformer, inputs)
            if repeat >= args.warmup:
                seconds.append(time.perf_counter() - start)
    if group is not None:
        group.close()
    config = transformer.config
    tokens = inputs[0].latents[0].numel() // (config.patch_size[1] * config.patch_size[2])
    out.write_text(
        json.dumps(
            {
                "seconds": seconds,
                "all_to_all_bytes": sent[0],
                "formula_bytes": ulysses_bytes_per_forward(
                    2 * len(inputs),
                    tokens,
                    config.num_attention_heads * config.attention_head_dim,
                    config.num_layers,
                    degree or ParallelDegree(),
                    transformer.dtype.itemsize,
                ),
                "tokens": tokens,
                "threads": torch.get_num_threads(),
            }
        )
    )


def _inputs(components, args: argparse.Namespace) -> list[GuidedInput]:
    spec = RequestSpec(prompt="bench", resolution=args.size, duration=args.duration, steps=40, seed=0)
    resolved = resolve(spec, components.model)
    shape = resolved.latent_shape(components.model, components.transformer.config.in_channels)
    generator = torch.Generator().manual_seed(0)
    text = (components.model.max_sequence_length, components.transformer.config.text_dim)
    return [
        GuidedInput(
            latents=torch.randn(shape, generator=generator),
            timestep=torch.tensor(999),
            cond=torch.randn(text, generator=generator),
            uncond=torch.randn(text, generator=generator),
            guidance=4.0,
        )
        for _ in range(args.requests)
    ]


def _count_all_to_all(ulysses: int) -> list[int]:
    """Wrap diffusers' Ulysses all-to-all; [bytes this rank sent] since the last reset."""
    from diffusers.models import attention_dispatch

    sent = [0]
    original = attention_dispatch._all_to_all_single

    def counting(x: torch.Tensor, group) -> torch.Tensor:
        sent[0] += x.numel() * x.element_size() * (ulysses - 1) // ulysses
        return original(x, group)

    attention_dispatch._all_to_all_single = counting
    return sent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--size", default="160x96", help="WxH, multiples of 16")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds of clip (1 s = 17 frames)")
    parser.add_argument("--requests", type=int, default=1, help="requests per forward (2 rows each, CFG)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    configs = {  # name -> (degree, threads per rank)
        "1 rank": (None, cores),
        "1 rank, 1/2 cores": (None, max(1, cores // 2)),
        "ulysses 2": (ParallelDegree(ulysses=2), max(1, cores // 2)),
        "cfg 2": (ParallelDegree(cfg=2), max(1, cores // 2)),
    }
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, (degree, threads)) in enumerate(configs.items()):
            out = Path(folder) / f"config{index}.json"
            mp.start_processes(
                bench_rank,
                args=(degree, _free_port(), args, out, threads),
                nprocs=degree.world_size if degree is not None else 1,
                join=True,
                start_method="spawn",
            )
            results[name] = json.loads(out.read_text())
    base = statistics.median(results["1 rank"]["seconds"])
    tokens = results["1 rank"]["tokens"]
    print(
        f"{args.preset} preset, {args.size}, {args.duration:g} s, {tokens} tokens/row, "
        f"{2 * args.requests} rows (CFG), {args.repeats} repeats on {os.cpu_count()} CPU cores, gloo"
    )
    print(f"{'config':<18}{'threads/rank':>13}{'s/forward (median)':>20}{'best':>9}{'speed-up':>10}"
          f"{'all-to-all B/step':>19}{'formula B':>12}")  # fmt: skip
    for name, result in results.items():
        median = statistics.median(result["seconds"])
        print(
            f"{name:<18}{result['threads']:>13}{median:>20.4f}{min(result['seconds']):>9.4f}"
            f"{base / median:>9.2f}x{result['all_to_all_bytes']:>19,}{result['formula_bytes']:>12,}"
        )
    print(
        "all-to-all bytes: sent by rank 0 per forward (= per step of one request with CFG) over all "
        "layers' q, k, v and output exchanges; cfg 2 moves no all-to-all, only the all-gather of the halves."
    )


if __name__ == "__main__":
    main()
