"""The stage table: the one list of the stages a job runs through, in order.

Job status, progress, GPU-seconds accounting, the ETA, metrics, the CLI's progress bars, the one-process
pipeline and the Serve graph all read it; a new stage is one row here (plus, for a served stage, the
deployment class that serves it).

    for stage in job_plan():              # encode, denoise_high, denoise_low, decode, upscale, finish
        ...                                   # (encode_image after encode: job_plan(has={"keyframes"}))
        ...
    deployment_name(stage("denoise_high"), layout="colocated")   # -> "Denoiser"

Which deployment serves a stage is derived from the serving layout, never fixed per stage: in the `split`
layout each expert has its deployment, in the `colocated` one a single `Denoiser` serves both; a second
model (I2V beside T2V) prefixes its deployments' names. Optional stages (an image encode for keyframes)
run only for the jobs that need them, and a cut job runs only the finisher: `job_plan` says which rows a
job runs, and progress is spread over those rows only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["text_encoder", "image_encoder", "denoiser", "vae_decoder", "upscaler", "finisher"]
Layout = Literal["split", "colocated"]  # one deployment per expert, or both experts on every replica
Need = Literal["keyframes"]  # what a job must carry for an optional stage to run


@dataclass(frozen=True, slots=True)
class Stage:
    """One row of the table."""

    name: str  # timing key, metrics label and the one-process pipeline's stage: "denoise_high"
    status_name: str  # the JobStatus member of a job in this stage: "DENOISING_HIGH"
    status_value: int  # its stored value; the gaps between rows leave room for new stages
    label: str  # what the CLI's progress bar shows
    weight: float  # share of a job's overall progress (over the stages its plan runs)
    accelerator: bool  # runs on a GPU (capacity planning, placement)
    billed: bool  # its measured seconds count as GPU-seconds against the project's quota
    role: Role  # the kind of deployment that serves it (which one: `deployment_name`)
    expert: Literal["high", "low"] | None = None  # for a denoiser row: the expert it runs
    needs: Need | None = None  # an optional stage: runs only for jobs that carry this
    local_steps: tuple[str, ...] = ()  # finer steps the one-process pipeline reports inside it

    @property
    def steps(self) -> tuple[str, ...]:
        """The one-process pipeline's progress steps of this stage (itself when it has no finer ones)."""
        return self.local_steps or (self.name,)


STAGES: tuple[Stage, ...] = (
    # Not billed: the encoder batches and caches across jobs, so its wall time is not one job's work.
    Stage("encode", "ENCODING", 10, "text encoder", 2, True, False, "text_encoder"),
    # I2V only: the keyframes' condition latents (a clip-length VAE encode, about as costly as a decode)
    Stage(
        "encode_image",
        "ENCODING_IMAGE",
        15,
        "VAE encode (keyframes)",
        6,
        True,
        True,
        "image_encoder",
        needs="keyframes",
    ),
    Stage(
        "denoise_high",
        "DENOISING_HIGH",
        20,
        "denoise (high-noise expert)",
        50,
        True,
        True,
        "denoiser",
        "high",
    ),
    Stage(
        "denoise_low", "DENOISING_LOW", 30, "denoise (low-noise expert)", 30, True, True, "denoiser", "low"
    ),
    Stage("decode", "DECODING", 40, "VAE decode", 8, True, True, "vae_decoder"),
    Stage("upscale", "UPSCALING", 50, "upscale", 5, True, True, "upscaler"),
    Stage(
        "finish",
        "FINISHING",
        60,
        "finish",
        5,
        False,
        False,
        "finisher",
        local_steps=("conform", "grade", "encode_video"),
    ),
)

# What the one-process pipeline's finer steps show in the CLI.
STEP_LABELS: dict[str, str] = {
    **{stage.name: stage.label for stage in STAGES},
    "conform": "frame-rate conform",
    "grade": "grade",
    "encode_video": "mp4 encode",
}

