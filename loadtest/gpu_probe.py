"""What a real-shape Wan2.2 A14B expert costs on this GPU: time, memory, compile, FP8, the engine, the VAE.

    bash scripts/gpu_wheels.sh wheels/gpu 3.12 manylinux_2_28_x86_64         # where the registries are
    python -m loadtest.gpu_probe --wheels wheels/gpu --out loadtest/results/h100.json   # on the GPU machine
    python -m loadtest.gpu_probe --dry-run --wheels wheels/gpu --out /tmp/dry.json      # any CPU: the code

The GPU machines have torch, transformers, peft and Triton but no diffusers and no pydantic: `--wheels DIR`
unpacks the wheels of scripts/gpu_wheels.sh into a temporary folder and puts it first on sys.path before
anything of Previz is imported (this module imports only the standard library and torch at the top).

One run (the defaults fit in 8 minutes on one H100 or H200), in this order, each step skipped with its
reason once `--budget-s` would be overrun:
1. the measured bf16 (and FP8) matmul rate of an 8192^3 GEMM: the "achievable" peak MFU is also read against;
2. regional compile first (`--compile-backend`, default native): compile seconds, then compiled forwards;
3. eager forwards for each `--backends` (default native and _native_cudnn) x `--sizes` x `--rows`;
4. FP8 (`--fp8 auto|on|off`): the same 480p row in bf16 and through pipeline.denoise.fp8 (max abs diff,
   PSNR) and its forward times; `on` where the GPU has no FP8 tensor cores (or on CPU) is refused;
5. the engine's real path: one DenoiseEngine iteration (batch-invariant layers, a LoRA adapter set, one
   request's row served from its step cache, another computing with CFG) beside the bare forward of the
   same computing rows on the same weights;
6. a 720p 81-frame VAE decode (Wan2.1 VAE, random weights, the product's VAEDecoder), one row per variant:
   full frames in float32 (the reference), then in `--vae-dtype` (default bf16, the product's on a GPU)
   full, in 256-pixel tiles, by the fast draft decoder (TAEHV, random weights), and split over 2 ranks
   (pipeline.vae_parallel over NCCL; "skipped: 1 GPU" on one), each with its peak memory and its
   frames' max abs diff and PSNR against the float32 decode; a variant that fails (out of memory, say)
   is recorded as failed and the next one runs;
7. with two or more GPUs, Ulysses and CFG scaling over a rank group (the GPU machines have one).
The expert is WanTransformer3DModel at A14B's shape (dim 5120 = 40 heads x 128, FFN 13824, text 4096) with
random bf16 weights; only `--layers` of its 40 blocks are built, and seconds are scaled by 40 / layers
(identical blocks; embeddings and head are under 0.1 %). Every timing synchronizes the device before it
reads the clock. Peak memory is torch's max allocated during each measurement; the largest 720p and
480p row counts that fit are EXTRAPOLATED from it (weights of one expert 28.6 GB or both 57.2 GB, plus
the measured activations, which do not grow with the layer count in inference) and labelled so. MFU is
against the datasheet's dense bf16 peak and against the measured matmul rate. Everything goes into one
JSON file (`--out`); `python -m loadtest.cost_model --from-probe FILE` refits the capacity model from it.

`--steps` runs some of the steps only: `--steps matmul,vae` is the VAE check of issue 27 (four 720p decodes
on one GPU, about 2 minutes on an H100 by the cost model's figures, float32 the slowest).

`--dry-run` runs every step on the CPU at a tiny shape (the 2-rank decode on 2 gloo processes), to prove
the code and the wheel set: every field of the JSON is written, the ones only a GPU can fill are null, and
`dry_run_checks` says what ran.
Without a GPU and without `--dry-run` it says so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import platform
import socket
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from loadtest.probe_report import (
    FORMAT,
    DeviceInfo,
    EngineRecord,
    ForwardRecord,
    Fp8Record,
    MatmulRate,
    MemoryFit,
    Report,
    VaeRecord,
    VaeVariant,
)

REPO = Path(__file__).resolve().parents[1]
NUM_LAYERS = 40
ONE_EXPERT_BYTES = 28.6e9  # 14.3 B bf16 parameters (ARCHITECTURE.md)
BOTH_EXPERTS_BYTES = 57.2e9
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
SHAPES = {"480p": (21, 60, 104), "720p": (21, 90, 160)}  # latent (frames, height, width) at 81 frames
# the dry run's stand-in: the same code on a model and clip small enough for a CPU
TINY = {**A14B, "num_attention_heads": 2, "attention_head_dim": 16, "text_dim": 32, "freq_dim": 32}
TINY = {**TINY, "ffn_dim": 64, "rope_max_seq_len": 32}
TINY_SHAPES = {"480p": (2, 6, 10), "720p": (3, 8, 12)}
TINY_VAE = dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
# the steps of one run, in order (`--steps` picks some)
STEPS = ("matmul", "compile", "eager", "fp8", "engine", "vae", "scaling")
# device name fragment -> dense bf16 peak, FLOP/s (datasheets, no sparsity)
PEAKS = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "A100": 312e12}
# what others publish for the same model (issue 24), to read the figures against
PUBLISHED = {
    "bf16_expert_forward_s": {"480p": 2.6, "720p": 9.4},  # H100/H200, SGLang and LightX2V
    "fp8_sage_speedup": [1.56, 1.70],  # LightX2V's H200 table, per forward
    "h100_bf16_matmul_8192_flops_per_s": 798e12,  # measured on the H100 we use
}


@dataclass(frozen=True, slots=True)
class Budget:
    deadline: float

    def left(self) -> float:
        return self.deadline - time.monotonic()


# ---- wheels --------------------------------------------------------------------------------------------


def use_wheels(folder: Path) -> tuple[list[str], str]:
    """Unpack `folder`'s wheels into a temporary folder put first on sys.path; (wheels used, where Previz
    comes from). The previz wheel is left out when this checkout has the packages (they may be newer)."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu_probe: {folder} holds no wheels; run `bash scripts/gpu_wheels.sh {folder}`.")
    checkout = (REPO / "pipeline" / "__init__.py").is_file()
    target = Path(tempfile.mkdtemp(prefix="previz-wheels-"))
    used = []
    for wheel in wheels:
        if checkout and wheel.name.startswith("previz-"):
            continue
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
        used.append(wheel.name)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return used, "checkout" if checkout else "wheel"


