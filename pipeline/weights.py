"""Where the model comes from: a Diffusers-format Wan2.2 folder, an s3:// copy of one, or a built-in
random-weight preset made from the real diffusers/transformers classes.

Two models share this code: Wan2.2-T2V-A14B (`WanPipeline`) and Wan2.2-I2V-A14B
(`WanImageToVideoPipeline`: the same two experts with 36 input channels, the noise latents plus the
condition of `pipeline.vae_encode`, and no image encoder). A folder says which by its model_index.json's
`_class_name`; a preset by its `task` (`tiny-i2v`, `small-i2v`).

Presets are data (`PRESETS`) and are seeded, so `tiny` is bit-identical on every machine with the same
torch build. `save_components` writes the Diffusers layout that `load_components` reads back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from pipeline.spec import ModelSpec, Task, model_spec

DIFFUSERS_SUBFOLDERS = ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer", "scheduler")
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "previz" / "models"
NETWORKS = ("transformer", "transformer_2", "vae", "text_encoder")  # what load_components(parts=...) names
# model_index.json `_class_name` -> the task of the model it describes
PIPELINE_TASKS: dict[str, Task] = {"WanPipeline": "t2v", "WanImageToVideoPipeline": "i2v"}
I2V_CONDITION_CHANNELS = 20  # 4 mask channels (one per frame of a latent frame) + the VAE's z_dim 16


@dataclass(frozen=True, slots=True)
class PresetConfig:
    """Sizes of one random-weight preset; the real classes are built from these."""

    transformer: dict[str, Any]  # WanTransformer3DModel kwargs (both experts)
    vae: dict[str, Any]  # AutoencoderKLWan kwargs
    text_encoder: dict[str, Any]  # UMT5Config kwargs
    upscaler: dict[str, Any]  # Upscaler.compact_random kwargs
    seed: int  # every weight tensor derives from this
    fast_decoder_widths: tuple[int, int, int, int] = (256, 128, 64, 64)  # TAEHV draft decoder, per level
    task: Task = "t2v"  # i2v: experts take the condition channels too (in_channels 36)
    # the preset whose text encoder and VAE this one uses, weights and all (Wan2.2 I2V and T2V ship the
    # same umT5 and Wan2.1 VAE, so one TextEncoder and one VAEDecoder deployment serve both); None: its own
    shares: str | None = None


def _i2v(preset: PresetConfig, seed: int, shares: str) -> PresetConfig:
    """The I2V twin of T2V preset `shares`: the same sizes, experts with the 20 condition channels as
    input (Wan2.2-I2V-A14B's in_channels 36) seeded from `seed`, the twin's text encoder and VAE."""
    transformer = {**preset.transformer, "in_channels": 16 + I2V_CONDITION_CHANNELS}
    return PresetConfig(
        transformer=transformer,
        vae=preset.vae,
        text_encoder=preset.text_encoder,
        upscaler=preset.upscaler,
        seed=seed,
        fast_decoder_widths=preset.fast_decoder_widths,
        task="i2v",
        shares=shares,
    )


PRESETS: dict[str, PresetConfig] = {
    "tiny": PresetConfig(
        transformer=dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
        ),
        vae=dict(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ),
        text_encoder=dict(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8
        ),
        upscaler=dict(scale=2, num_feat=8, num_conv=2),
        seed=20250728,
        fast_decoder_widths=(16, 8, 8, 8),
    ),
    "small": PresetConfig(
        transformer=dict(
            patch_size=(1, 2, 2),
            num_attention_heads=4,
            attention_head_dim=32,
            in_channels=16,
            out_channels=16,
            text_dim=64,
            freq_dim=256,
            ffn_dim=512,
            num_layers=4,
        ),
        vae=dict(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ),
        text_encoder=dict(
            d_model=64, d_kv=16, d_ff=128, num_layers=4, num_heads=4, relative_attention_num_buckets=16
        ),
        upscaler=dict(scale=2, num_feat=16, num_conv=4),
        seed=20250729,
        fast_decoder_widths=(32, 16, 16, 16),
    ),
}
PRESETS["tiny-i2v"] = _i2v(PRESETS["tiny"], seed=20250801, shares="tiny")
PRESETS["small-i2v"] = _i2v(PRESETS["small"], seed=20250802, shares="small")


@dataclass(slots=True)
class WanComponents:
    """Everything one Wan2.2 model (T2V or I2V) consists of, on one device. A serving stage loads only its own
    networks (`load_components(..., parts=...)`: real experts are 28.6 GB each); the others are None."""

    tokenizer: PreTrainedTokenizerBase | None
    text_encoder: UMT5EncoderModel | None
    vae: AutoencoderKLWan | None
    scheduler: UniPCMultistepScheduler  # a template: every request gets its own copy (UniPC keeps history)
    transformer: WanTransformer3DModel | None  # high-noise expert, t >= boundary
    transformer_2: WanTransformer3DModel | None  # low-noise expert, t < boundary
    model: ModelSpec  # boundary, flow shift, defaults actually in force
    source: str  # "tiny", a folder path or an s3:// URI, for logs and job records
    task: Task = "t2v"  # i2v: the experts also take the condition channels (pipeline.vae_encode)


def pick_device(device: str | None = None) -> torch.device:
    """`cuda` when available unless told otherwise."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (the released weights' dtype), fp32 on CPU (bf16 matmuls there are slow and inexact)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def wan_scheduler(flow_shift: float) -> UniPCMultistepScheduler:
    """The UniPC flow solver Wan2.2 samples with."""
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=flow_shift,
    )