# role -> deployment name (denoisers: see `deployment_name`)
ROLE_DEPLOYMENTS: dict[Role, str] = {
    "text_encoder": "TextEncoder",
    "image_encoder": "VAEEncoder",
    "vae_decoder": "VAEDecoder",
    "upscaler": "Upscaler",
    "finisher": "Finisher",
}
EXPERT_DEPLOYMENTS = {"high": "HighNoiseDenoiser", "low": "LowNoiseDenoiser"}  # the split layout
COLOCATED_DEPLOYMENT = "Denoiser"


def stage(name: str) -> Stage:
    """The row called `name`."""
    for row in STAGES:
        if row.name == name:
            return row
    raise KeyError(f"`name` must be one of {', '.join(row.name for row in STAGES)} but is {name!r}.")


def expert_stage(expert: str) -> Stage:
    """The denoiser row of `expert` ("high" or "low")."""
    for row in STAGES:
        if row.expert == expert:
            return row
    raise KeyError(f"`expert` must be 'high' or 'low' but is {expert!r}.")


def job_plan(
    *, has: frozenset[Need] = frozenset(), cut: bool = False, table: tuple[Stage, ...] = STAGES
) -> tuple[Stage, ...]:
    """The rows one job runs, in order: every required row and the optional rows whose need it `has`;
    a cut job runs the finisher only."""
    if cut:
        return tuple(row for row in table if row.role == "finisher")
    return tuple(row for row in table if row.needs is None or row.needs in has)


def progress_bands(plan: tuple[Stage, ...] | None = None) -> dict[str, tuple[float, float]]:
    """stage name -> (overall progress 0..100 when it starts, when it ends), over the rows of `plan`
    (None: a text-to-video job's, `job_plan()`)."""
    plan = job_plan() if plan is None else plan
    total = sum(row.weight for row in plan)
    bands, done = {}, 0.0
    for row in plan:
        bands[row.name] = (100 * done / total, 100 * (done + row.weight) / total)
        done += row.weight
    return bands


def overall_progress(name: str, fraction: float, plan: tuple[Stage, ...] | None = None) -> int:
    """0..100 across `plan` (None: `job_plan()`) for a job `fraction` of the way through stage `name`."""
    start, end = progress_bands(plan)[name]
    return int(start + (end - start) * min(max(fraction, 0.0), 1.0))


def accelerator_seconds(timings: dict[str, float], table: tuple[Stage, ...] = STAGES) -> float:
    """The GPU-seconds a job is billed for from its stage timings (stage name -> seconds)."""
    return float(sum(timings.get(row.name, 0.0) for row in table if row.billed))


def after(name: str, table: tuple[Stage, ...] = STAGES) -> tuple[Stage, ...]:
    """The rows after stage `name`, in order (the ETA's later stages)."""
    names = [row.name for row in table]
    return table[names.index(name) + 1 :]


def deployment_name(row: Stage, *, layout: Layout = "split", model: str | None = None) -> str:
    """The Serve deployment that serves `row`: from the layout (one deployment per expert, or one for
    both) and, for a second model served beside the first, that model's prefix (`I2V` -> `I2VDecoder`...)."""
    if row.role == "denoiser":
        if row.expert is None:
            raise ValueError(f"denoiser row {row.name!r} must name its `expert`.")
        name = COLOCATED_DEPLOYMENT if layout == "colocated" else EXPERT_DEPLOYMENTS[row.expert]
    else:
        name = ROLE_DEPLOYMENTS[row.role]
    return f"{model}{name}" if model else name


def deployments(
    plan: tuple[Stage, ...] | None = None, *, layout: Layout = "split", model: str | None = None
) -> dict[str, str]:
    """stage name -> deployment name for every row of `plan` (None: `job_plan()`; several rows may share
    one deployment)."""
    plan = job_plan() if plan is None else plan
    return {row.name: deployment_name(row, layout=layout, model=model) for row in plan}


def status_row(status_name: str, table: tuple[Stage, ...] = STAGES) -> Stage | None:
    """The row of a job in JobStatus `status_name`; None for QUEUED and the finished statuses."""
    return next((row for row in table if row.status_name == status_name), None)
