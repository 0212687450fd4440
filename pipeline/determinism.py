"""Same seed, same take: a request's frames do not depend on what else shares its batch, or on the run.

Two different things have to hold, and each has its own switch here.

Batch invariance (`make_batch_invariant`, applied by the DenoiseEngine, which the Denoiser drives, and the
TextEncoder to their networks). A kernel's result for one row can depend on how many rows it is given. On CPU
(MKL/oneDNN, fp32, measured here): the DiT's time-embedding linears run with M = batch rows, and M = 2 (a
request alone: cond + uncond) and M = 6 (three requests) pick different GEMM kernels, up to 2e-5 apart;
and SiLU/GELU hand the tail of a tensor to a scalar exp/tanh, so a row that straddles a vector boundary
rounds differently in another batch size. The large-M GEMMs (tokens x rows) were row-invariant in every
shape tried, but nothing promises it, and on CUDA cuBLAS chooses tiles and split-K by M for every GEMM.
So every plain `nn.Linear`, `nn.Conv3d` (the patch embedding), `nn.SiLU` and `nn.GELU` of these networks
runs each batch row with its own call: a row meets the very kernels it meets when its request runs
alone. It is still ONE transformer forward per iteration (attention, norms and the rest run batched and
are per-row already); the cost is a GEMM launch per row, measured on CPU at 1.06x the batched forward
with 1,440 tokens per row (small preset, 16 rows), 1.25x at 72 tokens, nothing visible at 480p's 32,760.

Measured on the tiny preset (CPU, 8 steps, one seed alone vs in a batch of three with other prompts,
seeds and step counts, high + low expert, then the VAE): before, latents up to 1.9e-6 and uint8 frames
1/255 apart (the H.264 encoder turned that into pixels 10/255 apart, mean 0.06); now equal bit for bit,
and tests/test_determinism.py asserts it. A request batched equals it alone in the engine exactly too.

Run-to-run determinism (`use_deterministic_kernels`, process-wide, called by every stage replica and by
`previz generate` before a model loads): torch's deterministic algorithms (warn-only: an op without one
warns instead of failing a job), `CUBLAS_WORKSPACE_CONFIG` (cuBLAS repeats itself only with a fixed
workspace), cuDNN without its benchmark autotuner (it picks algorithms by timing) and with deterministic
algorithms only, fp32 matmuls in full precision (no TF32) and bf16/fp16 GEMMs without reduced-precision
reductions. cuDNN convolutions (the fp32 VAE) keep TF32: it is deterministic, and a 720p decode is
several times slower without it.

The encoder is the third source: pipeline/video.py encodes without x264's MB-tree, which gave identical
frames different bitstreams (the tiny take above: decoded pixels up to 25/255 apart, mean 0.21).

Noise is per request: `initial_state` draws it from a generator seeded with the request's seed, never
from the global RNG. What this does not give: the same bits on another torch build, CPU ISA, thread count
or GPU model; measured CUDA batch invariance (there is no GPU here: it follows from the per-row shapes,
and fails where a kernel splits work by batch size, e.g. flash-decoding-style split-KV attention at very
short token counts); elementwise activations called as functions (F.gelu inside diffusers' FeedForward)
on rows whose size is not a multiple of the vector width (not the case for any Wan or preset shape).
"""

from __future__ import annotations

import os
from typing import TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)

CUBLAS_WORKSPACE_CONFIG = ":4096:8"
# One row is a GEMV, and MKL's GEMV rounds differently for a weight that does not start on a 64-byte
# boundary (measured: up to 1.6e-5), which safetensors files may give; such weights are copied to an
# aligned block, so the same file gives the same take whether it was loaded or built in memory.
WEIGHT_ALIGNMENT_BYTES = 64  # the setting torch's reproducibility notes give for deterministic cuBLAS


class RowwiseLinear(nn.Linear):
    """`nn.Linear` whose output row i depends on input row i only, bit for bit, whatever the batch size."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 3 or input.shape[0] == 1 or not input.is_contiguous():
            return per_row(super().forward, input)
        return linear_rows(input, self.weight, self.bias)


class RowwiseConv3d(nn.Conv3d):
    """`nn.Conv3d` (the DiT's patch embedding) computed one sample at a time, for the same reason."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return per_row(super().forward, input)


class RowwiseSiLU(nn.SiLU):
    """`nn.SiLU` one row at a time: on CPU the vectorised loop hands a tensor's tail to a scalar exp."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return per_row(super().forward, input)


class RowwiseGELU(nn.GELU):
    """`nn.GELU` one row at a time (its tanh has the same vector/scalar split as SiLU's exp)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return per_row(super().forward, input)


_ROWWISE: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: RowwiseLinear,
    nn.Conv3d: RowwiseConv3d,
    nn.SiLU: RowwiseSiLU,
    nn.GELU: RowwiseGELU,
}


def make_batch_invariant(module: ModuleT) -> ModuleT:
    """Make every plain `nn.Linear` / `nn.Conv3d` inside `module` compute batch rows one by one, in place.

    Parameters, buffers, hooks and state-dict keys stay as they are (only the class changes, and a weight
    off WEIGHT_ALIGNMENT_BYTES gets an aligned copy of its data), so weights load and save as before;
    calling it again is a no-op. Subclasses (quantized or adapter layers) are left alone: they decide
    their own kernels.
    """
    for layer in module.modules():
        rowwise = _ROWWISE.get(type(layer))
        if rowwise is None:
            continue
        layer.__class__ = rowwise
        for param in layer.parameters(recurse=False):
            if param.data_ptr() % WEIGHT_ALIGNMENT_BYTES:
                param.data = param.data.clone(memory_format=torch.contiguous_format)
    return module


def use_deterministic_kernels() -> None:
    """Process-wide switches for bit-identical results run after run (see the module docstring).

    Call it before the first CUDA op: cuBLAS reads `CUBLAS_WORKSPACE_CONFIG` when it creates its handle.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False


def per_row(forward, input: torch.Tensor) -> torch.Tensor:
    """`forward` applied to each slice input[i : i + 1], written into one output (no list + cat copy)."""
    if input.dim() < 2 or input.shape[0] == 1:
        return forward(input)
    first = forward(input[:1])
    out = first.new_empty((input.shape[0], *first.shape[1:]))
    out[:1] = first
    for row in range(1, input.shape[0]):
        out[row : row + 1] = forward(input[row : row + 1])
    return out


def linear_rows(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` of a contiguous (rows, tokens, features) input, one GEMM per row, each written in place.

    For such an input `F.linear` flattens each row to (tokens, features) and calls `addmm` (with a bias) or
    `mm` (without), so these are the very calls a row meets alone, bit for bit; the `out=` forms write into
    the batch's output, sparing per_row's copy of every row (measured: 9 % of a batched forward's time on
    the small preset, CPU). A 4-d or strided input goes another way in `F.linear` and stays with per_row."""
    out = input.new_empty((*input.shape[:2], weight.shape[0]))
    weight_t = weight.t()
    for row in range(input.shape[0]):
        if bias is None:
            torch.mm(input[row], weight_t, out=out[row])
        else:
            torch.addmm(bias, input[row], weight_t, out=out[row])
    return out
