"""FP8 matmuls (pipeline.denoise.fp8): refused with the reason where there are no FP8 tensor cores (this
CPU), in the product config and in the loader; the FP8 layer's math checked on CPU, whose torch._scaled_mm
computes the same rowwise-scaled e4m3 GEMM (slowly: the refusal is about speed and kernels, not math)."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from pydantic import ValidationError
from torch import nn

from pipeline.denoise import fp8 as fp8_module
from pipeline.denoise.fp8 import FP8Linear, FP8Unsupported, quantize_fp8
from pipeline.determinism import make_batch_invariant
from pipeline.weights import PRESETS, build_preset
from serve.config import PrevizArgs

CPU_REFUSAL = (
    "FP8 matmuls (torch._scaled_mm) need a CUDA GPU with FP8 tensor cores (compute capability 8.9+: Ada, "
    "Hopper, Blackwell), but the device is 'cpu'; set `fp8: false`."
)


def test_fp8_is_refused_on_cpu_before_the_model_changes() -> None:
    transformer = build_preset("tiny").transformer
    before = {name: type(module) for name, module in transformer.named_modules()}
    with pytest.raises(FP8Unsupported) as refused:
        quantize_fp8(transformer, torch.device("cpu"))
    assert str(refused.value) == CPU_REFUSAL
    assert {name: type(module) for name, module in transformer.named_modules()} == before


def test_an_fp8_expert_is_refused_in_the_app_config_on_cpu_and_off_by_default() -> None:
    with pytest.raises(ValidationError) as refused:
        PrevizArgs(device="cpu", experts={"low": {"fp8": True}})
    assert f"`experts.low.fp8`: {CPU_REFUSAL}" in str(refused.value)
    assert not PrevizArgs(device="cpu").experts.high.fp8
    assert PrevizArgs(device="cuda", experts={"high": {"fp8": True}}).experts.high.fp8  # the GPU checks


def aligned_expert() -> WanTransformer3DModel:
    """The tiny preset's expert with sizes _scaled_mm takes (multiples of 16; the preset's dim is 24)."""
    config = {**PRESETS["tiny"].transformer, "attention_head_dim": 16, "ffn_dim": 64}
    return WanTransformer3DModel(**config, cross_attn_norm=True).eval()


def test_fp8_linear_is_within_e4m3_rounding_of_bf16_and_batch_invariant() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 512, dtype=torch.bfloat16)
    x = torch.randn(3, 40, 256, dtype=torch.bfloat16)
    layer = FP8Linear(linear)
    with torch.inference_mode():
        exact = linear(x).float()
        out = layer(x)
        alone = torch.cat([layer(x[row : row + 1]) for row in range(3)])
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape
    relative = float((out.float() - exact).norm() / exact.norm())
    assert 0 < relative < 0.05  # e4m3 keeps 3 mantissa bits: a few percent, and never exact
    assert torch.equal(out, alone)  # per-token scales and one GEMM per row: a batch changes nothing
    assert float((layer.weight.float() - linear.weight.detach().float()).abs().max()) > 0  # stored in fp8


def test_quantize_fp8_swaps_the_block_linears_only_and_the_expert_stays_close(monkeypatch) -> None:
    """With the device check lifted (CPU _scaled_mm is exact math, only slow), a small expert's
    prediction moves by e4m3 rounding only, and the embeddings and head keep their layers."""
    torch.manual_seed(1)
    transformer = make_batch_invariant(aligned_expert())
    inputs = {
        "hidden_states": torch.randn(2, 16, 3, 8, 12),
        "timestep": torch.tensor([900, 500]),
        "encoder_hidden_states": torch.randn(2, 8, transformer.config.text_dim),
        "return_dict": False,
    }
    with torch.inference_mode():
        exact = transformer(**inputs)[0]
    monkeypatch.setattr(fp8_module, "fp8_problem", lambda device: None)
    num_layers = quantize_fp8(transformer, torch.device("cpu"))
    block_linears = [m for m in transformer.blocks.modules() if isinstance(m, FP8Linear)]
    assert (
        num_layers == len(block_linears) == 10 * len(transformer.blocks)
    )  # q k v out x 2 attentions, ffn x 2
    assert not any(isinstance(m, FP8Linear) for m in transformer.condition_embedder.modules())
    assert type(transformer.proj_out) is not FP8Linear
    with torch.inference_mode():
        approximate = transformer(**inputs)[0]
    relative = float((approximate - exact).norm() / exact.norm())
    assert 0 < relative < 0.1
