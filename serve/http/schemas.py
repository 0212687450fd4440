"""HTTP schemas: what clients send and get back (they become the OpenAPI page), and the one error shape.

The video objects follow the OpenAI Videos API (`openai.types.Video`, `VideoCreateParams`, ...) field
for field, so the official `openai` package works against Previz unchanged; studio extensions are extra
fields next to them. Differences from OpenAI, on purpose:

- `model` names a served model (`wan2.2-t2v-a14b`, aliases in SERVED_MODEL_ALIASES; `wan2.2-i2v-a14b`,
  aliases in I2V_MODEL_ALIASES); any other name (e.g. `sora-2`) is rejected with `unknown_model` rather
  than silently mapped. A create with an image and no `model` runs on the I2V model.
- `input_reference` is an image (a multipart file, or `{"image_url": <data URL>}`) or `{"file_id": <video
  id>}` (Previz has no Files API: the video's last frame); an http(s) URL is refused, never fetched.
- `seconds` is any length from 0.25 to 10 s (string or number), default 5; `size` is any `WxH` in
  multiples of 16 (32–1920), default 832x480. Wan2.2's own sizes are 1280x720, 720x1280, 832x480, 480x832.
- Status `cancelled` exists besides queued / in_progress / completed / failed.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    field_validator,
)
from pydantic_core import PydanticCustomError

from pipeline.grade import LOOK_PATTERN
from pipeline.prompt import ShotSpec
from pipeline.spec import (
    ADAPTER_NAME_PATTERN,
    DEFAULT_FINAL_CACHE,
    MAX_CACHE_THRESHOLD,
    MAX_DURATION_S,
    MAX_LORAS,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    MIN_DURATION_S,
    Quality,
)
from pipeline.video import DRAFT_LABEL
from serve.auth import PROJECT_PATTERN
from serve.jobs.models import Priority
from serve.jobs.outbox import WebhookEvent
from serve.jobs.request import I2V_MODEL, SERVED_MODEL, FrameRate, Upscale
from serve.jobs.reviews import ReviewStatus
from serve.numbers import WholeNumber, integral, whole_number

# lower-cased names a client may send for the served model
SERVED_MODEL_ALIASES = frozenset(
    {
        SERVED_MODEL,
        "wan2.2",
        "wan-2.2",
        "previz",
        "wan-ai/wan2.2-t2v-a14b",
        "wan-ai/wan2.2-t2v-a14b-diffusers",
    }
)
I2V_MODEL_ALIASES = frozenset({I2V_MODEL, "wan-ai/wan2.2-i2v-a14b", "wan-ai/wan2.2-i2v-a14b-diffusers"})
MAX_LABELS = 32
# ASCII digits only (int() reads other scripts' too), no leading zeros
_SIZE = re.compile(r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$")
_WXH = re.compile(r"^[0-9]+[xX][0-9]+$")
# `seconds` as text: a number written plainly (no sign, exponent or leading zeros); its range is checked
# with the request's, and the OpenAPI states both in one pattern (serve/http/openapi.py)
SECONDS_TEXT = re.compile(r"^(?:0|[1-9][0-9]*)(?:\.[0-9]+)?$")

LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MAX_LABEL_VALUE_CHARS = 256


def _label_value(value: object) -> object:
    value = integral(value)
    if isinstance(value, bool | int) or (isinstance(value, str) and len(value) <= MAX_LABEL_VALUE_CHARS):
        return value
    if isinstance(value, str):
        raise ValueError(f"a label value has at most {MAX_LABEL_VALUE_CHARS} characters, not {len(value)}")
    raise PydanticCustomError(
        "label_value_type",  # `invalid_type` in the API's error codes
        "a label value is text, a whole number or true/false, not {kind} {value}",
        {"kind": type(value).__name__, "value": repr(value)},
    )


# text (≤ 256 characters), a whole number or a bool; anything else is refused with that rule, not pydantic's
# list of union members
LabelValue = Annotated[StrictStr | StrictBool | StrictInt, BeforeValidator(_label_value)]
Project = Annotated[str, StringConstraints(pattern=PROJECT_PATTERN)]
VideoState = Literal["queued", "in_progress", "completed", "failed", "cancelled"]


def _size_is_wxh(size: str) -> str:
    if not _SIZE.match(size):
        raise ValueError(f"`size` must be WxH such as 1280x720 or 480x832 but is {size!r}.")
    return size


# `WxH` in ASCII digits without leading zeros (the envelope and the multiple-of-16 rule come later)
SizeText = Annotated[str, AfterValidator(_size_is_wxh)]


class LoraUse(BaseModel):
    """A style or character LoRA to run the clip with (registered for the project, or shared)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ADAPTER_NAME_PATTERN, description="The adapter's name (`GET /v1/models`).")
    weight: Annotated[float, Field(strict=True, ge=-4.0, le=4.0)] = Field(
        1.0, description="Scale of its update: 1 as trained, 0.5 half as strong."
    )