# ---- measuring -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """What is built and run: A14B on a GPU, a tiny stand-in on a dry run."""

    transformer: dict
    shapes: dict[str, tuple[int, int, int]]
    text_tokens: int
    vae: dict
    matmul_size: int
    lora_rank: int

    @property
    def dim(self) -> int:
        return self.transformer["num_attention_heads"] * self.transformer["attention_head_dim"]


GPU_SHAPE = Shape(A14B, SHAPES, 512, {}, 8192, 64)
DRY_SHAPE = Shape(TINY, TINY_SHAPES, 16, TINY_VAE, 256, 4)


def tokens(shape: tuple[int, int, int]) -> int:
    frames, height, width = shape
    return frames * (height // 2) * (width // 2)


def sync(device: torch.device) -> None:
    from pipeline.denoise.kernels import synchronize

    synchronize(device)


def timed(call, device: torch.device, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, mean seconds of `repeats` later ones), the device synchronized before
    every clock read, so queued kernels are counted."""
    sync(device)
    start = time.perf_counter()
    call()
    sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    sync(device)
    return first, (time.perf_counter() - start) / repeats


class Memory:
    """Peak allocated bytes of what runs inside it (CUDA only; None elsewhere)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self.before = device, None, None

    def __enter__(self) -> Memory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def activation(self) -> int | None:
        return None if self.peak is None else self.peak - self.before


def build_expert(shape: Shape, num_layers: int, device: torch.device):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the GPU: 14 B fp32 params would not fit in RAM
    try:
        with device:
            model = WanTransformer3DModel(num_layers=num_layers, **shape.transformer)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def inputs(shape: Shape, size: str, rows: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device).manual_seed(rows)
    text = (rows, shape.text_tokens, shape.transformer["text_dim"])
    latents = torch.randn((rows, 16, *shape.shapes[size]), generator=generator, device=device)
    return {
        "hidden_states": latents.to(torch.bfloat16),
        "timestep": torch.full((rows,), 900, device=device, dtype=torch.int64),
        "encoder_hidden_states": torch.randn(text, generator=generator, device=device).to(torch.bfloat16),
    }


class Probe:
    """One run: the shape, the device, the budget and what has been measured so far."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.dry = args.dry_run
        self.shape = DRY_SHAPE if self.dry else GPU_SHAPE
        self.layers = 1 if self.dry else args.layers
        self.scale = NUM_LAYERS / self.layers
        self.budget = Budget(time.monotonic() + args.budget_s)
        self.checks: dict[str, object] = {}
        self.info = device_info(device)
        self.matmul = MatmulRate(self.shape.matmul_size, None, None)

    def figure(self, value):
        """A GPU figure, or None on a dry run (its value goes to dry_run_checks instead)."""
        return None if self.dry else value

    def flops(self, size: str, rows: int) -> float:
        from pipeline.denoise.flops import wan_forward_flops

        return wan_forward_flops(
            tokens(self.shape.shapes[size]),
            dim=self.shape.dim,
            ffn_dim=self.shape.transformer["ffn_dim"],
            num_layers=NUM_LAYERS,
            text_tokens=self.shape.text_tokens,
            num_rows=rows,
        )

    def expected_s(self, size: str, rows: int, calls: int) -> float:
        """A pessimistic guess of a measurement's seconds (30 % of the measured matmul rate)."""
        rate = self.matmul.bf16_flops_per_s or 300e12
        return calls * self.flops(size, rows) / self.scale / (0.3 * rate)

    def affordable(self, seconds: float) -> bool:
        return self.dry or self.budget.left() > seconds

    def measure_matmul(self) -> None:
        n, device = self.shape.matmul_size, self.device
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        repeats = 3 if self.dry else 20
        _, seconds = timed(lambda: a @ b, device, repeats)
        self.matmul.bf16_flops_per_s = self.figure(2 * n**3 / seconds)
        self.checks["matmul bf16 s"] = seconds
        if self.info.fp8_problem is None:
            from pipeline.denoise.fp8 import quantize_rows

            (qa, sa), (qb, sb) = quantize_rows(a), quantize_rows(b)
            call = lambda: torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), out_dtype=a.dtype)  # noqa: E731
            _, seconds = timed(call, device, repeats)
            self.matmul.fp8_flops_per_s = self.figure(2 * n**3 / seconds)

    def forward(self, model, mode: str, backend: str, size: str, rows: int) -> ForwardRecord:
        record = ForwardRecord(mode, backend, size, rows, tokens(self.shape.shapes[size]), "ok")
        calls = 1 + self.args.repeats + (0 if mode != "compiled" else 4)
        if not self.affordable(self.expected_s(size, rows, calls)):
            record.status = "skipped: time budget spent"
            return record
        batch = inputs(self.shape, size, rows, self.device)
        try:
            with torch.inference_mode(), Memory(self.device) as memory:
                first, seconds = timed(
                    lambda: model(**batch, return_dict=False), self.device, self.args.repeats
                )
        except (RuntimeError, ValueError, torch.OutOfMemoryError) as error:
            record.status = f"failed: {str(error).splitlines()[0][:160]}"
            self.checks[f"{mode} {backend} {size} x{rows}"] = record.status
            return record
        self.checks[f"{mode} {backend} {size} x{rows} s"] = seconds
        if self.dry:
            record.status = "dry run"
            return record
        rate = self.flops(size, rows) / (seconds * self.scale)
        record.seconds = seconds * self.scale
        record.compile_s = (first - seconds) if mode == "compiled" else None
        record.tflops_per_s = rate / 1e12
        peak = self.info.datasheet_bf16_flops_per_s
        record.mfu_datasheet = rate / peak if peak else None
        record.mfu_matmul = rate / self.matmul.bf16_flops_per_s if self.matmul.bf16_flops_per_s else None
        record.peak_memory_bytes, record.activation_bytes = memory.peak, memory.activation
        print(
            f"{mode:<8} {backend:<14} {size} x{rows}: {record.seconds:8.3f} s/forward "
            f"(x{self.scale:g} from {self.layers} layers)  {record.tflops_per_s:6.1f} TFLOP/s  "
            f"peak {(memory.peak or 0) / 2**30:5.1f} GiB",
            flush=True,
        )
        return record

    def vae_variant(self, variant: VaeVariant, expected_s: float, call, reference: list) -> VaeVariant:
        """Time one decode (`call` returns its Frames) unless `expected_s` would overrun the budget; a decode
        that raises is recorded as failed (its memory freed) and the next variant runs."""
        if not self.affordable(expected_s):
            variant.status = "skipped: time budget spent"
            return variant
        failed = None
        try:
            with Memory(self.device) as memory:
                sync(self.device)
                start = time.perf_counter()
                frames = call()
                sync(self.device)
                seconds = time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 - out of memory, a missing kernel: recorded, the run goes on
            failed = failure(error)
        if failed is not None:  # out of the handler: its traceback, which held the decode's tensors, is gone
            variant.status = failed
            self.checks[f"vae {variant.name}"] = failed
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return variant
        return self.record_vae(variant, seconds, memory.peak, frames.pixels, reference)

    def record_vae(self, variant: VaeVariant, seconds: float, peak: int | None, pixels, reference: list):
        """`variant` with its measured figures (None on a dry run, whose values go to dry_run_checks); its
        frames against the float32 full decode's (kept in `reference` when this is that decode)."""
        self.checks[f"vae {variant.name} s"] = seconds
        self.checks[f"vae {variant.name} frames"] = int(pixels.shape[0])
        if variant.name == "full float32":
            reference.append(pixels)
        elif reference and variant.decoder == "vae":  # the fast decoder is another network: no difference
            diff, psnr = frame_difference(pixels, reference[0])
            self.checks[f"vae {variant.name} max abs diff"] = diff
            variant.max_abs_diff, variant.psnr_db = self.figure(diff), self.figure(psnr)
        variant.seconds, variant.peak_memory_bytes = self.figure(seconds), self.figure(peak)
        variant.status = "dry run" if self.dry else "ok"
        if not self.dry:
            quality = "" if variant.psnr_db is None else f", {variant.psnr_db:.1f} dB vs float32"
            print(
                f"vae      {variant.name:<18} 720p 81 frames: {seconds:8.3f} s, peak "
                f"{(peak or 0) / 2**30:5.1f} GiB{quality}",
                flush=True,
            )
        return variant

    def forwards(self, model, mode: str, backend: str) -> list[ForwardRecord]:
        return [
            self.forward(model, mode, backend, size, rows)
            for size in self.args.sizes
            for rows in self.args.rows
        ]


