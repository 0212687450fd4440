"""What the model is (ModelSpec) and what one clip asks for (RequestSpec), validated before any GPU work.

Every rejection names the field, the value and what is allowed, so the CLI and the HTTP API can pass
the message straight to the user.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The official Wan2.2 negative prompt (Chinese, as the model was trained with it).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# preset -> (width, height) in landscape 16:9; 9:16 swaps them.
RESOLUTION_PRESETS: dict[str, tuple[int, int]] = {"480p": (832, 480), "720p": (1280, 720)}
ASPECTS = ("16:9", "9:16")
MAX_PROMPT_CHARS = 4000
MIN_SIDE, MAX_SIDE = 32, 1920
MIN_DURATION_S, MAX_DURATION_S = 0.25, 10.0
MAX_STEPS = 100
MAX_SEED = 2**53 - 1  # the largest integer every JSON client (JavaScript too) holds exactly
MAX_LORAS = 4  # style/character adapters one request may stack (besides its tier's distill LoRA)
MAX_CACHE_THRESHOLD = 1.0  # MagCache's published runs use 0.01-0.3 (an error is a sum of |1 - ratio|)
_EXPLICIT_SIZE = re.compile(r"^([0-9]+)x([0-9]+)$")  # ASCII digits only
ADAPTER_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"

# `draft`: few-step distilled experts (a LoRA per expert), for quick takes; `final`: the official recipe.
Quality = Literal["draft", "final"]
QUALITIES: tuple[Quality, ...] = ("draft", "final")
DISTILL_ADAPTER = "distill"  # the adapter name a tier's distill LoRA is loaded under in each expert
# (adapter name, weight) pairs sorted by name: what one request runs its experts with; part of the bucket key
AdapterSet = tuple[tuple[str, float], ...]


class StepCacheSettings(BaseModel):
    """Step caching for one request (MagCache, per request inside the engine: pipeline.denoise.stepcache).

    A step is skipped (its blocks reuse the residual of the request's last computed step) while the error
    accumulated from the model's calibrated magnitude ratios stays below `threshold`, for at most
    `max_skip` steps in a row, never within the request's first `warmup_steps` steps and never on the
    first step of an expert (its residual belongs to the expert that computed it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float = Field(
        description=f"Accumulated magnitude error allowed before a step must run (0–{MAX_CACHE_THRESHOLD:g}; "
        "0 never skips; MagCache's Wan2.2 runs use 0.06)."
    )
    max_skip: int = Field(2, description=f"Most steps skipped in a row (0–{MAX_STEPS}; MagCache's K).")
    warmup_steps: int = Field(0, description=f"The request's first steps, always computed (0–{MAX_STEPS}).")

    @field_validator("threshold")
    @classmethod
    def _threshold_in_range(cls, threshold: float) -> float:
        if not 0.0 <= threshold <= MAX_CACHE_THRESHOLD:
            raise ValueError(
                f"`cache.threshold` must be between 0 and {MAX_CACHE_THRESHOLD:g} but is {threshold}."
            )
        return threshold

    @field_validator("max_skip", "warmup_steps")
    @classmethod
    def _steps_in_range(cls, steps: int, info) -> int:
        if not 0 <= steps <= MAX_STEPS:
            raise ValueError(f"`cache.{info.field_name}` must be between 0 and {MAX_STEPS} but is {steps}.")
        return steps


# The final tier's default cache (ModelSpec.final_cache). MagCache's setting for Wan2.2 T2V-A14B
# (Zehong-Ma/MagCache, MagCache4Wan2.2/README.md and magcache_generate.py): threshold 0.06, K = 2,
# retention ratio 0.4 of the 26 high-noise steps of 40, i.e. the first 10 steps always run.
DEFAULT_FINAL_CACHE = StepCacheSettings(threshold=0.06, max_skip=2, warmup_steps=10)
DRAFT_CACHE_PROBLEM = (
    "`cache` is for `quality: final` only (step caching does not help the 4-step draft recipe); omit "
    "`cache`, or ask for `quality: final`."
)


class TierRecipe(BaseModel):
    """How one quality tier samples: steps, solver, shift, CFG and the adapter its experts run with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(ge=1, le=MAX_STEPS, description="Denoising steps of both experts together.")
    num_high_steps: int | None = Field(
        None,
        ge=0,
        description="How many of `steps` the high-noise expert runs, as published (the boundary routes "
        "the steps, in one place; tests check that it gives this split). None: not fixed.",
    )
    solver: Literal["unipc", "euler"] = Field(
        description="`unipc`: UniPC multistep flow solver; `euler`: flow-matching Euler (what the distill "
        "LoRAs were distilled with)."
    )
    flow_shift: float = Field(gt=0.0, description="Timestep shift of the sigma schedule.")
    guidance_high: float = Field(ge=0.0, description="CFG of the high-noise expert; <= 1: no CFG rows.")
    guidance_low: float = Field(ge=0.0, description="CFG of the low-noise expert; <= 1: no CFG rows.")
    adapter: str | None = Field(
        None, description=f"LoRA adapter both experts run with (`{DISTILL_ADAPTER}`); None: base weights."
    )
    cache: StepCacheSettings | None = Field(
        None, description="Step caching of a request that names none; None: every step runs."
    )

    @model_validator(mode="after")
    def _split_within_steps(self) -> TierRecipe:
        if self.num_high_steps is not None and self.num_high_steps > self.steps:
            raise ValueError(
                f"`num_high_steps` ({self.num_high_steps}) must not exceed `steps` ({self.steps})."
            )
        return self


# The published Wan2.2 T2V-A14B 4-step distill recipe (lightx2v's Wan2.2-Lightning and Wan2.2-Distill-Loras):
# - Wan2.2-Lightning `wan/configs/wan_t2v_A14B.py`: sample_steps 4, sample_shift 5.0, boundary 0.875,
#   sample_guide_scale (1.0, 1.0) (no CFG); its generate.py defaults to `--sample_solver euler` and warns
#   "Please use euler solver because it's used in distillation" (wan/utils/fm_solvers_euler.py: sigmas
#   linspace(1, 0, steps + 1), shifted s' = shift*s / (1 + (shift-1)*s), x += (s_next - s) * v).
# - ModelTC/LightX2V `configs/wan22/wan_moe_t2v_distill_lora.json`: infer_steps 4, denoising_step_list
#   [1000, 750, 500, 250], sample_shift 5.0, enable_cfg false, boundary_step_index 2 (2 high + 2 low), LoRA
#   strength 1.0 per expert (wan2.2_t2v_A14b_{high,low}_noise_lora_rank64_lightx2v_4step_1217.safetensors).
# Shifted, the four timesteps are 1000, 937.5, 833.3, 625: the boundary 875 gives the same 2 + 2 split.
DRAFT_RECIPE = TierRecipe(
    steps=4,
    num_high_steps=2,
    solver="euler",
    flow_shift=5.0,
    guidance_high=1.0,
    guidance_low=1.0,
    adapter=DISTILL_ADAPTER,
    cache=None,  # caching does not help 4-step models
)


def num_video_tokens(latent_shape: Sequence[int], patch_size: Sequence[int]) -> int:
    """Transformer tokens of one row of latents shaped (channels, frames, height, width): one per patch.
    The one home of this count; the engine, the split transformer, admission and the cost model read it."""
    pt, ph, pw = patch_size
    _, frames, height, width = latent_shape
    return (frames // pt) * (height // ph) * (width // pw)


Task = Literal["t2v", "i2v"]  # text-to-video (Wan2.2-T2V-A14B) or image-to-video (Wan2.2-I2V-A14B)
TASKS: tuple[Task, ...] = ("t2v", "i2v")


class ModelSpec(BaseModel):
    """Sampling facts of a Wan2.2 A14B model; the defaults are T2V's official ones (`model_spec("i2v")`
    gives I2V's)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    boundary_ratio: float = Field(
        0.875, gt=0.0, lt=1.0, description="Timesteps t >= boundary_ratio * 1000 go to the high-noise expert."
    )
    flow_shift: float = Field(
        12.0,
        gt=0.0,
        description="UniPC flow shift; the Diffusers repo ships 3.0, Wan2.2 T2V samples with 12.0.",
    )
    num_steps: int = Field(40, ge=1, le=MAX_STEPS, description="Default number of denoising steps.")
    guidance_high: float = Field(4.0, ge=0.0, description="CFG scale of the high-noise expert.")
    guidance_low: float = Field(3.0, ge=0.0, description="CFG scale of the low-noise expert.")
    fps: int = Field(16, ge=1, description="Frames per second the model generates for.")
    max_sequence_length: int = Field(512, ge=1, description="Text tokens per prompt (umT5).")
    vae_scale_temporal: int = Field(4, ge=1, description="VAE temporal stride.")
    vae_scale_spatial: int = Field(8, ge=1, description="VAE spatial stride.")
    patch_size: tuple[int, int, int] = Field((1, 2, 2), description="DiT patch size (t, h, w).")
    # `final` is the official recipe of the fields above (Wan2.2 repo, wan/configs/wan_t2v_A14B.py: 40
    # steps, shift 12, guide_scale (3.0, 4.0) low/high, UniPC); the boundary gives 26 high + 14 low steps.
    final_num_high_steps: int | None = Field(
        26,
        ge=0,
        description="High-noise steps of the official recipe when `num_steps` is 40 (T2V: 26 of 40; I2V: "
        "15 of 40), checked by the tests against the boundary; None: not fixed.",
    )
    draft: TierRecipe = Field(DRAFT_RECIPE, description="The `draft` tier: few-step distilled experts.")
    final_cache: StepCacheSettings | None = Field(
        DEFAULT_FINAL_CACHE,
        description="Step caching of a `final` request that names none (MagCache's Wan2.2 setting); None: "
        "every step runs.",
    )

    def latent_shape(
        self, width: int, height: int, num_frames: int, channels: int = 16
    ) -> tuple[int, int, int, int]:
        """(channels, latent_frames, latent_height, latent_width) of a clip of this size."""
        return (
            channels,
            (num_frames - 1) // self.vae_scale_temporal + 1,
            height // self.vae_scale_spatial,
            width // self.vae_scale_spatial,
        )

    def num_video_tokens(self, width: int, height: int, num_frames: int) -> int:
        """Transformer tokens in one row of a clip of this size (before CFG doubling): 75,600 at 720p and
        32,760 at 480p for 81 frames."""
        return num_video_tokens(self.latent_shape(width, height, num_frames), self.patch_size)

    def recipe(self, quality: Quality) -> TierRecipe:
        """The sampling recipe of a quality tier; `final` is the official one this spec holds."""
        if quality == "draft":
            return self.draft
        return TierRecipe(
            steps=self.num_steps,
            num_high_steps=self.final_num_high_steps if self.num_steps == 40 else None,
            solver="unipc",
            flow_shift=self.flow_shift,
            guidance_high=self.guidance_high,
            guidance_low=self.guidance_low,
            adapter=None,
            cache=self.final_cache,
        )


# Wan2.2-I2V-A14B's official recipe (Wan-Video/Wan2.2 wan/configs/wan_i2v_A14B.py: sample_steps 40,
# sample_shift 5.0, boundary 0.900, sample_guide_scale (3.5, 3.5) low/high, UniPC): the boundary gives 15
# high + 25 low steps. Its draft tier is T2V's recipe (Wan2.2-Lightning's I2V 4-step LoRAs: shift 5.0, no
# CFG, Euler); shifted, the four timesteps 1000, 937.5, 833.3, 625 split 2 + 2 at 900 as at 875. No step
# cache by default: MagCache's published ratios here are T2V's (a preset calibrates its own curve).
I2V_MODEL = ModelSpec(
    boundary_ratio=0.9,
    flow_shift=5.0,
    guidance_high=3.5,
    guidance_low=3.5,
    final_num_high_steps=15,
    final_cache=None,
)


def model_spec(task: Task) -> ModelSpec:
    """The official sampling facts of the Wan2.2 A14B model of `task`."""
    return I2V_MODEL if task == "i2v" else ModelSpec()


class SizeEnvelope(BaseModel):
    """The clip sizes a deployment serves: Wan2.2's presets (480p and 720p, either aspect) and custom sizes
    between `min_pixels` and `max_pixels`, up to `max_frames`. Past 720p the model leaves what it was
    trained for and one clip can hold an accelerator for many minutes; below the minimum a clip is useless
    as a draft."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_pixels: int = Field(256 * 256, ge=1, description="Fewest pixels of a frame (width × height).")
    max_pixels: int = Field(1280 * 720, ge=1, description="Most pixels of a frame (720p).")
    max_frames: int = Field(161, ge=1, description="Most frames of a clip (10 s at 16 fps).")

    @model_validator(mode="after")
    def _ordered(self) -> SizeEnvelope:
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"`min_pixels` ({self.min_pixels}) must not exceed `max_pixels` ({self.max_pixels})."
            )
        return self

    def problem(self, width: int, height: int, num_frames: int) -> str | None:
        """Why a clip of this size is outside the envelope (None when it is inside)."""
        pixels = width * height
        if pixels > self.max_pixels:
            return (
                f"{width}x{height} has {pixels:,} pixels a frame; this deployment serves at most "
                f"{self.max_pixels:,} (1280x720 = 921,600): generate smaller and use `upscale`"
            )
        if pixels < self.min_pixels:
            return (
                f"{width}x{height} has {pixels:,} pixels a frame; "
                f"this deployment needs at least {self.min_pixels:,}"
            )
        if num_frames > self.max_frames:
            return f"the clip has {num_frames} frames; this deployment serves at most {self.max_frames}"
        return None


class LoraRef(BaseModel):
    """A style or character LoRA a request runs with, at a weight (the adapter's scale)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=ADAPTER_NAME_PATTERN, description="A registered adapter's name.")
    weight: float = Field(1.0, ge=-4.0, le=4.0, description="Scale of the adapter's update (1: as trained).")


class RequestSpec(BaseModel):
    """One clip: prompt, size, length, sampling settings. Resolves to exact pixels and frames."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: str = Field(description="What the shot shows.")
    negative_prompt: str = Field(DEFAULT_NEGATIVE_PROMPT, description="What to steer away from.")
    resolution: str = Field("480p", description="`480p`, `720p`, or explicit `WxH` (multiples of 16).")
    aspect: Literal["16:9", "9:16"] | None = Field(
        None, description="Orientation of a preset resolution (default 16:9); not allowed with `WxH`."
    )
    duration: float = Field(5.0, description=f"Clip length in seconds ({MIN_DURATION_S}–{MAX_DURATION_S}).")
    steps: int | None = Field(None, description=f"Denoising steps (1–{MAX_STEPS}); default from the model.")
    seed: int | None = Field(None, description=f"Noise seed (0–{MAX_SEED}); random when omitted.")
    guidance_high: float | None = Field(None, description="Override the high-noise expert's CFG scale.")
    guidance_low: float | None = Field(None, description="Override the low-noise expert's CFG scale.")
    quality: Quality | None = Field(None, description="`draft` or `final` tier; default `final`.")
    loras: tuple[LoraRef, ...] = Field((), description=f"Style/character LoRAs (at most {MAX_LORAS}).")
    cache: StepCacheSettings | None = Field(
        None,
        description="Step caching; omitted: the tier's default (`final`: DEFAULT_FINAL_CACHE, `draft`: "
        "none); None given: every step runs. Not with `quality: draft` (4-step models gain nothing).",
    )

    @field_validator("loras")
    @classmethod
    def _loras_distinct(cls, loras: tuple[LoraRef, ...]) -> tuple[LoraRef, ...]:
        if len(loras) > MAX_LORAS:
            raise ValueError(f"`loras` has {len(loras)} adapters; at most {MAX_LORAS} are allowed.")
        names = [lora.name for lora in loras]
        if len(set(names)) != len(names):
            raise ValueError(f"`loras` names an adapter twice: {', '.join(names)}.")
        if DISTILL_ADAPTER in names:
            raise ValueError(f"`loras` cannot name {DISTILL_ADAPTER!r}: `quality: draft` selects it.")
        return loras

    @field_validator("cache")
    @classmethod
    def _cache_final_only(cls, cache: StepCacheSettings | None, info) -> StepCacheSettings | None:
        if cache is not None and info.data.get("quality") == "draft":
            raise ValueError(DRAFT_CACHE_PROBLEM)
        return cache

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt: str) -> str:
        if not prompt:
            raise ValueError("`prompt` must not be empty.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(
                f"`prompt` has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed."
            )
        return prompt

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt_length(cls, negative_prompt: str) -> str:
        if len(negative_prompt) > MAX_PROMPT_CHARS:
            raise ValueError(
                f"`negative_prompt` has {len(negative_prompt)} characters; "
                f"at most {MAX_PROMPT_CHARS} are allowed."
            )
        return negative_prompt

    @field_validator("resolution")
    @classmethod
    def _resolution_known(cls, resolution: str) -> str:
        resolution = resolution.lower()
        if resolution in RESOLUTION_PRESETS:
            return resolution
        match = _EXPLICIT_SIZE.match(resolution)
        if match is None:
            raise ValueError(f"`resolution` must be 480p, 720p or WxH (e.g. 832x480) but is {resolution!r}.")
        for name, value in zip(("width", "height"), map(int, match.groups()), strict=True):
            if value % 16 or not MIN_SIDE <= value <= MAX_SIDE:
                raise ValueError(
                    f"`resolution` {name} must be a multiple of 16 between {MIN_SIDE} and {MAX_SIDE} "
                    f"but is {value}."
                )
        return resolution

    @field_validator("duration")
    @classmethod
    def _duration_in_range(cls, duration: float) -> float:
        if not MIN_DURATION_S <= duration <= MAX_DURATION_S:
            raise ValueError(
                f"`duration` must be between {MIN_DURATION_S} and {MAX_DURATION_S} seconds but is {duration}."
            )
        return duration

    @field_validator("steps")
    @classmethod
    def _steps_in_range(cls, steps: int | None) -> int | None:
        if steps is not None and not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"`steps` must be between 1 and {MAX_STEPS} but is {steps}.")
        return steps

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, seed: int | None) -> int | None:
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise ValueError(f"`seed` must be between 0 and {MAX_SEED} but is {seed}.")
        return seed

    @field_validator("guidance_high", "guidance_low")
    @classmethod
    def _guidance_in_range(cls, scale: float | None, info) -> float | None:
        if scale is not None and not 0.0 <= scale <= 20.0:
            raise ValueError(f"`{info.field_name}` must be between 0 and 20 but is {scale}.")
        return scale

    @model_validator(mode="after")
    def _aspect_only_for_presets(self) -> RequestSpec:
        if self.aspect is not None and self.resolution not in RESOLUTION_PRESETS:
            raise ValueError(
                f"`aspect` applies to the presets 480p/720p only; `resolution` {self.resolution} already "
                "fixes the shape (swap WxH for portrait)."
            )
        return self

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        if self.resolution in RESOLUTION_PRESETS:
            width, height = RESOLUTION_PRESETS[self.resolution]
            return (height, width) if self.aspect == "9:16" else (width, height)
        width, height = map(int, self.resolution.split("x"))
        return width, height

    def num_frames(self, model: ModelSpec) -> int:
        """Frames for the duration: 4·round(duration·fps/4) + 1 (1 s → 17, 5 s → 81 at 16 fps)."""
        stride = model.vae_scale_temporal
        return stride * round(self.duration * model.fps / stride) + 1


class ResolvedRequest(BaseModel):
    """A RequestSpec with every default filled in: what the stages actually run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    fps: int
    steps: int
    seed: int
    guidance_high: float
    guidance_low: float
    quality: Quality = "final"  # rows stored before tiers existed ran the official recipe
    loras: tuple[LoraRef, ...] = ()
    cache: StepCacheSettings | None = None  # None: every step runs (rows stored before caching have none)

    def adapters(self, model: ModelSpec) -> AdapterSet:
        """(name, weight) of every adapter the experts run this request with, sorted: its tier's distill
        LoRA, then its style LoRAs. Requests batch together only when this matches."""
        recipe = model.recipe(self.quality)
        named = [(lora.name, lora.weight) for lora in self.loras]
        if recipe.adapter is not None:
            named.append((recipe.adapter, 1.0))
        return tuple(sorted(named))

    def latent_shape(self, model: ModelSpec, channels: int = 16) -> tuple[int, int, int, int]:
        """(channels, latent_frames, latent_height, latent_width) of this request's latents."""
        return model.latent_shape(self.width, self.height, self.num_frames, channels)

    def num_tokens(self, model: ModelSpec) -> int:
        """Transformer tokens in one forward of one sample (before CFG doubling)."""
        return model.num_video_tokens(self.width, self.height, self.num_frames)


def resolve(request: RequestSpec, model: ModelSpec) -> ResolvedRequest:
    """Fill defaults from the model and the request's tier (final when unset): its steps, guidance and,
    unless the request names `cache` (None included: off), its step cache; a missing seed becomes a fresh
    random one (recorded)."""
    width, height = request.size
    quality: Quality = request.quality or "final"
    recipe = model.recipe(quality)
    return ResolvedRequest(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=width,
        height=height,
        num_frames=request.num_frames(model),
        fps=model.fps,
        steps=request.steps if request.steps is not None else recipe.steps,
        seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
        guidance_high=request.guidance_high if request.guidance_high is not None else recipe.guidance_high,
        guidance_low=request.guidance_low if request.guidance_low is not None else recipe.guidance_low,
        quality=quality,
        loras=request.loras,
        cache=request.cache if "cache" in request.model_fields_set else recipe.cache,
    )


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, without pydantic's boilerplate ("Value error, ...")."""
    lines = []
    for problem in error.errors():
        message = problem["msg"].removeprefix("Value error, ")
        field = ".".join(str(part) for part in problem["loc"])
        if field and f"`{field}`" not in message:
            message = f"`{field}`: {message}"
        lines.append(message)
    return "; ".join(lines)