CacheSteps = whole_number(ge=0, le=MAX_STEPS)
CacheThreshold = Annotated[float, Field(strict=True, ge=0.0, le=MAX_CACHE_THRESHOLD, allow_inf_nan=False)]


class StepCache(BaseModel):
    """Step caching (MagCache, decided per request inside the engine): faster, at a small quality cost."""

    model_config = ConfigDict(extra="forbid")

    threshold: CacheThreshold = Field(
        description="Accumulated magnitude error a step may skip under; 0 never skips, 0.06 is MagCache's "
        "Wan2.2 setting, higher skips more."
    )
    max_skip: CacheSteps = Field(2, description="Most steps skipped in a row.")
    warmup_steps: CacheSteps = Field(
        0, description="The first steps, always computed (MagCache's default keeps 10 of 40)."
    )


class TakeFrame(BaseModel):
    """A keyframe taken from a take: the last decoded frame of a completed video of the project."""

    model_config = ConfigDict(extra="forbid")

    video: str = Field(min_length=1, max_length=64, description="The completed video (`vid_…`).")


KeyframeValue = Annotated[
    StrictStr,
    Field(description="An image as a base64 data URL (`data:image/png;base64,…`); http(s) URLs are refused."),
]


class KeyframesIn(BaseModel):
    """Images the clip starts (and may end) from: each a data URL, or `{"video": id}` for that take's
    last frame. Needs the I2V model (`wan2.2-i2v-a14b`, chosen when `model` is omitted)."""

    model_config = ConfigDict(extra="forbid")

    first: KeyframeValue | TakeFrame | None = Field(None, description="The clip's first frame.")
    last: KeyframeValue | TakeFrame | None = Field(
        None,
        description="The clip's last frame. Experimental: Wan2.2 I2V was not trained for first-and-last "
        "frame shots.",
    )


class ImageReference(BaseModel):
    """OpenAI's `input_reference` object: one of `image_url` or `file_id`."""

    model_config = ConfigDict(extra="forbid")

    image_url: str | None = Field(
        None, description="A base64 data URL of the image; an http(s) URL is refused (never fetched)."
    )
    file_id: str | None = Field(
        None, description="A completed video of the project (Previz has no Files API): its last frame."
    )


SecondsValue = StrictStr | StrictFloat | StrictInt  # "4", 4 or 2.5, as OpenAI's `seconds` is sent
DurationValue = StrictFloat | StrictInt