def device_info(device: torch.device) -> DeviceInfo:
    from pipeline.denoise.fp8 import fp8_problem

    if device.type != "cuda":
        return DeviceInfo(device.type, platform.processor() or None, 0, None, None, None, fp8_problem(device))
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    return DeviceInfo(
        type="cuda",
        name=name,
        count=torch.cuda.device_count(),
        capability=f"{major}.{minor}",
        memory_bytes=torch.cuda.get_device_properties(device).total_memory,
        datasheet_bf16_flops_per_s=next((peak for key, peak in PEAKS.items() if key in name), None),
        fp8_problem=fp8_problem(device),
    )


# ---- the steps -------------------------------------------------------------------------------------------


def probe_compiled(probe: Probe) -> list[ForwardRecord]:
    from pipeline.denoise.kernels import compile_blocks, set_attention_backend

    backend = probe.args.compile_backend
    if probe.dry:
        probe.checks["compile"] = "skipped on the dry run: inductor on a CPU says nothing about a GPU"
        return [
            ForwardRecord("compiled", backend, size, rows, tokens(probe.shape.shapes[size]), "dry run")
            for size in probe.args.sizes
            for rows in probe.args.rows
        ]
    model = build_expert(probe.shape, probe.layers, probe.device)
    set_attention_backend(model, backend)
    compile_blocks(model)
    records = probe.forwards(model, "compiled", backend)
    del model
    return records