def build_preset(name: str, model: ModelSpec | None = None) -> WanComponents:
    """Random-weight components of preset `name`, identical for every call (seeded, fp32 on CPU)."""
    if name not in PRESETS:
        raise ValueError(f"`model` preset must be one of {', '.join(PRESETS)} but is {name!r}.")
    preset = PRESETS[name]
    model = model or model_spec(preset.task)
    tokenizer = ByT5Tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)
        transformer = WanTransformer3DModel(**preset.transformer)
        transformer_2 = WanTransformer3DModel(**preset.transformer)
        vae = AutoencoderKLWan(**preset.vae)
        text_config = UMT5Config(
            vocab_size=len(tokenizer),
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
            **preset.text_encoder,
        )
        text_encoder = UMT5EncoderModel(text_config)
    if preset.shares is not None:
        shared = build_preset(preset.shares)
        vae, text_encoder = shared.vae, shared.text_encoder
    for module in (transformer, transformer_2, vae, text_encoder):
        module.eval().requires_grad_(False)
    return WanComponents(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=wan_scheduler(model.flow_shift),
        transformer=transformer,
        transformer_2=transformer_2,
        model=model,
        source=name,
        task=preset.task,
    )


def wan_pipeline(components: WanComponents) -> WanPipeline | WanImageToVideoPipeline:
    """diffusers' own pipeline over `components` (WanPipeline, or WanImageToVideoPipeline without an image
    encoder for I2V, as Wan2.2 ships it), with a fresh solver (the reference and the saver)."""
    pipeline_class = WanImageToVideoPipeline if components.task == "i2v" else WanPipeline
    return pipeline_class(
        tokenizer=components.tokenizer,
        text_encoder=components.text_encoder,
        vae=components.vae,
        scheduler=UniPCMultistepScheduler.from_config(components.scheduler.config),
        transformer=components.transformer,
        transformer_2=components.transformer_2,
        boundary_ratio=components.model.boundary_ratio,
    )


def save_components(components: WanComponents, folder: Path) -> Path:
    """Write `components` in the Diffusers Wan2.2 layout (model_index.json + one folder per component)."""
    wan_pipeline(components).save_pretrained(folder, safe_serialization=True)
    return folder


def load_components(
    source: str,
    *,
    model: ModelSpec | None = None,
    keep_shipped_flow_shift: bool = False,
    device: str | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    progress: Callable[[int, int], None] | None = None,
    parts: Collection[str] = NETWORKS,
) -> WanComponents:
    """Load from a preset name, a Diffusers folder or `s3://bucket/prefix`, placed on `device`; only the
    networks named in `parts` (of NETWORKS; `text_encoder` brings its tokenizer) are loaded.

    The Diffusers Wan2.2 repo ships `flow_shift=3.0`; T2V samples with `model.flow_shift` (12.0), I2V with
    5.0 (`model`: the folder's task's official spec when None), which replaces it unless
    `keep_shipped_flow_shift`.
    """
    unknown = set(parts) - set(NETWORKS)
    if unknown:
        raise ValueError(f"`parts` must be among {', '.join(NETWORKS)} but has {', '.join(sorted(unknown))}.")
    target = pick_device(device)
    if source in PRESETS:
        preset = build_preset(source, model)
        for name in set(NETWORKS) - set(parts):
            setattr(preset, name, None)
        if "text_encoder" not in parts:
            preset.tokenizer = None
        return place(preset, target)
    folder = resolve_folder(source, cache_dir=cache_dir, progress=progress)
    task = folder_task(folder)
    model, scheduler = load_sampling(
        folder, model=model or model_spec(task), keep_shipped_flow_shift=keep_shipped_flow_shift
    )
    tokenizer, text_encoder = load_text_encoder(folder, target) if "text_encoder" in parts else (None, None)
    components = WanComponents(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=load_vae(folder, target) if "vae" in parts else None,
        scheduler=scheduler,
        transformer=load_transformer(folder, "transformer", target) if "transformer" in parts else None,
        transformer_2=load_transformer(folder, "transformer_2", target) if "transformer_2" in parts else None,
        model=model,
        source=source,
        task=task,
    )
    return place(components, target)