class GenerationSettings(BaseModel):
    """How one clip is generated: the fields a video and a storyboard shot share."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="What the shot shows (or give `shot`, or both)."
    )
    shot: ShotSpec | None = Field(
        None,
        description="Structured shot (character, action, environment, camera, style) compiled into the "
        "prompt; a `prompt` given as well is appended.",
    )
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="What to steer away from (default: Wan2.2's own)."
    )
    seconds: SecondsValue | None = Field(
        None,
        description='Clip length in seconds, as in OpenAI ("4", 4 or 2.5): '
        f"{MIN_DURATION_S}–{MAX_DURATION_S}; default 5. Same as `duration`; give one of them.",
    )
    duration: DurationValue | None = Field(None, description="Clip length in seconds (alias of `seconds`).")
    size: SizeText | None = Field(
        None,
        description="`WxH` as in OpenAI, multiples of 16 (Wan2.2: 1280x720, 720x1280, 832x480, 480x832). "
        "Give `size` or `resolution`.",
    )
    resolution: str | None = Field(
        None, description="Preset `480p` (default) or `720p` (with `aspect`), or `WxH`."
    )
    aspect: Literal["16:9", "9:16"] | None = Field(None, description="Orientation of a preset resolution.")
    steps: WholeNumber | None = Field(
        None, description="Denoising steps (1–100); default: the tier's (final 40, draft 4)."
    )
    seed: WholeNumber | None = Field(
        None, description="Noise seed (0 – 2**53-1); random (and reported) when omitted."
    )
    cache: StepCache | None = Field(
        None,
        description="Step caching for `quality: final`. Omitted: the final tier's default (threshold "
        f"{DEFAULT_FINAL_CACHE.threshold:g}, max_skip {DEFAULT_FINAL_CACHE.max_skip}, warmup_steps "
        f"{DEFAULT_FINAL_CACHE.warmup_steps}, MagCache's Wan2.2 setting); `null`: every step runs. A draft "
        "runs every step: `cache` with `quality: draft` is refused, and so is 400 `cache_not_for_draft` "
        "where the tier defaults to draft.",
    )
    upscale: Upscale = Field("none", description="Super-resolve the draft to this.")
    look: str = Field(
        "none",
        pattern=LOOK_PATTERN,
        description="Colour grade: `none`, `film`, or the name of one of the project's .cube LUTs.",
    )
    label: StrictBool = Field(True, description=f"Burn the {DRAFT_LABEL!r} label into the frames.")
    quality: Quality | None = Field(
        None,
        description="`draft`: the 4-step distilled experts (no CFG), seconds for a take; `final`: the full "
        "40-step recipe. Default: the project's `default_quality`, else `draft` for `interactive` and "
        "`final` for `batch` priority.",
    )
    loras: list[LoraUse] | None = Field(
        None,
        max_length=MAX_LORAS,
        description="Style/character LoRAs, each named once. In a multipart form: one JSON part holding "
        "the list, or one JSON object part per item.",
    )
    fps: FrameRate | None = Field(
        None,
        description="Delivered frame rate: 16 (the model's), or 24 / 25 conformed by motion interpolation "
        "after SR; default: the project's `default_fps`, else 16.",
    )
    keyframes: KeyframesIn | None = Field(
        None,
        description="Images the clip starts (and may end) from, fitted to its size (scaled to cover, "
        "centre-cropped); the I2V model only.",
    )

    @field_validator("seconds")
    @classmethod
    def _seconds_is_a_number(cls, seconds: str | float | None) -> str | float | None:
        if isinstance(seconds, str) and not SECONDS_TEXT.match(seconds):
            raise ValueError(
                f'`seconds` must be a number of seconds such as "4" or "2.5" but is {seconds!r}.'
            )
        return seconds

    @field_validator("resolution")
    @classmethod
    def _resolution_without_leading_zeros(cls, resolution: str | None) -> str | None:
        if resolution is not None and _WXH.match(resolution) and not _SIZE.match(resolution.lower()):
            raise ValueError(f"`resolution` must be 480p, 720p or WxH such as 832x480 but is {resolution!r}.")
        return resolution


class VideoCreate(GenerationSettings):
    """A clip to generate (`POST /v1/videos`, JSON or multipart form as the openai package sends it)."""

    model: str = Field(
        SERVED_MODEL, description=f"The served model: `{SERVED_MODEL}` (also `previz`, `wan2.2`)."
    )
    project: Project | None = Field(
        None, description="The API key's project (default); naming another one is 403 `project_mismatch`."
    )
    priority: Priority = Field("batch", description="`interactive` shots overtake `batch` work.")
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        max_length=MAX_LABELS,
        description='Free-form labels, e.g. {"scene": "12", "shot": "12A", "take": 3}.',
    )
    callback_url: AnyHttpUrl | None = Field(
        None,
        description="Called (a signed POST) when the video completes, fails or is cancelled; see "
        "`GET /v1/videos/{id}/webhooks`.",
    )
    input_reference: ImageReference | None = Field(
        None,
        description="OpenAI's reference image: a multipart file, `{image_url: <data URL>}` or "
        "`{file_id: <video id>}` (its last frame); the same as `keyframes.first`. PNG, JPEG or WebP, at "
        "most 8 MiB and 4096x4096 pixels; an http(s) URL is refused (`image_url_not_allowed`).",
    )


class VideoRemix(BaseModel):
    """A new take of an existing video: same seed, size, length and settings; a new prompt."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="The new prompt.")
    shot: ShotSpec | None = Field(None, description="A new structured shot instead of (or with) `prompt`.")
    priority: Priority | None = Field(None, description="Default: the source's.")
    labels: dict[LabelKey, LabelValue] | None = Field(
        None, max_length=MAX_LABELS, description="Default: the source's labels."
    )
    rechain: StrictBool = Field(
        False,
        description="A chained shot's take only (`continue`): start from the shot it continues as it is "
        "now (its selected take, else its first completed one), waiting for it if need be, instead of "
        "the frame the source started from. Changing a selection alone re-runs nothing.",
    )


