"""LoRA adapter files: where they come from and how one loads into an expert.

The file format is lightx2v's (Wan2.2-Lightning, Wan2.2-Distill-Loras): one safetensors file per expert,
keys in Wan's original module names, `diffusion_model.blocks.N.{self_attn,cross_attn}.{q,k,v,o}` and
`diffusion_model.blocks.N.ffn.{0,2}`, each with `lora_A.weight` (rank x in), `lora_B.weight` (out x rank)
and `alpha`. diffusers converts it (`WanPipeline.lora_state_dict`) and peft loads it
(`load_lora_adapter(..., prefix="transformer")`) into either expert; it is never fused, since fusing
rewrites the base weights that a shared replica serves every other request with.

An adapter is a folder (or an s3:// prefix) holding `high_noise_model.safetensors` and/or
`low_noise_model.safetensors` (Lightning's names); an expert without its file runs that adapter as a
no-op. The `tiny` and `small` presets come with seeded random distill LoRAs in the same format
(`builtin_distill_folder`), so the whole draft path runs on CPU without downloaded weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import WanPipeline, WanTransformer3DModel
from safetensors.torch import save_file

Expert = Literal["high", "low"]
EXPERT_FILES: dict[Expert, str] = {
    "high": "high_noise_model.safetensors",
    "low": "low_noise_model.safetensors",
}
BUILTIN = "builtin"  # the `draft_lora` of a preset deployment: seeded random files made here
# Wan module names in lightx2v files; diffusers maps them to attn1/attn2 to_q/k/v/out.0 and ffn.net.0.proj/2
_ATTENTION = tuple(f"{attn}.{proj}" for attn in ("self_attn", "cross_attn") for proj in ("q", "k", "v", "o"))
_BUILTIN_RANK = 4
# The update B·A of a random LoRA, relative to the base: enough to change the take, not to blow it up.
_BUILTIN_SCALE = 0.5


def random_lora_state_dict(
    config: Mapping[str, Any], *, rank: int = _BUILTIN_RANK, seed: int, scale: float = _BUILTIN_SCALE
) -> dict[str, torch.Tensor]:
    """A seeded random LoRA for every attention and FFN linear of a transformer with `config`, in the
    lightx2v key format (alpha = rank, so the update is B·A as stored)."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    shapes = {name: (inner, inner) for name in _ATTENTION}  # (in, out)
    shapes |= {"ffn.0": (inner, config["ffn_dim"]), "ffn.2": (config["ffn_dim"], inner)}
    generator = torch.Generator("cpu").manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for block in range(config["num_layers"]):
        for name, (fan_in, fan_out) in shapes.items():
            key = f"diffusion_model.blocks.{block}.{name}"
            down = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
            up = torch.randn(fan_out, rank, generator=generator) * scale / rank**0.5
            out[f"{key}.lora_A.weight"] = down.contiguous()
            out[f"{key}.lora_B.weight"] = up.contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(rank))
    return out


def save_lora_folder(folder: Path, files: dict[Expert, dict[str, torch.Tensor]]) -> Path:
    """Write one adapter (expert -> state dict) as EXPERT_FILES under `folder`, each file atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    for expert, state_dict in files.items():
        target = folder / EXPERT_FILES[expert]
        partial = target.with_suffix(f".{os.getpid()}.partial")
        save_file(state_dict, str(partial), metadata={"format": "pt"})
        partial.replace(target)
    return folder


def builtin_distill_folder(
    preset: str, config: Mapping[str, Any], seed: int, cache_dir: Path, *, rank: int = _BUILTIN_RANK
) -> Path:
    """The seeded random distill LoRA of a preset (one file per expert), written once under `cache_dir`.
    Same preset and seed: the same bits on every machine, so a take does not depend on who made the file."""
    folder = cache_dir / "loras" / f"{preset}-distill-{seed}-r{rank}"
    if all((folder / name).is_file() for name in EXPERT_FILES.values()):
        return folder
    files: dict[Expert, dict[str, torch.Tensor]] = {
        expert: random_lora_state_dict(config, rank=rank, seed=seed + offset)
        for offset, expert in enumerate(("high", "low"), start=1)
    }
    return save_lora_folder(folder, files)


def resolve_lora_folder(
    source: str, *, cache_dir: Path, progress: Callable[[int, int], None] | None = None
) -> Path:
    """The local folder of an adapter given as a folder path or an s3:// prefix (mirrored into
    `cache_dir` first); FileNotFoundError naming the source when it holds neither expert's file."""
    if source.startswith("s3://"):
        from pipeline.s3sync import sync_s3_prefix

        folder = sync_s3_prefix(source, cache_dir, progress=progress)
    else:
        folder = Path(source).expanduser()
    if not any((folder / name).is_file() for name in EXPERT_FILES.values()):
        names = " and/or ".join(EXPERT_FILES.values())
        raise FileNotFoundError(
            f"LoRA {source!r} must be a folder (or s3:// prefix) with {names}; {folder} has neither."
        )
    return folder


def distill_folder(
    draft_lora: str, model_source: str, *, cache_dir: Path, progress: Callable[[int, int], None] | None = None
) -> Path:
    """The folder of a deployment's draft LoRA: `builtin` (presets only: their seeded random files), a
    folder or an s3:// prefix."""
    if draft_lora == BUILTIN:
        from pipeline.weights import PRESETS

        if model_source not in PRESETS:
            raise ValueError(
                f"`draft_lora: {BUILTIN}` exists for the presets ({', '.join(PRESETS)}) only; model "
                f"{model_source!r} needs the distill LoRA folder or s3:// prefix."
            )
        preset = PRESETS[model_source]
        return builtin_distill_folder(model_source, preset.transformer, preset.seed, cache_dir)
    return resolve_lora_folder(draft_lora, cache_dir=cache_dir, progress=progress)


def expert_file(folder: Path, expert: Expert) -> Path | None:
    """This expert's file of the adapter in `folder`, or None (the adapter does not touch this expert)."""
    path = folder / EXPERT_FILES[expert]
    return path if path.is_file() else None


def load_adapter(transformer: WanTransformer3DModel, path: Path, name: str) -> None:
    """Load one lightx2v-format LoRA file into `transformer` as adapter `name` (peft; not fused)."""
    state_dict = WanPipeline.lora_state_dict(str(path))
    transformer.load_lora_adapter(state_dict, prefix="transformer", adapter_name=name)