def probe_eager(probe: Probe, backend: str) -> tuple[list[ForwardRecord], object]:
    """Eager forwards with `backend`; returns the model too (the FP8 step reuses its weights)."""
    from pipeline.denoise.kernels import set_attention_backend

    model = build_expert(probe.shape, probe.layers, probe.device)
    try:
        set_attention_backend(model, backend)
    except (RuntimeError, ValueError, ImportError) as error:
        why = f"unavailable: {str(error).splitlines()[0][:160]}"
        return [
            ForwardRecord("eager", backend, size, rows, tokens(probe.shape.shapes[size]), why)
            for size in probe.args.sizes
            for rows in probe.args.rows
        ], model
    return probe.forwards(model, "eager", backend), model


def probe_fp8(probe: Probe, model, eager: list[ForwardRecord]) -> Fp8Record:
    """The same 480p row in bf16 and in FP8 (max abs diff, PSNR), then FP8 forward times."""
    from pipeline.denoise.fp8 import quantize_fp8

    size = "480p"
    record = Fp8Record(status="ok", size=size)
    if probe.args.fp8 == "off":
        record.status = "off"
        return record
    if probe.info.fp8_problem is not None:
        record.status = f"unsupported: {probe.info.fp8_problem}"
        return record
    if not probe.affordable(probe.expected_s(size, 1, 2) + 30):
        record.status = "skipped: time budget spent"
        return record
    batch = inputs(probe.shape, size, 1, probe.device)
    with torch.inference_mode():
        reference = model(**batch, return_dict=False)[0].float()
        record.num_layers_quantized = quantize_fp8(model, probe.device)
        approximate = model(**batch, return_dict=False)[0].float()
    error = (approximate - reference).abs()
    mse = float((error**2).mean())
    value_range = float(reference.max() - reference.min())
    record.max_abs_diff = float(error.max())
    record.psnr_db = 10 * math.log10(value_range**2 / mse) if mse > 0 else None  # JSON: no inf
    record.forwards = probe.forwards(model, "fp8", probe.args.backends[0])
    for fp8 in record.forwards:
        bf16 = next(
            (r for r in eager if (r.size, r.rows, r.backend) == (fp8.size, fp8.rows, fp8.backend)), None
        )
        if fp8.seconds and bf16 is not None and bf16.seconds:
            record.speedup[f"{fp8.size} x{fp8.rows}"] = bf16.seconds / fp8.seconds
    return record


