"""`GET /v1/models` (the OpenAI models list: the served models, text-to-video and, where configured,
image-to-video, each with the sizes and tiers this deployment serves it with) and `GET /`, which points
people and tools at the API's documentation."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from pipeline.denoise.calibration import has_curve
from pipeline.spec import RESOLUTION_PRESETS, ModelSpec, RequestSpec, SizeEnvelope, TierRecipe
from pipeline.stages import Layout
from serve.auth import Caller
from serve.config import PrevizArgs
from serve.http.deps import CallerDep, StateDep
from serve.jobs.request import I2V_MODEL, SERVED_MODEL
from serve.sharding import Expert, ShapeRules

router = APIRouter(tags=["models"])
DEFAULT_SECONDS = 5.0  # the API's default duration (81 frames at 16 fps)


class ExpertParallel(BaseModel):
    """How one expert deployment splits each forward, and which sizes that lets it run."""

    deployment: str = Field(
        description="The Serve deployment that runs it: `HighNoiseDenoiser` or `LowNoiseDenoiser` (layout "
        "`split`), or `Denoiser`, which holds both experts on every rank (layout `colocated`)."
    )
    ulysses: int = Field(description="Ranks sharing each row's video tokens (1: not sequence-parallel).")
    cfg: int = Field(description="2: cond and uncond rows run on different halves of the group.")
    gpus_per_replica: int = Field(description="Ranks (one GPU each on CUDA) of one replica: ulysses x cfg.")
    token_multiple: int = Field(
        description="A clip's video tokens (latent frames x height/16 x width/16) must be a multiple of "
        "this; other sizes are refused with `size_not_shardable`."
    )
    accepted_sizes: list[str] = Field(
        description=f"The preset sizes (`WxH`, either aspect) accepted for a {DEFAULT_SECONDS:g} s clip."
    )
    tiers: list[str] = Field(
        description="The quality tiers it runs, at this degree: every rank holds the draft tier's distill "
        "LoRA, so a sharded replica serves `draft` as an unsharded one does."
    )
    loras: bool = Field(
        description="Whether it runs the style LoRAs listed in `adapters` (loaded on every rank)."
    )
    step_cache: bool = Field(
        description="Whether requests' step caching (`cache`) runs on it: each rank keeps its own shard of "
        "a request's cached residual. False for real Wan2.2-I2V-A14B weights (no magnitude curve): `cache` "
        "on that model is 400 `step_cache_not_supported`."
    )


class Adapter(BaseModel):
    """A style or character LoRA the caller's project may name in `loras`."""

    name: str
    shared: bool = Field(description="True: every project may use it; false: this project's own.")
    description: str | None = None


class ServedModel(BaseModel):
    id: str = Field(description="The name to send as `model`.")
    task: Literal["t2v", "i2v"] = Field(
        description="`t2v`: text-to-video (Wan2.2-T2V-A14B); `i2v`: image-to-video (Wan2.2-I2V-A14B), a shot "
        "starting from a keyframe (`input_reference`, a shot's `keyframes`)."
    )
    keyframes: list[str] = Field(
        description="The keyframes it takes: `first` (and `last`, experimental: Wan2.2 I2V was not trained "
        "for it) for I2V; none for T2V."
    )
    object: Literal["model"] = "model"
    created: int = Field(0, description="Unix seconds (the model's release is not tracked: 0).")
    owned_by: str = "previz"
    presets: dict[str, str] = Field(description="Preset resolution -> `WxH` (16:9; 9:16 swaps them).")
    envelope: SizeEnvelope = Field(description="The sizes this deployment serves.")
    default_steps: int
    fps: int
    layout: Layout = Field(
        description="How the experts are deployed: `split` (a deployment each, the state handed between them "
        "at the boundary) or `colocated` (one deployment holding both, no hop at the boundary)."
    )
    experts: dict[str, ExpertParallel] = Field(
        description="`high` / `low` -> the expert deployment's parallel degree and the sizes it accepts."
    )
    tiers: dict[str, TierRecipe] = Field(
        description="`quality` -> its sampling recipe; `draft` is absent where it is not served."
    )
    adapters: list[Adapter] = Field(description="The LoRAs the caller's project may name in `loras`.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ServedModel]


@router.get("/v1/models", response_model=ModelList, summary="List the served models")
async def list_models(state: StateDep, caller: CallerDep) -> ModelList:
    served = [served_model(SERVED_MODEL, state.args, state.model, state.shapes, caller)]
    if state.i2v_args is not None and state.i2v_shapes is not None:
        i2v = state.i2v_args
        served.append(served_model(I2V_MODEL, i2v, i2v.sampling, state.i2v_shapes, caller))
    return ModelList(data=served)


def served_model(
    name: str, args: PrevizArgs, model: ModelSpec, shapes: ShapeRules, caller: Caller
) -> ServedModel:
    """One served model as the list shows it to `caller`: `args` are that model's (PrevizArgs.for_i2v for
    the I2V model), `shapes` its experts' shape rules."""
    presets = {preset: f"{width}x{height}" for preset, (width, height) in RESOLUTION_PRESETS.items()}
    tiers = ["draft", "final"] if args.serves_draft else ["final"]
    i2v = name == I2V_MODEL
    step_cache = has_curve(args.model, "i2v" if i2v else None)
    return ServedModel(
        id=name,
        task="i2v" if i2v else "t2v",
        keyframes=["first", "last"] if i2v else [],
        presets=presets,
        envelope=args.envelope,
        default_steps=model.num_steps,
        fps=model.fps,
        layout=args.experts.layout,
        experts={
            expert: expert_parallel(shapes, expert, model, tiers, step_cache) for expert in ("high", "low")
        },
        tiers={quality: model.recipe(quality) for quality in tiers},
        adapters=[
            Adapter(name=lora.name, shared=lora.project is None, description=lora.description)
            for lora in args.adapters.loras
            if lora.project in (None, caller.project) and args.lora(lora.name) is not None
        ],
    )


def expert_parallel(
    shapes: ShapeRules, expert: Expert, model: ModelSpec, tiers: list[str], step_cache: bool
) -> ExpertParallel:
    degree = shapes.degrees[expert]
    num_frames = RequestSpec(prompt="-", duration=DEFAULT_SECONDS).num_frames(model)
    return ExpertParallel(
        deployment=shapes.deployments[expert],
        ulysses=degree.ulysses,
        cfg=degree.cfg,
        gpus_per_replica=degree.world_size,
        token_multiple=degree.ulysses,
        accepted_sizes=shapes.accepted_sizes(expert, num_frames),
        tiers=tiers,  # the same engine at any degree: a rank group serves every tier
        loras=True,
        step_cache=step_cache,  # real I2V weights have no magnitude curve to cache by
    )