class VideoPromote(BaseModel):
    """The final-tier take of a draft: same seed, prompt, shot, length and size (unless `size` is given)."""

    model_config = ConfigDict(extra="forbid")

    size: SizeText | None = Field(None, description="A new `WxH` (default: the draft's).")
    upscale: Upscale | None = Field(None, description="Default: the draft's.")
    look: str | None = Field(
        None, pattern=LOOK_PATTERN, description="`none`, `film` or a project LUT; default: the draft's."
    )
    cache: StepCache | None = Field(
        None,
        description="Step caching of the final take; omitted: the final tier's default; `null`: every step "
        "runs.",
    )
    priority: Priority | None = Field(None, description="Default: `batch`.")
    labels: dict[LabelKey, LabelValue] | None = Field(
        None, max_length=MAX_LABELS, description="Default: the draft's labels."
    )


class VideoError(BaseModel):
    code: str = Field(description="Machine-readable error code.")
    message: str = Field(description="What went wrong, for a person.")
    param: str | None = Field(None, description="The request field at fault, if one is.")


class Video(BaseModel):
    """A video job: the OpenAI `video` object plus studio fields."""

    id: str = Field(description="Video id (`vid_…`, sorts by creation time).")
    object: Literal["video"] = "video"
    model: str = Field(description="The model that generates it.")
    status: VideoState = Field(description="queued, in_progress, completed, failed or cancelled.")
    progress: int = Field(description="Approximate completion, 0–100.")
    created_at: int = Field(description="Unix seconds.")
    completed_at: int | None = Field(None, description="Unix seconds when it finished (any outcome).")
    expires_at: int | None = Field(
        None,
        description="Unix seconds when the finished video is deleted under its project's `retention_days`; "
        "null: kept until deleted.",
    )
    prompt: str = Field(description="The prompt it is generated from (a `shot` compiled in).")
    seconds: str = Field(description="Clip length in seconds.")
    size: str = Field(description="`WxH` of the generated draft (before upscaling).")
    remixed_from_video_id: str | None = Field(None, description="The source video of a remix.")
    error: VideoError | None = Field(None, description="Why it failed.")
    # studio extensions
    project: str
    priority: str
    stage: str = Field(description="Pipeline stage: queued, encoding, denoising_high, … succeeded.")
    queue_position: int | None = Field(
        None,
        description="How many videos are ahead of it while it waits: in the job queue (status queued) or, "
        "with `stage: queued` while in progress, in the replica of the stage it waits for (`waiting_for`: "
        "the text encoder's line for a forward, an expert's engine before its first step, the decoder's or "
        "the upscaler's line). Null once it runs.",
    )
    waiting_for: str | None = Field(
        None,
        description="While in progress but waiting in a stage's queue: that stage (`encoding`, "
        "`denoising_high`, `denoising_low`, `decoding`, `upscaling`), counted where the work waits; "
        "`continuity` while a chained shot's take (queued) waits for the take of the shot it continues; "
        "null otherwise.",
    )
    seed: int
    steps: int
    quality: Quality = Field(description="`draft` (distilled, few steps) or `final` (the full recipe).")
    loras: list[LoraUse] = Field(description="The style/character LoRAs it runs with.")
    promoted_from: str | None = Field(None, description="The draft this final take was promoted from.")
    promoted_to: str | None = Field(None, description="The final take promoted from this draft.")
    eta_seconds: float | None = Field(
        None,
        description="While it runs: seconds until it is predicted to complete, re-predicted after each "
        "denoising step from the step times measured for its size and tier; null otherwise.",
    )
    cache: StepCache | None = Field(None, description="Its step caching; null: every step runs.")
    num_frames: int = Field(description="Frames of the delivered clip (at `fps`).")
    fps: int = Field(description="Frame rate of the delivered clip.")
    upscale: str
    look: str
    labels: dict[str, LabelValue]
    storyboard_id: str | None = None
    take: int | None = Field(
        None,
        description="Its take number within its board's shot: 1, 2, ... in creation order (a promoted "
        "final is a new take); null for a video of no board. The page, the CLI's file names, the slates "
        "and the timelines use it.",
    )
    review: ReviewStatus = Field(
        "pending",
        description="The take's review status (PUT /v1/videos/{id}/review): pending, approved, rejected or "
        "needs-changes.",
    )
    review_by: str | None = Field(None, description="Who set the review status last (the API key's name).")
    reviewed_at: int | None = Field(None, description="Unix seconds of the last review status change.")
    callback_url: str | None = None
    attempt: int = Field(description="How many times the job was started (restarts re-run it).")
    started_at: int | None = Field(None, description="Unix seconds of the first start.")
    timings: dict[str, float] = Field(description="Stage -> compute seconds.")
    content_url: str | None = Field(None, description="The mp4, once completed.")
    thumbnail_url: str | None = Field(None, description="A JPEG poster frame, once completed.")
    events_url: str = Field(description="Server-sent events of its stage and step progress.")