def probe_engine(probe: Probe) -> EngineRecord:
    """One DenoiseEngine iteration as a replica runs it: batch-invariant layers, a LoRA adapter set, request
    A's row served from its step cache while request B computes with CFG; beside the bare forward of B's
    two rows on the same weights before the engine touched them."""
    from pipeline.denoise.adapters import AdapterBank
    from pipeline.denoise.engine import DenoiseEngine, EngineRequest
    from pipeline.denoise.kernels import set_attention_backend
    from pipeline.denoise.state import DenoiseState
    from pipeline.denoise.stepcache import MagnitudeCurve
    from pipeline.lora import expert_file, random_lora_state_dict, save_lora_folder
    from pipeline.spec import ModelSpec, StepCacheSettings
    from pipeline.text import PromptEmbeds
    from pipeline.weights import wan_scheduler

    size, backend = "480p", probe.args.backends[0]
    record = EngineRecord(size, "ok", 2, None, "probe-lora@1")
    if not probe.affordable(probe.expected_s(size, 2, 2 + probe.args.repeats) * 1.3 + 30):
        record.status = "skipped: time budget spent"
        return record
    model = build_expert(probe.shape, probe.layers, probe.device)
    set_attention_backend(model, backend)
    batch = inputs(probe.shape, size, 2, probe.device)
    with torch.inference_mode():
        _, bare = timed(lambda: model(**batch, return_dict=False), probe.device, probe.args.repeats)
    spec = ModelSpec()
    config = {**probe.shape.transformer, "num_layers": probe.layers}
    folder = save_lora_folder(
        Path(tempfile.mkdtemp(prefix="previz-probe-lora-")),
        {"high": random_lora_state_dict(config, rank=probe.shape.lora_rank, seed=0)},
    )
    bank = AdapterBank(model)
    bank.add("probe-lora", expert_file(folder, "high"))
    steps = 8
    flat = MagnitudeCurve(cond=(1.0,) * steps, uncond=(1.0,) * steps, source="gpu_probe: every step may skip")
    engine = DenoiseEngine(
        model,
        wan_scheduler(spec.flow_shift),
        expert="high",
        boundary_ratio=spec.boundary_ratio,
        max_sequence_length=probe.shape.text_tokens,
        max_num_tokens=10**9,
        adapters=bank,
        cache_curve=flat,
    )
    text_dim = probe.shape.transformer["text_dim"]

    def request(request_id: str, cache: StepCacheSettings | None) -> EngineRequest:
        generator = torch.Generator().manual_seed(len(request_id))
        latents = torch.randn((16, *probe.shape.shapes[size]), generator=generator)
        embeds = PromptEmbeds(torch.randn(probe.shape.text_tokens, text_dim, generator=generator))
        return EngineRequest(
            request_id=request_id,
            state=DenoiseState(latents=latents, num_steps=steps),
            prompt=embeds,
            negative_prompt=embeds,
            guidance=4.0,
            adapters=(("probe-lora", 1.0),),
            cache=cache,
        )

    engine.submit(request("cached", StepCacheSettings(threshold=0.5, max_skip=1, warmup_steps=0)))
    engine.step()  # its first step computes (and compiles nothing: eager) and stores its residual
    engine.submit(request("computing", None))
    with Memory(probe.device) as memory:
        seconds = _time_call(engine.step, probe)
    stats = engine.stats()
    record.num_cached_steps = stats.num_cached_steps
    probe.checks["engine iteration s"] = seconds
    probe.checks["engine cached steps"] = stats.num_cached_steps
    engine.shutdown()
    record.engine_seconds = probe.figure(seconds * probe.scale)
    record.bare_seconds = probe.figure(bare * probe.scale)
    record.engine_over_bare = probe.figure(seconds / bare)
    record.peak_memory_bytes = memory.peak
    if not probe.dry:
        print(
            f"engine   {backend:<14} {size} x2 (+1 cached row, LoRA): {record.engine_seconds:8.3f} s, "
            f"bare {record.bare_seconds:.3f} s ({record.engine_over_bare:.2f}x)",
            flush=True,
        )
    return record


# seconds of a 720p 81-frame full-VAE decode in bf16 on one H100 (the cost model's 170 s per 1e9
# pixel-frames), times each variant's factor and 3 for a pessimistic budget check
VAE_BF16_720P_S = 12.7
VAE_FACTORS = {"float32": 2.0, "bfloat16": 1.0, "tiled": 1.3, "fast": 0.1, "ranks": 1.0}
VAE_SPAWN_S = 60.0  # two fresh processes: imports, the VAE built, the group formed


def probe_vae(probe: Probe) -> VaeRecord:
    """A 720p 81-frame decode (21 latent frames of 90 x 160, random Wan2.1 VAE weights) several ways: the
    product's VAEDecoder in full frames in float32 (the reference) and in `--vae-dtype` (bf16, the
    product's default on a GPU), then in 256-pixel tiles, the draft tier's TAEHV decoder, and split over 2
    ranks (pipeline.vae_parallel; NCCL on 2 GPUs, gloo on 2 CPU processes on a dry run, else skipped).
    Each variant that raises (out of memory, a missing kernel) is recorded as failed and the next runs."""
    record = VaeRecord("720p", 81, "ok")
    if "vae" not in probe.args.steps:
        record.status = "skipped: not in --steps"
        return record
    from pipeline.taehv import WIDTHS, FastDecoder, random_taehv
    from pipeline.vae import VAEDecoder
    from pipeline.vae_memory import TILES, DecodePlan, estimate_bytes

    latents = torch.randn((16, *probe.shape.shapes["720p"]), generator=torch.Generator().manual_seed(0))
    shape = tuple(latents.shape)
    dtype_name = probe.args.vae_dtype
    dtype = getattr(torch, dtype_name)
    try:
        vae = build_vae(probe.shape.vae, probe.device)
        # a small decode first, so that no variant's time holds cuDNN's set-up
        VAEDecoder(vae, dtype=torch.float32).decode(latents[:, :2, :8, :8], fps=16)
    except Exception as error:  # noqa: BLE001 - recorded, and the steps after this one run
        record.status = failure(error)
        probe.checks["vae"] = record.status
        return record
    reference: list = []  # the float32 full decode's frames, once made

    def one_device(name: str, dtype: torch.dtype, tile: tuple[int, int] | None) -> VaeVariant:
        variant = VaeVariant(name, "vae", str(dtype).removeprefix("torch."), 1, tile and tile[0], "ok")
        factor = VAE_FACTORS[variant.dtype] * (VAE_FACTORS["tiled"] if tile else 1.0)
        plan = DecodePlan(
            "tiled" if tile else "full", tile, estimate_bytes(vae.config, shape, dtype, tile), None, True
        )
        variant.estimate_bytes = probe.figure(plan.estimate_bytes)
        decoder = VAEDecoder(vae, dtype=dtype)  # casts the VAE in place: float32 runs first
        return probe.vae_variant(
            variant,
            3 * factor * VAE_BF16_720P_S,
            lambda: decoder.decode(latents, fps=16, plan=plan),
            reference,
        )

    variants = [one_device("full float32", torch.float32, None)]
    if dtype != torch.float32:
        variants.append(one_device(f"full {dtype_name}", dtype, None))
    # the plan's first tile (256 pixels); the dry run's frame is smaller, so its smallest tile (64)
    variants.append(one_device(f"tiled {dtype_name}", dtype, TILES[-1] if probe.dry else TILES[0]))
    widths = WIDTHS if not probe.dry else (16, 8, 8, 8)
    fast = VaeVariant(f"fast {dtype_name}", "fast", dtype_name, 1, None, "ok")
    try:
        decoder = FastDecoder(random_taehv(0, widths).to(probe.device), dtype=dtype)
    except Exception as error:  # noqa: BLE001 - recorded, and the next variant runs
        fast.status = failure(error)
    else:
        fast = probe.vae_variant(
            fast,
            3 * VAE_FACTORS["fast"] * VAE_BF16_720P_S,
            lambda: decoder.decode(latents, fps=16),
            reference,
        )
    variants.append(fast)
    if probe.device.type == "cuda":
        torch.cuda.empty_cache()  # GPU 0's cached blocks, for rank 0
    variants.append(probe_vae_ranks(probe, vae.config, latents, dtype_name, reference))
    record.variants = variants
    record.status = "dry run" if probe.dry else "ok"
    return record


