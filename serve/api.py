"""HTTP schemas: what clients send and get back (they become the OpenAPI page), and the one error shape."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.prompt import ShotSpec
from pipeline.spec import DEFAULT_NEGATIVE_PROMPT


class JobCreate(BaseModel):
    """A clip to generate."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, description="What the shot shows (or give `shot`).")
    shot: ShotSpec | None = Field(None, description="Structured shot fields, compiled into the prompt.")
    negative_prompt: str = Field(DEFAULT_NEGATIVE_PROMPT, description="What to steer away from.")
    project: str = Field(
        "default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Project the shot belongs to."
    )
    priority: Literal["interactive", "batch"] = Field(
        "batch", description="Interactive shots overtake batch work."
    )
    resolution: str = Field("480p", description="`480p`, `720p` or `WxH` (multiples of 16).")
    aspect: Literal["16:9", "9:16"] | None = Field(None, description="Orientation of a preset resolution.")
    duration: float = Field(5.0, description="Clip length in seconds (0.25–10).")
    steps: int | None = Field(None, description="Denoising steps (1–100); default 40.")
    seed: int | None = Field(None, description="Noise seed; random (and reported) when omitted.")
    upscale: Literal["none", "720p", "1080p"] = Field("none", description="Super-resolve the draft.")
    look: Literal["none", "film"] = Field("none", description="Colour grade.")
    label: bool = Field(True, description="Burn the 'AI-generated draft' label into the frames.")


class JobPublic(BaseModel):
    """A job as clients see it."""

    id: str = Field(description="Job id.")
    object: Literal["video"] = "video"
    project: str
    priority: str
    status: str = Field(description="queued, in_progress, completed, failed or cancelled.")
    stage: str = Field(description="Pipeline stage (queued, encoding, denoising_high, … succeeded).")
    progress: int = Field(description="0–100.")
    prompt: str
    size: str = Field(description="`WxH` of the generated draft (before upscaling).")
    num_frames: int
    seed: int
    attempt: int = Field(description="How many times the job was started (restarts re-run it).")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    timings: dict[str, float] = Field(description="Stage -> compute seconds.")
    error: ErrorBody | None = None
    content_url: str | None = Field(None, description="Where the mp4 is, once completed.")


class ErrorBody(BaseModel):
    code: str = Field(description="Machine-readable error code.")
    message: str = Field(description="What went wrong, for a person.")
    param: str | None = Field(None, description="The request field at fault, if one is.")


class ErrorResponse(BaseModel):
    error: ErrorBody


JobPublic.model_rebuild()
