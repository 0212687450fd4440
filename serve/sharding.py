"""How the experts are deployed (`experts: {layout, high: {parallel: {ulysses, cfg}, attention_backend,
compile, fp8, warmup}, low: ...}` in the app args): the layout (a deployment per expert, or one `Denoiser`
holding both on every rank), each expert's split over GPUs and the shape rules that follow from it: which
sizes a deployed degree accepts (admission asks `size_problem`; `GET /v1/models` shows `accepted_sizes`),
and the placement group a sharded replica reserves.

The rules themselves are pipeline.denoise.parallel's (`shape_problem`, `allowed_sizes`); this module only
knows where the numbers come from: the degree from the config, the heads from the deployed model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.denoise.kernels import check_attention_backend
from pipeline.denoise.parallel import (
    DEFAULT_TIMEOUT_S,
    ParallelDegree,
    allowed_sizes,
    heads_problem,
    shape_problem,
)
from pipeline.spec import ModelSpec, RequestSpec
from pipeline.stages import COLOCATED_DEPLOYMENT, EXPERT_DEPLOYMENTS, Layout, deployment_name, expert_stage
from pipeline.weights import PRESETS

logger = logging.getLogger("ray.serve")

Expert = Literal["high", "low"]
# expert -> its deployment in the split layout (the stage table derives it)
DEPLOYMENT_NAMES: dict[Expert, str] = {
    expert: deployment_name(expert_stage(expert)) for expert in ("high", "low")
}
EXPERT_FOLDERS: dict[Expert, str] = {"high": "transformer", "low": "transformer_2"}  # in a Diffusers dir
A14B_NUM_HEADS = 40  # Wan2.2-T2V-A14B: dim 5120 = 40 heads x 128


class ParallelSettings(BaseModel):
    """One replica's rank group: `ulysses` x `cfg` processes (one GPU each) run every forward together."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ulysses: int = Field(
        1,
        ge=1,
        description="Ranks sharing each row's video tokens (Ulysses sequence parallel). The model's heads "
        "(40 for A14B: 1, 2, 4, 5, 8...) and every served size's token count must divide by it.",
    )
    cfg: Literal[1, 2] = Field(
        1, description="2 puts the cond and the uncond rows of each forward on different halves of the group."
    )
    timeout_s: float = Field(
        DEFAULT_TIMEOUT_S,
        gt=0,
        description="Every collective of the group gives up after this long; the replica is then replaced.",
    )

    @property
    def degree(self) -> ParallelDegree:
        return ParallelDegree(ulysses=self.ulysses, cfg=self.cfg)