def resolve_folder(
    source: str, *, cache_dir: Path = DEFAULT_CACHE_DIR, progress: Callable[[int, int], None] | None = None
) -> Path:
    """The local Diffusers folder for a folder path or an s3:// URI (synced into `cache_dir` first)."""
    if source.startswith("s3://"):
        from pipeline.s3sync import sync_s3_prefix

        folder = sync_s3_prefix(source, cache_dir, progress=progress)
    else:
        folder = Path(source).expanduser()
    check_diffusers_folder(folder)
    return folder


def source_task(source: str, *, cache_dir: Path = DEFAULT_CACHE_DIR) -> Task:
    """The task of a model source (a preset, a Diffusers folder or an s3:// URI, mirrored first)."""
    if source in PRESETS:
        return PRESETS[source].task
    return folder_task(resolve_folder(source, cache_dir=cache_dir))


def folder_task(folder: Path) -> Task:
    """t2v or i2v, from the pipeline class a Diffusers folder's model_index.json names."""
    name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    if name not in PIPELINE_TASKS:
        raise ValueError(
            f"{folder}/model_index.json names pipeline {name!r}; Previz serves "
            f"{' and '.join(PIPELINE_TASKS)} (Wan2.2 T2V and I2V)."
        )
    return PIPELINE_TASKS[name]


def load_sampling(
    folder: Path, *, model: ModelSpec | None = None, keep_shipped_flow_shift: bool = False
) -> tuple[ModelSpec, UniPCMultistepScheduler]:
    """The model spec in force (boundary from model_index.json) and the solver template."""
    index = json.loads((folder / "model_index.json").read_text())
    model = model or ModelSpec()
    if index.get("boundary_ratio") is not None:
        model = model.model_copy(update={"boundary_ratio": float(index["boundary_ratio"])})
    scheduler = UniPCMultistepScheduler.from_pretrained(folder / "scheduler")
    if keep_shipped_flow_shift:
        model = model.model_copy(update={"flow_shift": float(scheduler.config.flow_shift)})
    else:
        scheduler = UniPCMultistepScheduler.from_config(scheduler.config, flow_shift=model.flow_shift)
    return model, scheduler


def load_text_encoder(folder: Path, device: torch.device) -> tuple[PreTrainedTokenizerBase, UMT5EncoderModel]:
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder", dtype=compute_dtype(device))
    return tokenizer, text_encoder.to(device).eval().requires_grad_(False)


def load_transformer(folder: Path, name: str, device: torch.device) -> WanTransformer3DModel:
    """One expert: `transformer` (high-noise) or `transformer_2` (low-noise)."""
    transformer = WanTransformer3DModel.from_pretrained(folder / name, torch_dtype=compute_dtype(device))
    return transformer.to(device).eval().requires_grad_(False)


def load_vae(folder: Path, device: torch.device) -> AutoencoderKLWan:
    vae = AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32)
    return vae.to(device).eval().requires_grad_(False)


def check_diffusers_folder(folder: Path) -> None:
    """Fail early, naming what is missing, instead of deep inside from_pretrained."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"`model` must be a preset ({', '.join(PRESETS)}), a Diffusers folder or s3:// URI; "
            f"{str(folder)!r} is not a folder."
        )
    missing = [name for name in ("model_index.json", *DIFFUSERS_SUBFOLDERS) if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a Diffusers Wan2.2 folder: missing {', '.join(missing)}.")


def place(components: WanComponents, device: torch.device) -> WanComponents:
    """Move the networks to `device` in their compute dtype; the VAE stays fp32 (small, and sensitive)."""
    dtype = compute_dtype(device)
    for module, module_dtype in (
        (components.transformer, dtype),
        (components.transformer_2, dtype),
        (components.text_encoder, dtype),
        (components.vae, torch.float32),
    ):
        if module is None:  # not loaded by this stage
            continue
        if module.dtype != module_dtype:
            module.to(dtype=module_dtype)
        module.to(device=device).eval().requires_grad_(False)
    return components