class VideoList(BaseModel):
    """One page of videos; pass `last_id` as `after` for the next."""

    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoLinks(BaseModel):
    """Signed, expiring links to a completed video's mp4 and poster frame (no API key needed)."""

    id: str
    object: Literal["video.links"] = "video.links"
    video: str = Field(description="The mp4: S3 presigned, or this server's `/v1/artifacts/…` link.")
    thumbnail: str | None = Field(description="The JPEG poster frame; null when the video has none.")
    expires_at: int = Field(description="Unix seconds after which the links are refused.")


class VideoKeyframes(BaseModel):
    """Signed, expiring links to the keyframe images a video starts (and ends) from, as stored: fitted to
    the video's size. Null where it has none, or while a chained shot's take still waits for its frame."""

    id: str
    object: Literal["video.keyframes"] = "video.keyframes"
    first: str | None = Field(description="The first frame's PNG.")
    last: str | None = Field(description="The last frame's PNG (experimental first-and-last shots).")
    first_from: str | None = Field(
        description="The take whose last frame is the first keyframe (a `file_id`, `{video}` or `continue`)."
    )
    expires_at: int = Field(description="Unix seconds after which the links are refused.")


class VideoDeleted(BaseModel):
    """`DELETE /v1/videos/{id}`: a queued or running video is cancelled (`status: cancelled`, the record
    stays); a finished one is deleted (its clip, poster and checkpoint removed, a cut holding it marked
    stale with its files removed, the video 404 from then on)."""

    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True
    status: VideoState = Field("cancelled", description="The video's state when it was deleted or cancelled.")


