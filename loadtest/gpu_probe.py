"""What one real-shape Wan2.2 A14B expert forward costs on the GPUs of this machine.

    python -m loadtest.gpu_probe                  # all GPUs, 8 of the 40 layers, 360 s budget
    python -m loadtest.gpu_probe --layers 40 --budget-s 1800

The expert is WanTransformer3DModel at A14B's shape (dim 5120 = 40 heads x 128, FFN 13824, text 4096)
with random bf16 weights (nothing downloaded). It runs at the 480p and 720p 81-frame token counts
(32,760 and 75,600 tokens a row) with 1, 2 and 4 rows, for each attention backend that loads here
(hub backends are skipped: they download kernels), eager and with regional compile; then, with two or
more GPUs, Ulysses and CFG scaling over a rank group (pipeline.denoise.parallel, NCCL, spawned ranks).
Only `--layers` of the 40 blocks are built and timed; seconds are scaled by 40 / layers, printed as such
(the blocks are identical, so time is linear in them; embeddings and proj_out are under 0.1 %). FLOPs are
pipeline.denoise.flops' count; MFU is against the device's dense bf16 peak. A time budget guard skips
(and says so) whatever would start after `--budget-s`. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from dataclasses import dataclass

import torch

from pipeline.denoise.flops import wan_forward_flops

A14B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    cross_attn_norm=True,
    eps=1e-6,
    rope_max_seq_len=1024,
)
NUM_LAYERS = 40
DIM = 5120
TEXT_TOKENS = 512
SHAPES = {"480p": (21, 60, 104), "720p": (21, 90, 160)}  # latent (frames, height, width) at 81 frames
ROWS = (1, 2, 4)
BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3", "sage")
# device name fragment -> dense bf16 peak, FLOP/s (spec sheets, no sparsity)
PEAKS = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "A100": 312e12}


@dataclass(frozen=True, slots=True)
class Budget:
    deadline: float

    def left(self) -> float:
        return self.deadline - time.monotonic()


def tokens(shape: tuple[int, int, int]) -> int:
    frames, height, width = shape
    return frames * (height // 2) * (width // 2)


def peak_flops(name: str) -> float | None:
    return next((peak for key, peak in PEAKS.items() if key in name), None)


def build_expert(num_layers: int, device: torch.device):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the GPU: 14 B fp32 params would not fit in RAM
    try:
        with device:
            model = WanTransformer3DModel(num_layers=num_layers, **A14B)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def inputs(shape: tuple[int, int, int], rows: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "hidden_states": torch.randn((rows, 16, *shape), device=device, dtype=torch.bfloat16),
        "timestep": torch.full((rows,), 900, device=device, dtype=torch.int64),
        "encoder_hidden_states": torch.randn((rows, TEXT_TOKENS, 4096), device=device, dtype=torch.bfloat16),
    }


@torch.inference_mode()
def seconds_per_forward(model, batch: dict[str, torch.Tensor], repeats: int) -> float:
    model(**batch, return_dict=False)  # warm-up (compiles when compiled)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        model(**batch, return_dict=False)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def report(label: str, seconds: float, num_tokens: int, rows: int, layers: int, peak: float | None) -> None:
    scale = NUM_LAYERS / layers
    flops = wan_forward_flops(num_tokens, dim=DIM, ffn_dim=13824, num_layers=NUM_LAYERS, num_rows=rows)
    full = seconds * scale
    achieved = flops / full
    mfu = f"{100 * achieved / peak:5.1f} %" if peak else "  n/a"
    timing = f"{full:8.3f} s/forward (x{scale:g} from {layers} layers)"
    print(f"{label:<44} {timing}  {achieved / 1e12:7.1f} TFLOP/s  MFU {mfu}")


def probe_one_gpu(args: argparse.Namespace, budget: Budget) -> None:
    from pipeline.denoise.kernels import compile_blocks, set_attention_backend

    device = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name)
    print(f"# {name}: dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else f"# {name}: peak unknown")
    model = build_expert(args.layers, device)
    for backend in BACKENDS:
        try:
            set_attention_backend(model, backend)
        except (RuntimeError, ValueError, ImportError) as error:
            print(f"{backend:<16} unavailable: {str(error).splitlines()[0][:120]}")
            continue
        for resolution, shape in SHAPES.items():
            for rows in ROWS:
                if budget.left() < args.reserve_s:
                    print(f"{backend} {resolution} x{rows}: skipped, time budget spent")
                    continue
                try:
                    seconds = seconds_per_forward(model, inputs(shape, rows, device), args.repeats)
                except (RuntimeError, torch.OutOfMemoryError) as error:
                    print(f"{backend} {resolution} x{rows}: failed: {str(error).splitlines()[0][:120]}")
                    continue
                report(
                    f"{backend:<16} eager    {resolution} x{rows}",
                    seconds,
                    tokens(shape),
                    rows,
                    args.layers,
                    peak,
                )
    if budget.left() < args.compile_reserve_s:
        print("compile: skipped, time budget spent")
        return
    set_attention_backend(model, "native")
    compile_blocks(model)
    for resolution, shape in SHAPES.items():
        for rows in ROWS:
            if budget.left() < args.reserve_s:
                print(f"compiled {resolution} x{rows}: skipped, time budget spent")
                continue
            seconds = seconds_per_forward(model, inputs(shape, rows, device), args.repeats)
            report(
                f"native           compiled {resolution} x{rows}",
                seconds,
                tokens(shape),
                rows,
                args.layers,
                peak,
            )


def rank_main(
    rank: int, world_size: int, port: int, ulysses: int, cfg: int, args: argparse.Namespace
) -> None:
    """One rank of a scaling run: rank 0 times ShardedForward-equivalent run_rows, the others serve."""
    from pipeline.denoise.forward import Rows
    from pipeline.denoise.parallel import ShardGroup, worker_loop

    group = ShardGroup.init(rank, world_size, "127.0.0.1", port, ulysses=ulysses, cfg=cfg, timeout_s=600)
    model = group.shard(build_expert(args.layers, group.device))
    if rank != 0:
        worker_loop(group, {"high": model})
        group.close()
        return
    peak = peak_flops(torch.cuda.get_device_name(group.device))
    for resolution, shape in SHAPES.items():
        batch = inputs(shape, 2, group.device)  # one guided request: cond + uncond rows
        rows = Rows(batch["hidden_states"], batch["timestep"], batch["encoder_hidden_states"])
        with torch.inference_mode():
            group.run_rows("high", model, rows)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.repeats):
                group.run_rows("high", model, rows)
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.repeats
        label = f"Ulysses {ulysses} x CFG {cfg} ({world_size} GPUs) {resolution} x2"
        report(label, seconds, tokens(shape), 2, args.layers, peak * world_size if peak else None)
    group.close()


def probe_scaling(args: argparse.Namespace, budget: Budget) -> None:
    import torch.multiprocessing as mp

    count = torch.cuda.device_count()
    world = max(n for n in (1, 2, 4, 5, 8) if n <= count)
    degrees = [(world, 1)] + ([(world // 2, 2)] if world % 2 == 0 else [])
    for ulysses, cfg in degrees:
        if budget.left() < args.scaling_reserve_s:
            print(f"Ulysses {ulysses} x CFG {cfg}: skipped, time budget spent")
            continue
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.start_processes(
            rank_main, args=(world, port, ulysses, cfg, args), nprocs=world, join=True, start_method="spawn"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layers", type=int, default=8, help="blocks built and timed (of 40); time is scaled"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per measurement")
    parser.add_argument("--budget-s", type=float, default=360.0, help="start nothing new after this long")
    parser.add_argument("--reserve-s", type=float, default=20.0, help="time one eager measurement may need")
    parser.add_argument("--compile-reserve-s", type=float, default=120.0, help="time compiling may need")
    parser.add_argument("--scaling-reserve-s", type=float, default=90.0, help="time one scaling run may need")
    args = parser.parse_args(argv)
    if not 1 <= args.layers <= NUM_LAYERS:
        parser.error(f"--layers must be in 1..{NUM_LAYERS} but is {args.layers}.")
    if not torch.cuda.is_available():
        print("gpu_probe: no CUDA GPU on this machine; nothing to probe.")
        return 0
    budget = Budget(time.monotonic() + args.budget_s)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/previz-inductor")
    probe_one_gpu(args, budget)
    if torch.cuda.device_count() >= 2:
        probe_scaling(args, budget)
    else:
        print("scaling: one GPU here; Ulysses and CFG scaling need two or more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
