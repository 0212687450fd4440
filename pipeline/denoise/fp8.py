"""FP8 matmuls in an expert's transformer blocks with `torch._scaled_mm` (the GPU image has no torchao).

`quantize_fp8(transformer, device)` replaces every plain linear of `transformer.blocks` (attention
projections, cross-attention, feed-forward: all but a fraction of a percent of the FLOPs) by an
`FP8Linear`: its weight is quantized once to float8 e4m3 with one scale per output channel, and each call
quantizes its input with one scale per token, then runs one scaled GEMM into the weight's dtype (bf16).
This is the recipe of LightX2V's and SGLang's FP8 Wan checkpoints (per-channel weights, per-token
activations), done at load time from the bf16 weights. The embeddings, the time and text projections and
the output head stay as they are (small, and the head feeds the solver directly).

Batch invariance (pipeline.determinism) holds as for RowwiseLinear: each batch row is its own GEMM call
and its own activation scales, so a request's rows meet the kernels they meet alone.

Refused, with the reason, on a device without FP8 tensor cores: CPU, and CUDA GPUs below compute
capability 8.9 (Ada, Hopper and Blackwell have them). LoRA adapters must be loaded before: peft wraps
`nn.Linear` only, and an `FP8Linear` inside its wrapper keeps working as the base layer.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.determinism import RowwiseLinear, per_row

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
MIN_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0
GEMM_ALIGNMENT = 16  # _scaled_mm wants both GEMM sides' inner and outer sizes divisible by 16
_QUANTIZABLE = (nn.Linear, RowwiseLinear)  # exact types: adapter layers and subclasses are left alone


class FP8Unsupported(ValueError):
    """FP8 matmuls were asked for on a device that has no FP8 tensor cores."""


def fp8_problem(device: torch.device | str) -> str | None:
    """Why `device` cannot run FP8 matmuls, or None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return (
            f"FP8 matmuls (torch._scaled_mm) need a CUDA GPU with FP8 tensor cores (compute capability "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+: Ada, Hopper, Blackwell), but the device is "
            f"{device.type!r}; set `fp8: false`."
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        need = f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
        return (
            f"FP8 matmuls (torch._scaled_mm) need compute capability {need}+ but "
            f"{torch.cuda.get_device_name(device)} has {major}.{minor}; set `fp8: false`."
        )
    return None


def check_fp8(device: torch.device | str) -> None:
    """FP8Unsupported naming the reason when `device` cannot run FP8 matmuls."""
    problem = fp8_problem(device)
    if problem is not None:
        raise FP8Unsupported(problem)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in float8 e4m3, scale): one fp32 scale per row of a 2-D tensor, so that x ~ fp8 * scale.

    Scaled in x's own dtype (bf16 keeps 8 mantissa bits, e4m3 3): no fp32 copy of a 720p activation."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    scaled = x * (1.0 / scale).to(x.dtype)
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


class FP8Linear(nn.Module):
    """A linear layer computed as one FP8 GEMM per batch row (per-channel weight, per-token input scales)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = linear.weight.dtype
        weight, scale = quantize_rows(linear.weight.detach())  # (out, in), (out, 1)
        self.register_buffer("weight_fp8", weight)
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out) as _scaled_mm's scale_b
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads a linear's weight (peft reads its dtype and device)."""
        return (self.weight_fp8.float() * self.weight_scale.t()).to(self.out_dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return per_row(self._gemm, input)

    def _gemm(self, input: torch.Tensor) -> torch.Tensor:
        flat = input.reshape(-1, self.in_features)
        quantized, scale = quantize_rows(flat)
        out = torch._scaled_mm(
            quantized,
            self.weight_fp8.t(),  # column-major (in, out), as _scaled_mm wants its second operand
            scale_a=scale,
            scale_b=self.weight_scale,
            bias=self.bias,
            out_dtype=self.out_dtype,
        )
        return out.reshape(*input.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 rowwise"


def quantize_fp8(transformer: nn.Module, device: torch.device | str) -> int:
    """Replace the plain linears of `transformer.blocks` by FP8Linear layers, in place; returns how many.

    FP8Unsupported (before anything changes) when `device` has no FP8 tensor cores. Layers whose sizes
    _scaled_mm cannot take (not multiples of 16) and peft's lora_A / lora_B layers stay as they are."""
    check_fp8(device)
    targets = [
        (name, layer)
        for name, layer in transformer.blocks.named_modules()
        if type(layer) in _QUANTIZABLE
        and "lora_" not in name
        and layer.in_features % GEMM_ALIGNMENT == 0
        and layer.out_features % GEMM_ALIGNMENT == 0
    ]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.blocks.get_submodule(parent_name) if parent_name else transformer.blocks
        setattr(parent, child, FP8Linear(layer))
    return len(targets)
