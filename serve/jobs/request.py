"""JobRequest: what one stored job asks for, typed. Written once by the admission path, read by the
Scheduler (what to run), the video view (what to show) and the webhook outbox (what to announce).

It holds the validated spec (kept for remixes), the same spec resolved against the model (the exact size,
frames, steps and seed the stages run, so no reader needs the model to say what a job is), how to finish
the clip, where the prompt came from, the callback and the storyboard place.

Rows written before this type existed (format 1: a plain dict without `format` and `resolved`) still load:
`JobRequest.from_stored` upgrades them on read, resolving the spec with the official Wan2.2 defaults (the
seed was always fixed at create time, so the resolved request is the one the old code would have run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.lut import Interpolation
from pipeline.prompt import ShotSpec
from pipeline.spec import ModelSpec, RequestSpec, ResolvedRequest, resolve
from pipeline.video import DRAFT_LABEL

SERVED_MODEL = "wan2.2-t2v-a14b"  # the name the API serves the model under
I2V_MODEL = "wan2.2-i2v-a14b"  # the image-to-video model: jobs with keyframes run on it
JOB_REQUEST_FORMAT = 2  # 1: the untyped dict of earlier versions (upgraded on read)
Upscale = Literal["none", "720p", "1080p"]
FrameRate = Literal[
    16, 24, 25
]  # a clip's delivered rate: Wan2.2's 16, or conformed to 24 / 25 (pipeline.interpolate)


@dataclass(frozen=True, slots=True, order=True)
class Bucket:
    """The latent shape key: jobs of one bucket can share a denoiser batch, and the bucket-affinity router
    sends them to the same replica. Stored with every job as `"WxHxF"` (`str(bucket)`)."""

    width: int
    height: int
    num_frames: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}x{self.num_frames}"

    @classmethod
    def parse(cls, text: str) -> Bucket:
        """`"832x480x81"` -> Bucket(832, 480, 81); ValueError naming the text otherwise."""
        parts = text.split("x")
        if len(parts) != 3 or not all(part.isascii() and part.isdigit() for part in parts):
            raise ValueError(f"a bucket is WIDTHxHEIGHTxFRAMES such as '832x480x81', not {text!r}")
        width, height, num_frames = (int(part) for part in parts)
        return cls(width, height, num_frames)

    @property
    def size(self) -> str:
        """`"WxH"`: the clip's size before upscaling (the dashboards' resolution label)."""
        return f"{self.width}x{self.height}"


class LutRef(BaseModel):
    """The version of a project's LUT look a job was admitted with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(description="The .cube file in the artifact store.")
    sha256: str = Field(description="Of the file's bytes: the Finisher checks what it reads.")
    interpolation: Interpolation


class FinishSettings(BaseModel):
    """How the Finisher turns frames into the clip."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    upscale: Upscale = Field("none", description="Super-resolve the draft to this.")
    look: str = Field("none", description="Colour grade (`none`, `film`, or a project's LUT by name).")
    lut: LutRef | None = Field(None, description="The LUT of a `look` that names one.")
    label: str | None = Field(DRAFT_LABEL, description="Text burned into the frames; None: unlabelled.")
    fps: FrameRate = Field(
        16, description="Delivered frame rate; other than the model's, conformed after SR."
    )


class RequestSource(BaseModel):
    """What the client wrote, before the shot was compiled into the prompt (a remix starts from it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str | None = None
    shot: ShotSpec | None = None
    compiler: int = Field(
        1,
        description="The prompt compiler version (pipeline.prompt) that compiled `shot` into the spec's "
        "prompt; rows written before it was stored read as 1. A promote repeats the stored prompt.",
    )


class StoryboardPlace(BaseModel):
    """Where a storyboard's video sits on its board."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="The storyboard (`sb_…`).")
    shot: int = Field(description="Index of its shot in the board's `shots`.")
    variant: int = Field(description="Index among the shot's variants.")
    name: str | None = Field(None, description="The shot's name, e.g. `12A`.")
    grid: dict[str, str] = Field(default_factory=dict, description="Grid field -> value of this variant.")


class KeyframeSource(BaseModel):
    """Where one keyframe of a job came from. The pixels are the job's `JobArtifacts.keyframe` PNG
    (serve.jobs.keyframes), fitted to the job's size when it was admitted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["image", "take", "continue"] = Field(
        description="`image`: an uploaded image (a storyboard panel); `take`: the last frame of the finished "
        "take `video`; `continue`: the last frame of the previous shot's take, filled in when it finishes."
    )
    video: str | None = Field(None, description="The take whose last frame this is (`take`, `continue`).")
    shot: int | None = Field(
        None, description="`continue`: the index of the board's shot whose take this one continues."
    )
    sha256: str | None = Field(
        None, description="Of the stored PNG; None while a `continue` keyframe waits for its take."
    )