class WarmupBucket(BaseModel):
    """A clip shape whose forward a replica runs once before it reports healthy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: str = Field(description="`WxH` or a preset (`480p`, `720p`), as in a video request.")
    seconds: float = Field(5.0, description="Clip length (5 s = 81 frames at 16 fps).")

    @model_validator(mode="after")
    def _a_valid_clip(self) -> WarmupBucket:
        self.spec()  # RequestSpec's errors name the field and the rule
        return self

    def spec(self) -> RequestSpec:
        return RequestSpec(prompt="warm-up", resolution=self.size, duration=self.seconds)

    def latent_shape(self, model: ModelSpec, channels: int) -> tuple[int, int, int, int]:
        spec = self.spec()
        width, height = spec.size
        return model.latent_shape(width, height, spec.num_frames(model), channels)


class ExpertSettings(BaseModel):
    """How one expert runs its transformer: in its own deployment (HighNoiseDenoiser or LowNoiseDenoiser,
    the `split` layout) or beside the other expert on every rank of a `Denoiser` (`colocated`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parallel: ParallelSettings = Field(
        default_factory=ParallelSettings,
        description="The rank group of each replica (default 1x1: one GPU). In the `colocated` layout both "
        "experts share one group, so `high.parallel` and `low.parallel` must be equal.",
    )
    attention_backend: str | None = Field(
        None,
        description="diffusers' attention backend for this expert only (`native`, `_native_cudnn`, `flash`, "
        "`_flash_3_hub`, `sage`...); unset: diffusers' default (torch SDPA). A sharded expert needs one "
        "that supports context parallelism.",
    )
    compile: bool = Field(
        False, description="Regional torch.compile of the repeated transformer blocks (every rank)."
    )
    fp8: bool = Field(
        False,
        description="FP8 matmuls (torch._scaled_mm, e4m3, per-channel weights and per-token inputs) in the "
        "transformer blocks of this expert, quantized from the bf16 weights at load (every rank). Needs a "
        "GPU with FP8 tensor cores (compute capability 8.9+); refused on CPU and older GPUs. Faster, not the "
        "same bits as bf16.",
    )
    warmup: list[WarmupBucket] = Field(
        default_factory=list,
        description="Shapes run once (a guided forward each) before the replica reports healthy, so that "
        "compile and kernel selection do not land on the first requests.",
    )

    @field_validator("attention_backend")
    @classmethod
    def _known_backend(cls, name: str | None) -> str | None:
        return None if name is None else check_attention_backend(name)


class ExpertsSettings(BaseModel):
    """Per-expert settings (the high-noise expert runs 26 of 40 steps, the low-noise one 14) and the layout
    that places them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layout: Layout = Field(
        "split",
        description="`split`: a deployment per expert (HighNoiseDenoiser, LowNoiseDenoiser), scaled "
        "separately, the state handed from one to the other at the boundary. `colocated`: one deployment, "
        "`Denoiser`, holds both experts on every rank of its group (2 x 28.6 GB bf16 on an 80 GB GPU) and "
        "runs a request's high-noise steps then its low-noise ones with no hop. The config YAML's "
        "`deployments:` names the layout's deployments.",
    )
    high: ExpertSettings = Field(
        default_factory=ExpertSettings, description="The high-noise expert (HighNoiseDenoiser when split)."
    )
    low: ExpertSettings = Field(
        default_factory=ExpertSettings, description="The low-noise expert (LowNoiseDenoiser when split)."
    )

    @model_validator(mode="after")
    def _one_group_when_colocated(self) -> ExpertsSettings:
        if self.layout == "colocated" and self.high.parallel != self.low.parallel:
            raise ValueError(
                "`experts.layout: colocated` holds both experts on one rank group, so "
                f"`experts.high.parallel` ({_degree_text(self.high.parallel)}) and `experts.low.parallel` "
                f"({_degree_text(self.low.parallel)}) must be equal."
            )
        return self

    def of(self, expert: Expert) -> ExpertSettings:
        return self.high if expert == "high" else self.low

    def deployment(self, expert: Expert) -> str:
        """The Serve deployment that runs `expert` in this layout."""
        return deployment_name(expert_stage(expert), layout=self.layout)

    @property
    def deployment_names(self) -> tuple[str, ...]:
        """The denoiser deployments of this layout, in the stage table's order."""
        return tuple(dict.fromkeys(self.deployment(expert) for expert in ("high", "low")))


def _degree_text(settings: ParallelSettings) -> str:
    return f"ulysses {settings.ulysses}, cfg {settings.cfg}, timeout_s {settings.timeout_s:g}"


def deployments_problem(experts: ExpertsSettings, names: list[str]) -> str | None:
    """Why a Serve config's `deployments:` entries (their names) do not fit the experts' layout: one names
    a denoiser deployment the layout does not bind (Serve would refuse it with a less helpful message)."""
    every = {*EXPERT_DEPLOYMENTS.values(), COLOCATED_DEPLOYMENT}
    served = set(experts.deployment_names)
    stray = [name for name in names if name in every and name not in served]
    if not stray:
        return None
    return (
        f"`deployments` names {', '.join(stray)}, but `experts.layout: {experts.layout}` deploys the "
        f"denoiser{'s' if len(served) > 1 else ''} as {', '.join(experts.deployment_names)}: rename the "
        "entry or change the layout."
    )


def model_num_heads(model: str, expert: Expert, cache_dir: Path) -> int:
    """Attention heads of one expert of the deployed model, read from its config (no weights loaded).

    Presets and local Diffusers folders are read exactly; an s3:// model is read from its mirror when one
    exists, else taken to be Wan2.2-T2V-A14B's 40 heads (the replica checks the real ones when it loads)."""
    if model in PRESETS:
        return int(PRESETS[model].transformer["num_attention_heads"])
    if model.startswith("s3://"):
        from pipeline.s3sync import S3Location, mirror_dir

        folder = mirror_dir(cache_dir, S3Location.from_uri(model))
    else:
        folder = Path(model).expanduser()
    config = folder / EXPERT_FOLDERS[expert] / "config.json"
    if not config.is_file():
        if model.startswith("s3://"):
            return A14B_NUM_HEADS
        raise FileNotFoundError(f"`model` {model!r} has no {EXPERT_FOLDERS[expert]}/config.json.")
    return int(json.loads(config.read_text())["num_attention_heads"])


def check_degrees(experts: ExpertsSettings, model: str, cache_dir: Path, sampling: ModelSpec) -> None:
    """Refuse a degree no size could run at (heads not divisible) or a warm-up bucket it cannot split,
    naming the expert and the rule."""
    for expert in ("high", "low"):
        settings = experts.of(expert)
        degree = settings.parallel.degree
        if degree.ulysses == 1:
            continue
        num_heads = model_num_heads(model, expert, cache_dir)
        problem = heads_problem(num_heads, degree)
        if problem is not None:
            raise ValueError(f"`experts.{expert}.parallel.ulysses`: {problem}.")
        for index, bucket in enumerate(settings.warmup):
            spec = bucket.spec()
            width, height = spec.size
            problem = shape_problem(
                width, height, spec.num_frames(sampling), degree, model=sampling, num_heads=num_heads
            )
            if problem is not None:
                raise ValueError(f"`experts.{expert}.warmup.{index}`: {problem}.")


I2V_PREFIX = (
    "I2V"  # the I2V model's expert deployments: I2VHighNoiseDenoiser, I2VLowNoiseDenoiser, I2VDenoiser
)


class ShapeRules:
    """Which (size, frames) each expert's deployed degree accepts; built once per Ingress replica (per
    served model: `prefix` names a second model's deployments, I2V_PREFIX)."""

    def __init__(
        self, experts: ExpertsSettings, model: str, sampling: ModelSpec, cache_dir: Path, prefix: str = ""
    ) -> None:
        self.sampling = sampling
        self.deployments: dict[Expert, str] = {e: prefix + experts.deployment(e) for e in ("high", "low")}
        self.degrees: dict[Expert, ParallelDegree] = {
            e: experts.of(e).parallel.degree for e in ("high", "low")
        }
        self.num_heads: dict[Expert, int] = {
            expert: model_num_heads(model, expert, cache_dir) if degree.ulysses > 1 else 0
            for expert, degree in self.degrees.items()
        }

    def size_problem(self, width: int, height: int, num_frames: int) -> str | None:
        """Why a clip of this size cannot run on the deployed experts, naming the allowed sizes; or None."""
        for expert, degree in self.degrees.items():
            if degree.ulysses == 1:
                continue  # CFG parallel pads rows: every size runs
            problem = shape_problem(
                width, height, num_frames, degree, model=self.sampling, num_heads=self.num_heads[expert]
            )
            if problem is not None:
                return f"the {expert}-noise expert is sharded {degree.ulysses}x{degree.cfg}: {problem}"
        return None

    def accepted_sizes(self, expert: Expert, num_frames: int) -> list[str]:
        """The preset sizes (`WxH`) the expert accepts at `num_frames`."""
        sizes = allowed_sizes(
            num_frames, self.degrees[expert], model=self.sampling, num_heads=self.num_heads[expert]
        )
        return [f"{width}x{height}" for width, height in sizes]


def placement_options(settings: ParallelSettings, device: str | None) -> dict[str, Any]:
    """The Serve options a sharded expert replica adds: a bundle per rank ({} when unsharded).

    Bundle 0 holds the replica (rank 0: one GPU, Serve's default one CPU), bundles 1.. its worker actors;
    STRICT_PACK keeps the group on one node, where NCCL runs over NVLink."""
    return rank_group_options(settings.degree.world_size, device)


def rank_group_options(world_size: int, device: str | None) -> dict[str, Any]:
    """The Serve options of a replica that owns `world_size` ranks ({} for one): a bundle per rank, one GPU
    each on CUDA, STRICT_PACK on one node. Sharded experts and parallel VAE decoders reserve alike."""
    if world_size <= 1:
        return {}
    bundle = {"GPU": 1, "CPU": 1} if device == "cuda" else {"CPU": 1}
    return {
        "placement_group_bundles": [dict(bundle) for _ in range(world_size)],
        "placement_group_strategy": "STRICT_PACK",
    }


def bundles_problem(deployment: str, setting: str, world_size: int, entry: dict[str, Any]) -> str | None:
    """Why a config's `deployments:` entry of a deployment whose replicas own `world_size` ranks (from
    `setting`) does not state them: its `placement_group_bundles` must list a bundle per rank, so that the
    file (and the k8s pools rendered and checked from it) counts the GPUs the replicas take."""
    bundles = entry.get("placement_group_bundles")
    if world_size > 1 and bundles is None:
        return (
            f"`{setting}: {world_size}` gives each {deployment} replica {world_size} ranks, a GPU each, but "
            "its `deployments` entry has no `placement_group_bundles`: list one bundle per rank (e.g. "
            f"[{{GPU: 1, CPU: 1}}] x {world_size}, STRICT_PACK) so that the file counts its GPUs."
        )
    if bundles is not None and len(bundles) != world_size:
        return (
            f"the {deployment} entry of `deployments` lists {len(bundles)} `placement_group_bundles` but "
            f"`{setting}` gives its replicas {world_size}: one bundle per rank."
        )
    return None