def build_vae(config: dict, device: torch.device):
    """The Wan2.1 VAE at `config` (empty: the real one) with seed-0 random float32 weights, built on the CPU
    (so every process that builds it gets the same weights) and moved to `device`."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(**config).eval().requires_grad_(False).to(device)


def failure(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [""]
    return f"failed: {type(error).__name__}: {lines[0][:160]}"


def probe_vae_ranks(
    probe: Probe, vae_config, latents: torch.Tensor, dtype_name: str, reference: list
) -> VaeVariant:
    """The same decode split over 2 ranks, each its block of every frame: 2 GPUs over NCCL, or on a dry run
    2 CPU processes over gloo; skipped with one GPU."""
    import torch.multiprocessing as mp

    from pipeline.vae_parallel import block_plan

    world = 2
    variant = VaeVariant(f"{world} ranks {dtype_name}", "vae", dtype_name, world, None, "ok")
    count = torch.cuda.device_count() if probe.device.type == "cuda" else 0
    if not probe.dry and count < world:
        variant.status = f"skipped: {count} GPU"
        return variant
    expected = VAE_SPAWN_S + 3 * VAE_FACTORS[dtype_name] * VAE_BF16_720P_S / world
    if not probe.affordable(expected):
        variant.status = "skipped: time budget spent"
        return variant
    plan = block_plan(vae_config, tuple(latents.shape), getattr(torch, dtype_name), world, None)
    variant.estimate_bytes = probe.figure(plan.estimate_bytes if plan is not None else None)
    out = Path(tempfile.mkdtemp(prefix="previz-vae-ranks-")) / "rank0.pt"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = (world, port, probe.shape.vae, dtype_name, latents, probe.dry, out)
    try:
        mp.start_processes(vae_rank, args=args, nprocs=world, join=True, start_method="spawn")
        result = torch.load(out, weights_only=False)
    except Exception as error:  # noqa: BLE001 - a rank's error (NCCL, memory) is recorded, the run goes on
        variant.status = failure(error)
        probe.checks[f"vae {variant.name}"] = variant.status
        return variant
    return probe.record_vae(variant, result["seconds"], result["peak"], result["pixels"], reference)


def vae_rank(
    rank: int,
    world: int,
    port: int,
    config: dict,
    dtype_name: str,
    latents: torch.Tensor,
    dry: bool,
    out: Path,
) -> None:
    """One rank of the parallel decode: rank 0 times `decode` (it keeps the clip), the others take part."""
    from pipeline.denoise.parallel import init_process_group
    from pipeline.vae_parallel import ParallelVAEDecoder

    if dry:
        torch.set_num_threads(1)
    device = init_process_group(rank, world, "127.0.0.1", port, 600, "cpu" if dry else f"cuda:{rank}")
    try:
        vae = build_vae(config, device)
        decoder = ParallelVAEDecoder(vae, dtype=getattr(torch, dtype_name))  # every rank: a barrier
        del vae
        decoder.take_part(latents[:, :2, :8, :8])  # cuDNN and NCCL set up outside the timing
        with Memory(device) as memory:
            sync(device)
            start = time.perf_counter()
            if rank == 0:
                pixels = decoder.decode(latents, fps=16).pixels
            else:
                decoder.take_part(latents)
            sync(device)
            seconds = time.perf_counter() - start
        if rank == 0:
            torch.save({"seconds": seconds, "peak": memory.peak, "pixels": pixels}, out)
    finally:
        import torch.distributed as dist

        dist.destroy_process_group()


def frame_difference(pixels, reference) -> tuple[float, float | None]:
    """(max abs diff / 255, PSNR in dB) of two uint8 clips, frame by frame (a 720p clip is 224 MB)."""
    import numpy as np

    worst, squares = 0, 0.0
    for mine, theirs in zip(pixels, reference, strict=True):
        diff = mine.astype(np.int16) - theirs.astype(np.int16)
        worst = max(worst, int(np.abs(diff).max()))
        squares += float(np.square(diff, dtype=np.float64).sum())
    mse = squares / reference.size
    return worst / 255, (10 * math.log10(255**2 / mse) if mse > 0 else None)  # None: equal (JSON has no inf)


def _time_call(call, probe: Probe) -> float:
    """Wall seconds of one call, the device synchronized before both clock reads."""
    sync(probe.device)
    start = time.perf_counter()
    call()
    sync(probe.device)
    return time.perf_counter() - start


def memory_fits(probe: Probe, records: list[ForwardRecord]) -> list[MemoryFit]:
    """EXTRAPOLATED row counts per size, for one expert's and both experts' weights on this GPU."""
    usable = None
    if probe.info.memory_bytes is not None:
        usable = probe.info.memory_bytes - probe.args.memory_reserve_gb * 2**30
    fits = []
    for size in SHAPES:
        points = [
            (r.rows, r.activation_bytes)
            for r in records
            if (r.mode, r.backend, r.size) == ("eager", probe.args.backends[0], size) and r.activation_bytes
        ]
        a = b = None
        if points:
            a, b = _line(points)
        residual = tokens(probe.shape.shapes[size]) * probe.shape.dim * 2  # bf16 blocks residual, one row
        for weights, weights_bytes in (
            ("one_expert", ONE_EXPERT_BYTES),
            ("both_experts", BOTH_EXPERTS_BYTES),
        ):
            rows = cached = None
            if usable is not None and b:
                rows = max(0, math.floor((usable - weights_bytes - a) / b))
                cached = max(0, math.floor((usable - weights_bytes - a) / (b + residual)))
            fits.append(MemoryFit(size, weights, weights_bytes, a, b, usable, rows, cached))
            if rows is not None:
                print(
                    f"memory   {size} {weights}: {rows} rows fit ({cached} with step caches) [extrapolated]"
                )
    return fits


def _line(points: list[tuple[int, int]]) -> tuple[float, float]:
    """(a, b) of activation = a + b rows by least squares; through 0 when one row count was measured."""
    if len({rows for rows, _ in points}) == 1:
        rows, value = points[0]
        return 0.0, value / rows
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    b = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - b * mean_x, b


def rank_main(rank: int, world: int, port: int, ulysses: int, cfg: int, args, out: str) -> None:
    """One rank of a scaling run: rank 0 times run_rows of one guided 480p/720p request, the others serve."""
    from pipeline.denoise.forward import Rows
    from pipeline.denoise.parallel import ShardGroup, worker_loop

    group = ShardGroup.init(rank, world, "127.0.0.1", port, ulysses=ulysses, cfg=cfg, timeout_s=600)
    model = group.shard(build_expert(GPU_SHAPE, args.layers, group.device))
    if rank != 0:
        worker_loop(group, {"high": model})
        group.close()
        return
    records = []
    for size in args.sizes:
        batch = inputs(GPU_SHAPE, size, 2, group.device)
        rows = Rows(batch["hidden_states"], batch["timestep"], batch["encoder_hidden_states"])
        with torch.inference_mode():
            _, seconds = timed(lambda: group.run_rows("high", model, rows), group.device, args.repeats)  # noqa: B023
        record = ForwardRecord(f"ulysses{ulysses}xcfg{cfg}", "native", size, 2, tokens(SHAPES[size]), "ok")
        record.seconds = seconds * NUM_LAYERS / args.layers
        records.append(asdict(record))
        print(f"Ulysses {ulysses} x CFG {cfg} ({world} GPUs) {size} x2: {record.seconds:8.3f} s/forward")
    group.close()
    Path(out).write_text(json.dumps(records))


def probe_scaling(probe: Probe) -> list[ForwardRecord]:
    import torch.multiprocessing as mp

    count = torch.cuda.device_count() if probe.device.type == "cuda" else 0
    if count < 2:
        return []
    world = max(n for n in (1, 2, 4, 5, 8) if n <= count)
    records = []
    for ulysses, cfg in [(world, 1)] + ([(world // 2, 2)] if world % 2 == 0 else []):
        if probe.budget.left() < probe.args.scaling_reserve_s:
            records.append(
                ForwardRecord(f"ulysses{ulysses}xcfg{cfg}", "native", "-", 2, 0, "skipped: budget")
            )
            continue
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        out = tempfile.mktemp(suffix=".json", prefix="previz-scaling-")
        mp.start_processes(
            rank_main, args=(world, port, ulysses, cfg, probe.args, out), nprocs=world, start_method="spawn"
        )
        records += [ForwardRecord(**record) for record in json.loads(Path(out).read_text())]
    return records


# ---- the run ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, wheels: list[str], project: str) -> tuple[Report, float]:
    """The report of one run, and the monotonic clock when it started."""
    started, started_at = time.monotonic(), datetime.now(UTC).isoformat(timespec="seconds")
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    probe = Probe(args, device)
    if args.fp8 == "on" and probe.info.fp8_problem is not None:
        raise SystemExit(f"gpu_probe: --fp8 on: {probe.info.fp8_problem}")
    peak = probe.info.datasheet_bf16_flops_per_s
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown"
    print(f"# {probe.info.name or device.type}: datasheet dense bf16 peak {peak_text}")
    steps = set(args.steps)
    if "matmul" in steps:
        probe.measure_matmul()
    if probe.matmul.bf16_flops_per_s:
        print(
            f"matmul   {probe.shape.matmul_size}^3 bf16: {probe.matmul.bf16_flops_per_s / 1e12:.0f} TFLOP/s"
        )
    # compile first: with the default budget it is always measured
    forwards = probe_compiled(probe) if "compile" in steps else []
    fp8 = Fp8Record(status="skipped: not in --steps", size="480p")
    if "eager" in steps:
        eager, model = probe_eager(probe, args.backends[0])
        forwards += eager
        if "fp8" in steps:
            fp8 = probe_fp8(probe, model, eager)
        del model
    elif "fp8" in steps:
        fp8.status = "skipped: FP8 is measured against the eager forwards (--steps eager)"
    engine = (
        probe_engine(probe)
        if "engine" in steps
        else EngineRecord("480p", "skipped: not in --steps", 2, None, "probe-lora@1")
    )
    vae = probe_vae(probe)
    for backend in args.backends[1:] if "eager" in steps else []:
        more, model = probe_eager(probe, backend)
        forwards += more
        del model
    scaling = probe_scaling(probe) if "scaling" in steps else []
    import diffusers
    import pydantic

    notes = [
        "seconds are for all 40 layers: measured on --layers blocks and scaled by 40 / layers",
        "memory_fit is extrapolated: measured activations plus 28.6 GB (one expert) or 57.2 GB (both)",
        "multi-GPU degrees are modelled (loadtest.cost_model) unless scaling lists measured ones",
    ]
    return Report(
        format=FORMAT,
        command=["python", "-m", "loadtest.gpu_probe", *sys.argv[1:]],
        dry_run=args.dry_run,
        started_at=started_at,
        wall_s=None,
        python=platform.python_version(),
        packages={
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "pydantic": pydantic.VERSION,
        },
        wheels=wheels,
        project_source=project,
        settings={key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        device=probe.info,
        matmul=probe.matmul,
        forwards=forwards,
        memory_fit=memory_fits(probe, forwards),
        engine=engine,
        fp8=fp8,
        vae=vae,
        scaling=scaling,
        published=PUBLISHED,
        dry_run_checks=probe.checks if args.dry_run else {},
        notes=notes,
    ), started


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    listed = lambda kind: lambda text: [kind(item) for item in text.split(",") if item]  # noqa: E731
    parser.add_argument("--wheels", type=Path, help="scripts/gpu_wheels.sh's folder: put first on sys.path")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU; GPU figures null")
    parser.add_argument(
        "--layers", type=int, default=8, help="blocks built and timed (of 40); time is scaled"
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per measurement")
    parser.add_argument(
        "--backends", type=listed(str), default=["native", "_native_cudnn"], help="eager attention backends"
    )
    parser.add_argument("--compile-backend", default="native", help="attention backend of the compiled run")
    parser.add_argument("--sizes", type=listed(str), default=["480p", "720p"], help="480p and/or 720p")
    parser.add_argument("--rows", type=listed(int), default=[1, 2], help="rows per forward, e.g. 1,2,4")
    parser.add_argument(
        "--fp8",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: where the GPU has FP8 tensor cores",
    )
    parser.add_argument(
        "--vae-dtype",
        choices=("float32", "bfloat16"),
        default="bfloat16",
        help="the VAE variants' dtype beside the float32 reference (bfloat16: the product's on a GPU)",
    )
    parser.add_argument(
        "--steps",
        type=listed(str),
        default=list(STEPS),
        help=f"the steps to run, of {','.join(STEPS)} (e.g. --steps matmul,vae); the others are skipped",
    )
    parser.add_argument("--memory-reserve-gb", type=float, default=2.0, help="kept free in the memory fit")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start nothing that would end later")
    parser.add_argument("--scaling-reserve-s", type=float, default=90.0, help="time one scaling run may need")
    args = parser.parse_args(argv)
    if not 1 <= args.layers <= NUM_LAYERS:
        parser.error(f"--layers must be in 1..{NUM_LAYERS} but is {args.layers}.")
    if unknown := sorted(set(args.sizes) - set(SHAPES)):
        parser.error(f"--sizes must name {' and/or '.join(SHAPES)} but has {', '.join(unknown)}.")
    if unknown := [step for step in args.steps if step not in STEPS]:
        parser.error(f"--steps must name some of {', '.join(STEPS)} but has {', '.join(unknown)}.")
    if not args.rows or min(args.rows) < 1 or not args.backends:
        parser.error("--rows must be positive counts and --backends must name at least one backend.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    wheels, project = use_wheels(args.wheels) if args.wheels else ([], "checkout")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_probe: no CUDA GPU on this machine; nothing to probe (--dry-run checks the probe on CPU).")
        return 0
    report, started = run(args, wheels, project)
    report.wall_s = time.monotonic() - started
    text = json.dumps(asdict(report), indent=1, allow_nan=False)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"gpu_probe: wrote {args.out} ({report.wall_s:.0f} s)")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
