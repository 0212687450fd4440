"""PrevizArgs: the one typed config of the Serve application (from Python, `serve run` or a YAML)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.denoise.adapters import DEFAULT_MAX_ADAPTERS
from pipeline.denoise.calibration import has_curve
from pipeline.denoise.fp8 import fp8_problem
from pipeline.denoise.parallel import DEFAULT_TIMEOUT_S
from pipeline.grade import LOOK_PATTERN
from pipeline.lora import BUILTIN
from pipeline.lut import Interpolation
from pipeline.priority import Priority
from pipeline.safety import SafetySettings
from pipeline.spec import ADAPTER_NAME_PATTERN, DISTILL_ADAPTER, ModelSpec, SizeEnvelope, model_spec
from pipeline.vae import DecodeDtype
from pipeline.weights import PRESETS
from serve.scheduling.lanes import default_reserved
from serve.sharding import ExpertsSettings
from serve.storage import StorageSettings


class EngineSettings(BaseModel):
    """Step-level batching inside each denoiser replica."""

    model_config = ConfigDict(extra="forbid")

    max_num_tokens: int = Field(
        262_144, ge=1, description="Token budget of one batched forward (CFG doubles a request's tokens)."
    )
    max_batch_size: int = Field(16, ge=1, description="Most requests in one batched forward.")


class RoutingSettings(BaseModel):
    """The denoisers' load-aware bucket router (serve/stages/router.py)."""

    model_config = ConfigDict(extra="forbid")

    load_factor: float = Field(
        1.25,
        ge=1.0,
        description="A bucket keeps its preferred replica while that replica's queued work is within this "
        "factor of the replicas' mean (plus the call's own work); past it the least-loaded replica takes "
        "the call. 1.0: strict balance; higher: more same-shape batching, less spread.",
    )


MAX_DECODE_RANKS = 8  # GPUs of one node: a rank group is STRICT_PACK


class DecoderSettings(BaseModel):
    """The VAEDecoder replicas: the dtype they decode in, the memory a decode may take, and which decoder
    each tier uses (a fast TAEHV decoder for drafts; finals always the full VAE)."""

    model_config = ConfigDict(extra="forbid")

    dtype: DecodeDtype = Field(
        "auto",
        description="The VAE's compute dtype: `auto` is bfloat16 on a GPU and float32 on CPU; `float32` "
        "decodes as the reference does (about twice the time and memory of bf16 on a GPU).",
    )
    max_memory_gib: float | None = Field(
        None,
        gt=0,
        description="Most device memory one decode may plan for; a clip whose full frames would need more "
        "is decoded in spatial tiles (smaller ones as needed). None: the GPU's free memory at the time of "
        "the decode (what a denoiser beside the decoder left); on CPU no bound.",
    )

    parallel: int = Field(
        1,
        description="Ranks (a GPU each) every full-VAE decode of a replica is split over: each rank decodes "
        "one block of every frame, halos swapped at every convolution (pipeline.vae_parallel). Above 1 "
        "the replica reserves a placement group of that many bundles on one node (STRICT_PACK), as a "
        "sharded expert does; ranks 1.. are actors in it. 1 to 8.",
    )
    timeout_s: float = Field(
        DEFAULT_TIMEOUT_S,
        gt=0,
        description="With `parallel` above 1: every collective of the decoder's rank group gives up after "
        "this long; the replica then exits and Serve replaces it with a new group.",
    )
    draft: Literal["vae", "fast"] = Field(
        "vae",
        description="The `draft` tier's decoder: `vae` (the full Wan VAE) or `fast` (TAEHV's tiny decoder "
        "for the Wan2.1 latent space: several times faster, softer detail).",
    )
    final: Literal["vae"] = Field("vae", description="The `final` tier's decoder: always the full VAE.")
    fast_weights: str = Field(
        BUILTIN,
        description="The fast decoder's weights: TAEHV's published `taew2_1.pth` (or its .safetensors) as a "
        f"local path; `{BUILTIN}`: the presets' seeded random ones.",
    )

    @field_validator("final", mode="before")
    @classmethod
    def _finals_use_the_full_vae(cls, value: str) -> str:
        if value != "vae":
            raise ValueError(
                f"`decoder.final` must be `vae` but is {value!r}: finals always decode with the full VAE "
                "(the fast decoder is for drafts: `decoder.draft: fast`)."
            )
        return value

    @field_validator("parallel")
    @classmethod
    def _ranks_on_one_node(cls, value: int) -> int:
        if not 1 <= value <= MAX_DECODE_RANKS:
            raise ValueError(
                f"`decoder.parallel` must be 1 to {MAX_DECODE_RANKS} but is {value}: a decoder's rank group "
                f"sits on one node (STRICT_PACK), a GPU per rank."
            )
        return value

    @property
    def max_memory_bytes(self) -> int | None:
        return None if self.max_memory_gib is None else int(self.max_memory_gib * 2**30)