class Keyframes(BaseModel):
    """The keyframes of an image-to-video job: `first` conditions the first frame, `last` (experimental:
    Wan2.2 I2V was not trained for it) its last."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    first: KeyframeSource | None = None
    last: KeyframeSource | None = None


class JobRequest(BaseModel):
    """One job's request as stored (the `request` JSON column)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[2] = JOB_REQUEST_FORMAT
    model: str = Field(SERVED_MODEL, description="The served model's name, as the API reports it.")
    spec: RequestSpec = Field(description="The validated request, seed fixed.")
    resolved: ResolvedRequest = Field(description="`spec` with every default filled in: what runs.")
    finish: FinishSettings = Field(default_factory=FinishSettings)
    source: RequestSource = Field(default_factory=RequestSource)
    callback_url: str | None = Field(None, description="Where the outcome's webhook goes.")
    storyboard: StoryboardPlace | None = None
    remixed_from: str | None = Field(None, description="The source video of a remix.")
    promoted_from: str | None = Field(None, description="The draft this final-tier job was promoted from.")
    body_sha256: str | None = Field(None, description="Fingerprint of the body, to tell replays apart.")
    keyframes: Keyframes | None = Field(
        None, description="The images an I2V job starts (and may end) from; None for text-to-video."
    )

    @classmethod
    def of(cls, spec: RequestSpec, model: ModelSpec, **fields: Any) -> JobRequest:
        """A request for `spec` resolved against `model`; a missing seed is drawn now and fixed, so a
        rerun after a restart makes the same clip."""
        resolved = resolve(spec, model)
        if spec.seed is None:
            spec = spec.model_copy(update={"seed": resolved.seed})
        return cls(spec=spec, resolved=resolved, **fields)

    @property
    def bucket(self) -> Bucket:
        return Bucket(self.resolved.width, self.resolved.height, self.resolved.num_frames)

    def to_stored(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> JobRequest:
        """The request of a stored row, whatever format wrote it."""
        if data.get("format") == JOB_REQUEST_FORMAT:
            return cls.model_validate(data)
        return _upgrade_format_1(data)


def _upgrade_format_1(data: dict[str, Any]) -> JobRequest:
    """Format 1: {"spec", "finish": {upscale, look, label}, "model", "source": {prompt, shot}, "callback_url",
    "remixed_from", "storyboard": {id, shot, variant, name, grid}, "body_sha256"}, every key optional
    but `spec`; a missing `finish.label` meant the draft label."""
    # cache given as None: such a row ran every step (a final tier's default cache came later)
    spec = RequestSpec.model_validate({**data["spec"], "cache": None})
    finish = {key: value for key, value in (data.get("finish") or {}).items() if value is not None}
    if "label" in (data.get("finish") or {}):
        finish["label"] = data["finish"]["label"]  # an explicit None: unlabelled
    return JobRequest(
        model=data.get("model") or SERVED_MODEL,
        spec=spec,
        resolved=resolve(spec, ModelSpec()),
        finish=FinishSettings.model_validate(finish),
        source=RequestSource.model_validate(data.get("source") or {}),
        callback_url=data.get("callback_url"),
        storyboard=StoryboardPlace.model_validate(data["storyboard"]) if data.get("storyboard") else None,
        remixed_from=data.get("remixed_from"),
        body_sha256=data.get("body_sha256"),
    )
