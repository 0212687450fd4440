"""The JSON report of loadtest.gpu_probe, one dataclass per part: every field is written on every run, the
figures only a GPU can give are null on a --dry-run. loadtest.cost_model --from-probe reads it back.

Standard library only: the probe imports this before --wheels has put diffusers and pydantic on sys.path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FORMAT = 2  # 2: vae holds one row per decode variant; bump when a field changes meaning; readers check it


@dataclass(slots=True)
class DeviceInfo:
    type: str  # cuda or cpu
    name: str | None
    count: int  # CUDA devices
    capability: str | None  # e.g. "9.0"
    memory_bytes: int | None  # total memory of GPU 0
    datasheet_bf16_flops_per_s: float | None  # dense bf16 peak of the datasheet, None when unknown
    fp8_problem: str | None  # why FP8 matmuls cannot run here; None when they can


@dataclass(slots=True)
class MatmulRate:
    size: int  # n of the n x n x n GEMM
    bf16_flops_per_s: float | None  # measured; None on a dry run
    fp8_flops_per_s: float | None  # torch._scaled_mm rowwise; None without FP8 or on a dry run


@dataclass(slots=True)
class ForwardRecord:
    mode: str  # compiled, eager or fp8
    backend: str  # diffusers' attention backend
    size: str
    rows: int
    num_tokens: int  # video tokens a row
    status: str  # ok, skipped: why, failed: why, dry run
    seconds: float | None = None  # one forward of all 40 layers (measured layers x 40 / layers)
    compile_s: float | None = None  # first call minus a timed one (compiled only)
    tflops_per_s: float | None = None
    mfu_datasheet: float | None = None  # share of the datasheet's dense bf16 peak
    mfu_matmul: float | None = None  # share of the measured 8192^3 bf16 matmul rate
    peak_memory_bytes: int | None = None  # max allocated during the measurement (weights included)
    activation_bytes: int | None = None  # peak minus what was allocated before it (weights, inputs)


@dataclass(slots=True)
class MemoryFit:
    """EXTRAPOLATED: rows of one size that fit next to the weights, from measured activations."""

    size: str
    weights: str  # one_expert or both_experts
    weights_bytes: float
    activation_fixed_bytes: float | None  # a in activation(rows) = a + b rows, least squares
    activation_per_row_bytes: float | None  # b
    usable_bytes: float | None  # the GPU's memory minus --memory-reserve-gb
    max_rows: int | None
    max_rows_step_cached: int | None  # each row also holding a step-cache residual (tokens x 5120 bf16)
    extrapolated: bool = True


@dataclass(slots=True)
class EngineRecord:
    size: str
    status: str
    num_rows_computed: int  # rows through the blocks in the timed iteration
    num_cached_steps: int | None  # the engine's count after it: 1 when the cached row was served
    adapters: str  # the adapter set of the iteration
    engine_seconds: float | None = None  # one DenoiseEngine iteration, scaled to 40 layers
    bare_seconds: float | None = None  # the bare forward of the same computing rows, same weights
    engine_over_bare: float | None = None
    peak_memory_bytes: int | None = None


@dataclass(slots=True)
class Fp8Record:
    status: str  # ok, off, unsupported: why, skipped: why
    size: str
    num_layers_quantized: int | None = None
    max_abs_diff: float | None = None  # FP8 vs bf16 noise prediction, one row
    psnr_db: float | None = None  # over the bf16 prediction's range
    forwards: list[ForwardRecord] = field(default_factory=list)
    speedup: dict[str, float] = field(default_factory=dict)  # "480p x1" -> bf16 eager s / FP8 s, same backend


@dataclass(slots=True)
class VaeVariant:
    """One way of decoding the clip: latents on the host in, uint8 frames on the host out."""

    name: str  # "full float32", "full bfloat16", "tiled bfloat16", "fast bfloat16", "2 ranks bfloat16"
    decoder: str  # vae (the product's VAEDecoder / ParallelVAEDecoder) | fast (TAEHV, random weights)
    dtype: str  # the decoder's weights and compute
    ranks: int  # processes (GPUs) one decode is split over (pipeline.vae_parallel)
    tile: int | None  # tile side in pixels when tiled (diffusers' tiling, the memory plan's first tile)
    status: str  # ok, dry run, failed: why, skipped: why
    seconds: float | None = None  # one decode, the device synchronized before both clock reads
    peak_memory_bytes: int | None = None  # torch's max allocated during it (rank 0's)
    estimate_bytes: int | None = None  # pipeline.vae_memory's estimate of its peak (a block's on ranks)
    max_abs_diff: float | None = None  # of the uint8 frames / 255, against "full float32"
    psnr_db: float | None = None  # of the uint8 frames, against "full float32"


@dataclass(slots=True)
class VaeRecord:
    """One clip decoded several ways: the product's VAEDecoder (latent frame by latent frame, uint8 out)
    in float32 (the reference of the differences) and in the product's dtype, then tiled, then by the fast
    draft decoder, then split over 2 GPUs when there are 2."""

    size: str  # 720p: latents (16, 21, 90, 160)
    num_frames: int  # 81 video frames
    status: str  # ok, dry run, skipped: why (each variant has its own)
    variants: list[VaeVariant] = field(default_factory=list)


@dataclass(slots=True)
class Report:
    format: int
    command: list[str]
    dry_run: bool
    started_at: str
    wall_s: float | None
    python: str
    packages: dict[str, str]  # name -> version imported
    wheels: list[str]  # the wheel files put first on sys.path
    project_source: str  # checkout, or the previz wheel
    settings: dict[str, object]  # the command line, parsed
    device: DeviceInfo
    matmul: MatmulRate
    forwards: list[ForwardRecord]
    memory_fit: list[MemoryFit]
    engine: EngineRecord
    fp8: Fp8Record
    vae: VaeRecord
    scaling: list[ForwardRecord]
    published: dict[str, object]
    dry_run_checks: dict[str, object]  # what the dry run ran at its tiny shape (seconds or a status)
    notes: list[str]