class LoraSettings(BaseModel):
    """A style or character LoRA the denoiser replicas load, and who may use it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ADAPTER_NAME_PATTERN, description="What requests call it (`loras[].name`).")
    source: str = Field(
        description="A folder or s3:// prefix with high_noise_model.safetensors and/or "
        "low_noise_model.safetensors (lightx2v / diffusers Wan LoRA files)."
    )
    project: str | None = Field(None, description="The one project that may use it; None: every project.")
    description: str | None = Field(None, max_length=200, description="What it does, for `GET /v1/models`.")


class LutSource(BaseModel):
    """A LUT the deployment registers for a project when the Ingress starts (serve.luts reads it)."""

    model_config = ConfigDict(extra="forbid")

    project: str = Field(description="The project that may use it (created when missing).")
    name: str = Field(pattern=LOOK_PATTERN, description="The look's name in requests (`look`).")
    source: str = Field(description="A .cube file: a local path or `s3://bucket/key`.")
    interpolation: Interpolation = Field("tetrahedral", description="How the 3D table is interpolated.")


class AdapterSettings(BaseModel):
    """LoRA adapters: the draft tier's distill LoRA and the studio's style/character LoRAs. Each denoiser
    replica loads them once at start; requests pick theirs per step (never fused)."""

    model_config = ConfigDict(extra="forbid")

    draft_lora: str | None = Field(
        BUILTIN,
        description="The `draft` tier's distill LoRA (e.g. lightx2v Wan2.2-Lightning T2V 4-step): a folder "
        "or s3:// prefix with high_noise_model.safetensors and low_noise_model.safetensors; `builtin` (the "
        "presets' default): their seeded random ones; None (real models' default): no draft tier, every "
        "video is final.",
    )
    loras: list[LoraSettings] = Field(default_factory=list, description="Style and character LoRAs.")
    max_adapters: int = Field(
        DEFAULT_MAX_ADAPTERS, ge=0, description="Most adapters one expert replica loads (memory bound)."
    )

    @model_validator(mode="after")
    def _names_distinct_and_bounded(self) -> AdapterSettings:
        names = [lora.name for lora in self.loras]
        if DISTILL_ADAPTER in names or len(set(names)) != len(names):
            raise ValueError(
                f"`adapters.loras` names must be distinct and not {DISTILL_ADAPTER!r}, but are {names}."
            )
        total = len(names) + (self.draft_lora is not None)
        if total > self.max_adapters:
            raise ValueError(
                f"{total} adapters are configured but `adapters.max_adapters` is {self.max_adapters}."
            )
        return self


class ImageToVideoSettings(BaseModel):
    """The image-to-video model (Wan2.2-I2V-A14B) served beside the text-to-video one: its own expert
    deployments (named with the `I2V` prefix: `I2VHighNoiseDenoiser`, `I2VLowNoiseDenoiser`, or
    `I2VDenoiser` when colocated), laid out, sharded, tiered, LoRA'd and cached exactly as T2V's (the same
    deployment classes and engine, built from these fields), plus a `VAEEncoder` deployment that makes the
    keyframes' condition latents. The text encoder, the VAE decoder, the upscaler and the finisher are
    shared: both Wan2.2 A14B models use the same umT5 and Wan2.1 VAE."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "tiny-i2v",
        description="`tiny-i2v`, `small-i2v`, a Diffusers Wan2.2-I2V-A14B folder or `s3://bucket/prefix`.",
    )
    sampling: ModelSpec = Field(
        default_factory=lambda: model_spec("i2v"),
        description="Its sampling settings; default the official I2V recipe (40 steps, shift 5.0, CFG "
        "3.5/3.5, boundary 0.900, no `final_cache`). Fields not given keep the I2V recipe's values, not "
        "T2V's.",
    )
    experts: ExpertsSettings = Field(
        default_factory=ExpertsSettings,
        description="Its experts' layout and per-expert rank groups, as the top-level `experts`.",
    )
    adapters: AdapterSettings = Field(
        default_factory=AdapterSettings,
        description="Its LoRAs: the draft tier's distill LoRA (Wan2.2-Lightning I2V 4-step files) and style "
        "LoRAs trained for the I2V experts, as the top-level `adapters`.",
    )

    @field_validator("sampling", mode="before")
    @classmethod
    def _sampling_over_the_i2v_recipe(cls, value: object) -> object:
        """A partial `sampling` changes the I2V recipe's fields it names; the rest stay I2V's (boundary
        0.900, shift 5.0, no step cache), never ModelSpec's T2V defaults."""
        if isinstance(value, Mapping):
            return {**model_spec("i2v").model_dump(), **value}
        return value

    @model_validator(mode="after")
    def _final_cache_needs_a_curve(self) -> ImageToVideoSettings:
        if self.sampling.final_cache is not None and not has_curve(self.model, "i2v"):
            raise ValueError(
                "`i2v.sampling.final_cache` turns the `final` tier's step cache on, but model "
                f"{self.model!r} (Wan2.2-I2V-A14B weights) has no step-cache curve to decide skips by "
                "(MagCache's published ratios are for Wan2.2-T2V-A14B only; the presets calibrate their "
                "own), so admission would refuse every final I2V request; set "
                "`i2v.sampling.final_cache: null`."
            )
        return self


