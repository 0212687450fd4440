"""The private (underscored or module-internal) parts of diffusers the pipeline uses, in one place, with the
version they were checked against (pyproject pins diffusers==0.42.*). `pipeline/` never imports `serve/`,
so it has this module of its own beside `serve/_compat.py`.

- `prompt_clean`: the text clean-up WanPipeline applies to every prompt before tokenising
  (`diffusers.pipelines.wan.pipeline_wan`, not exported); the text encoder must match it exactly.
- `unpatchify`: the Wan VAE's output unpatching (`diffusers.models.autoencoders.autoencoder_kl_wan`),
  used by the frame-by-frame decoder. Checked with diffusers 0.42.1.
- `token_shard`: this rank's share of a sequence under a model's context-parallel (Ulysses) plan, cut
  exactly as the plan's split hooks cut it (`diffusers.hooks.context_parallel.EquipartitionSharder` on
  `ContextParallelConfig._flattened_mesh`, read from `ModelMixin._parallel_config`); the step cache keeps
  the blocks' residual per rank with it. Checked with diffusers 0.42.1.
- `cpu_has_bf16`: whether this CPU has bf16 instructions (AVX512-BF16 or AMX), read from torch's private
  `torch.cpu._is_avx512_bf16_supported` / `_is_amx_tile_supported`: a bf16 decode on CPU is worth timing
  only there. Checked with torch 2.14.1.
"""

from __future__ import annotations

import torch
from diffusers.hooks.context_parallel import EquipartitionSharder
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

CHECKED_VERSIONS: dict[str, str] = {"diffusers": "0.42.1", "torch": "2.14.1"}

__all__ = ["CHECKED_VERSIONS", "cpu_has_bf16", "prompt_clean", "token_shard", "unpatchify"]


def cpu_has_bf16() -> bool:
    """This CPU runs bf16 in hardware (AVX512-BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def token_shard(model: torch.nn.Module, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This rank's chunk of `tensor` along `dim` as the model's context-parallel split hooks cut it; the
    whole tensor when the model has no context-parallel plan applied."""
    config = getattr(model, "_parallel_config", None)
    context = None if config is None else config.context_parallel_config
    if context is None or context._flattened_mesh is None:
        return tensor
    return EquipartitionSharder.shard(tensor, dim, context._flattened_mesh)