class WebhookAttempt(BaseModel):
    """One HTTP attempt of a webhook delivery."""

    at: float = Field(description="Unix seconds (millisecond precision) when the attempt ended.")
    status_code: int | None = Field(description="The receiver's HTTP status; null if none was received.")
    error: str | None = Field(description="Why the attempt failed; null when it succeeded.")
    seconds: float = Field(description="How long the attempt took.")


class WebhookDeliveryInfo(BaseModel):
    """One webhook of a video (the POST to its `callback_url`) and its attempts so far."""

    id: str = Field(description="Delivery id (`whd_…`): the payload's `id` and the Previz-Delivery header.")
    object: Literal["webhook_delivery"] = "webhook_delivery"
    event: WebhookEvent = Field(
        description="What it announces: an outcome, or a change of the take's review."
    )
    url: str = Field(description="Where it is sent.")
    status: Literal["pending", "delivered", "failed"] = Field(
        description="`pending` while attempts remain, `delivered` after a 2xx, `failed` after the last one."
    )
    attempts: int = Field(description="HTTP attempts made so far.")
    next_attempt_at: int | None = Field(description="Unix seconds of the next attempt while pending.")
    delivered_at: int | None = Field(description="Unix seconds of the 2xx answer.")
    created_at: int = Field(description="Unix seconds when the video finished and the webhook was queued.")
    log: list[WebhookAttempt] = Field(description="Every attempt, oldest first.")


class WebhookDeliveryList(BaseModel):
    """A video's webhook deliveries, oldest first."""

    object: Literal["list"] = "list"
    data: list[WebhookDeliveryInfo]


class UnmatchedClip(BaseModel):
    """A clip of an edited timeline that cannot be applied to its board, and why."""

    position: int = Field(
        description="Its place among the clips of the timeline's first video track, from 1."
    )
    name: str = Field(description="The clip's name in the timeline (an editor may have changed it).")
    video_id: str | None = Field(description="The Previz take id the clip carries; null: none.")
    reason: Literal["no_take_id", "not_this_board", "shot_used_twice", "empty", "slate_only", "no_clips"] = (
        Field(
            description="`no_take_id`: it carries no Previz take id (not exported by Previz); "
            "`not_this_board`: its take is no live take of this board; `shot_used_twice`: an earlier clip "
            "already uses its shot; `empty`: it has no frames; `slate_only`: it is trimmed to its slate; "
            "`no_clips`: the timeline has no clips at all (`position` 0)."
        )
    )
    message: str = Field(description="The reason, for a person.")


class ErrorBody(BaseModel):
    code: str = Field(description="Machine-readable error code.")
    message: str = Field(description="What went wrong, for a person.")
    param: str | None = Field(None, description="The request field at fault, if one is.")
    category: str | None = Field(
        None, description="With `content_blocked` only: the content-policy category, e.g. `hate`."
    )
    clips: list[UnmatchedClip] | None = Field(
        None,
        description="With `unmatched_clips` and `foreign_timeline` only (`PUT /v1/storyboards/{id}/timeline`"
        "): every clip of the timeline that cannot be applied, in timeline order.",
    )


class ErrorResponse(BaseModel):
    """The one error shape of every non-2xx answer."""

    error: ErrorBody