PUBLIC_URL_PATTERN = r"^https?://[^\s/?#@]+(/[^\s?#]*)?$"  # scheme and host, maybe a path; no query


class WebhookSettings(BaseModel):
    """Delivery of `callback_url` webhooks by the Scheduler: retries with exponential backoff."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(8, ge=1, description="HTTP attempts per webhook before it is marked failed.")
    retry_base_s: float = Field(
        2.0, gt=0, description="Delay after the first failed attempt; doubles per attempt (with jitter)."
    )
    retry_cap_s: float = Field(600.0, gt=0, description="Longest delay between two attempts.")
    timeout_s: float = Field(10.0, gt=0, description="Per-attempt HTTP timeout; redirects are not followed.")
    poll_interval_s: float = Field(1.0, gt=0, description="How often the dispatcher looks for due webhooks.")
    allow_http: bool = Field(
        False, description="Accept `http://` callback URLs too (default: `https://` only)."
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Internal receivers allowed despite the SSRF rules: host names, or networks such as "
        "`10.20.0.0/16` whose addresses may be called. Everything else must be a public address.",
    )


class PrevizArgs(BaseModel):
    """Everything the application needs; per-deployment replicas and resources live in the Serve config."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "tiny", description="`tiny`, `small`, a Diffusers Wan2.2 folder or `s3://bucket/prefix`."
    )
    device: str | None = Field(None, description="`cpu` or `cuda`; default: cuda when available.")
    model_cache_dir: Path = Field(
        Path.home() / ".cache" / "previz" / "models", description="Where s3:// models are mirrored."
    )
    sampling: ModelSpec = Field(
        default_factory=ModelSpec,
        description="Sampling settings (boundary, flow shift, default steps and CFG).",
    )
    envelope: SizeEnvelope = Field(
        default_factory=SizeEnvelope,
        description="Clip sizes served (min/max pixels a frame, max frames); shown in GET /v1/models.",
    )
    sr_weights: Path | None = Field(None, description="Real-ESRGAN-family weights for the Upscaler.")
    interpolation_weights: Path | None = Field(
        None,
        description="A RIFE-family frame-interpolation network (`torch.export` .pt2) for the Finisher's fps "
        "conform; unset: OpenCV DIS optical flow.",
    )
    database_url: str = Field(
        "sqlite:///previz-data/jobs.db",
        description="Job store: SQLite file (default) or postgresql+psycopg://...",
    )
    storage: StorageSettings = Field(default_factory=StorageSettings, description="Where finished clips go.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="Denoiser batching.")
    routing: RoutingSettings = Field(
        default_factory=RoutingSettings, description="The denoisers' load-aware router (its load bound)."
    )
    adapters: AdapterSettings = Field(
        default_factory=AdapterSettings, description="LoRA adapters: the draft tier's, and style LoRAs."
    )
    experts: ExpertsSettings = Field(
        default_factory=ExpertsSettings,
        description="The experts' layout (`split`: a deployment each; `colocated`: one `Denoiser` holding "
        "both) and per expert its rank group (`parallel: {ulysses, cfg}`; default 1x1) and kernels.",
    )
    decoder: DecoderSettings = Field(
        default_factory=DecoderSettings,
        description="The VAE decode stage (dtype, memory bound, the draft tier's fast decoder).",
    )
    i2v: ImageToVideoSettings | None = Field(
        None,
        description="Also serve Wan2.2-I2V-A14B (`wan2.2-i2v-a14b`, shots from keyframes) with its expert "
        "deployments and a VAEEncoder; None: text-to-video only.",
    )
    max_jobs_in_flight: int = Field(
        8, ge=1, description="Jobs the Scheduler keeps inside the pipeline at once (the rest wait queued)."
    )
    lanes: dict[Priority, int] | None = Field(
        None,
        description="Slots of `max_jobs_in_flight` reserved per priority class (lanes): a lane takes its own "
        "reserve or the unreserved slots, never another lane's reserve, so interactive shots never wait "
        "behind a batch backlog for a slot. None: a quarter of the slots for `interactive`.",
    )
    max_cuts_in_flight: int = Field(
        2,
        ge=1,
        description="Storyboard cuts the Scheduler has the Finisher's replicas render at once (each uses a "
        "core for minutes on a long board; the rest wait queued).",
    )
    max_queued_jobs: int = Field(1000, ge=1, description="Bound of the queue; beyond it new jobs get 429.")
    max_queued_jobs_per_project: int | None = Field(
        None, ge=1, description="Bound of one project's queued jobs (none by default); beyond it 429."
    )
    max_attempts: int = Field(
        3, ge=1, description="Runs of one job before it fails for good (restarts, crashes)."
    )
    finish_attempts: int = Field(
        3, ge=1, description="Calls of the Finisher for one clip before the job fails (storage down, crash)."
    )
    finish_retry_base_s: float = Field(
        1.0, ge=0, description="Wait before the 2nd Finisher call; doubled before each later one."
    )
    poll_interval_s: float = Field(0.5, gt=0, description="How often the Scheduler looks for queued jobs.")
    progress_write_interval_s: float = Field(
        1.0,
        ge=0,
        description="Most often a denoising job's step progress is written to the job store (stage changes, "
        "the first and the last step are always written).",
    )
    retention_sweep_s: float = Field(
        300.0, gt=0, description="How often Housekeeping deletes the videos past their project's retention."
    )
    artifact_url_ttl_s: int = Field(
        3600,
        ge=1,
        le=7 * 24 * 3600,
        description="Lifetime of the signed links `/v1/videos/{id}/content` redirects to (S3 or local).",
    )
    text_cache_size: int = Field(1024, ge=0, description="Prompt embeddings kept per TextEncoder replica.")
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings, description="callback_url delivery.")
    public_url: str | None = Field(
        None,
        pattern=PUBLIC_URL_PATTERN,
        description="The API's address as clients and webhook receivers reach it, e.g. "
        "`https://previz.studio.example`: webhook payloads carry absolute `content_url` and `thumbnail_url` "
        "made with it. Unset: they are paths (`/v1/videos/{id}/content`).",
    )
    safety: SafetySettings = Field(
        default_factory=SafetySettings,
        description="Content policy: term lists, prompt classifier and frame-check hooks.",
    )
    luts: list[LutSource] = Field(
        default_factory=list,
        description="LUT looks registered for projects when the Ingress starts (path or s3:// each); "
        "admins also upload them through /v1/admin/projects/{name}/luts.",
    )

    @property
    def reserved_slots(self) -> dict[str, int]:
        """priority -> slots reserved for it (the configured lanes, or the default)."""
        return dict(self.lanes) if self.lanes is not None else default_reserved(self.max_jobs_in_flight)

    @model_validator(mode="after")
    def _lanes_fit(self) -> PrevizArgs:
        reserved = self.reserved_slots
        if sum(reserved.values()) > self.max_jobs_in_flight or min(reserved.values(), default=0) < 0:
            raise ValueError(
                f"`lanes` reserve {reserved} slots: each must be >= 0 and together at most "
                f"`max_jobs_in_flight` ({self.max_jobs_in_flight})."
            )
        return self

    @model_validator(mode="after")
    def _builtin_lora_for_presets_only(self) -> PrevizArgs:
        if self.adapters.draft_lora == BUILTIN and self.model not in PRESETS:
            if "draft_lora" not in self.adapters.model_fields_set:  # the default: no draft tier here
                self.adapters.draft_lora = None
                return self
            raise ValueError(
                f"`adapters.draft_lora: {BUILTIN}` exists for the presets ({', '.join(PRESETS)}) only; model "
                f"{self.model!r} needs the distill LoRA's folder or s3:// prefix, or null (no draft tier)."
            )
        return self

    @model_validator(mode="after")
    def _builtin_fast_decoder_for_presets_only(self) -> PrevizArgs:
        if (
            self.decoder.draft == "fast"
            and self.decoder.fast_weights == BUILTIN
            and self.model not in PRESETS
        ):
            raise ValueError(
                f"`decoder.fast_weights: {BUILTIN}` exists for the presets ({', '.join(PRESETS)}) only; "
                f"model {self.model!r} needs TAEHV's published taew2_1.pth (a local path), or "
                "`decoder.draft: vae`."
            )
        return self

    @model_validator(mode="after")
    def _fp8_needs_a_gpu(self) -> PrevizArgs:
        if self.device is None or self.device.startswith("cuda"):
            return self  # the replica checks its GPU's compute capability when it loads the expert
        for expert in ("high", "low"):
            if self.experts.of(expert).fp8:
                raise ValueError(f"`experts.{expert}.fp8`: {fp8_problem(self.device)}")
        return self

    @model_validator(mode="after")
    def _i2v_args_valid(self) -> PrevizArgs:
        if self.i2v is not None:
            self.for_i2v()  # its own rules (LoRAs, fp8, decoder) hold for the I2V model's args too
        return self

    @property
    def serves_draft(self) -> bool:
        """Whether the `draft` tier is served (it needs the distill LoRA; every rank of a sharded replica
        holds it, so any degree serves it)."""
        return self.adapters.draft_lora is not None

    def for_i2v(self) -> PrevizArgs:
        """These args with the I2V model's source, sampling, experts and adapters in the top-level fields:
        what its deployments (the T2V classes, unchanged) and its admission rules are built from.
        ValueError when no I2V model is configured."""
        if self.i2v is None:
            raise ValueError("this deployment serves no image-to-video model (`i2v` is not configured).")
        i2v = self.i2v
        fields = {
            **self.model_dump(exclude={"i2v"}),
            "model": i2v.model,
            "sampling": i2v.sampling.model_dump(),
            "experts": i2v.experts.model_dump(),
            # unset fields stay unset: a real model's unset `draft_lora` means no draft tier, as for T2V
            "adapters": i2v.adapters.model_dump(exclude_unset=True),
        }
        return PrevizArgs.model_validate(fields)

    def lora(self, name: str) -> LoraSettings | None:
        """A style LoRA the replicas load (on every rank of a sharded replica too); None: not configured."""
        return next((lora for lora in self.adapters.loras if lora.name == name), None)


# Settings a deployment may give through the environment instead of the config file: secrets, which a
# Serve config (and the RayService that embeds it) should not hold. The environment wins.
ENVIRONMENT_OVERRIDES = {"PREVIZ_DATABASE_URL": "database_url"}


def with_environment(args: PrevizArgs, environ: Mapping[str, str]) -> PrevizArgs:
    """`args` with each ENVIRONMENT_OVERRIDES variable set in `environ` taking its field's place."""
    changes = {field: environ[name] for name, field in ENVIRONMENT_OVERRIDES.items() if environ.get(name)}
    return PrevizArgs.model_validate({**args.model_dump(), **changes}) if changes else args
