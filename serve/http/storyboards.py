"""Storyboards: many shots, each in several variants (seeds, a small grid over shot fields), as one request.

    {"project": "dune", "title": "act 1",
     "shots": [{"name": "1A", "shot": {"character": "a fremen", "action": "runs"}}, ...],
     "variants": {"seeds": 2,
                  "grid": {"camera": ["dolly-in", "crane up", "handheld"], "look": ["none", "film"]}}}

`expand()` turns it into one planned video per shot × seed × grid point (plain data, no store); the
Ingress creates them all in one transaction under one storyboard id, so the Scheduler sees them as one
project's jobs (one fair share) and a queue bound refuses all of them or none.
"""

from __future__ import annotations

import itertools
import re
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from pipeline.grade import LOOK_PATTERN
from pipeline.prompt import MAX_FIELD_CHARS, ShotSpec
from pipeline.spec import MAX_SEED, Quality
from serve.http.schemas import (
    MAX_LABELS,
    SERVED_MODEL,
    DurationValue,
    GenerationSettings,
    LabelKey,
    LabelValue,
    Project,
    SecondsValue,
    SizeText,
    StepCache,
    Upscale,
    Video,
    VideoState,
)
from serve.jobs.models import Priority
from serve.jobs.request import FrameRate
from serve.jobs.reviews import ReviewStatus
from serve.jobs.storyboard import ShotTrim
from serve.numbers import WholeNumber

MAX_SHOTS = 100
MAX_SEEDS = 16
MAX_GRID_VALUES = 8
MAX_STORYBOARD_VIDEOS = 200
SHOT_FIELDS = ("character", "action", "environment", "camera", "style")
GridField = Literal["character", "action", "environment", "camera", "style", "look"]


class StoryboardShot(GenerationSettings):
    """One shot of a storyboard: the settings of a video, plus a name."""

    name: str | None = Field(None, max_length=64, description="The shot's name on the board, e.g. `12A`.")
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, max_length=MAX_LABELS, description="Labels of this shot's videos."
    )
    continues: str | None = Field(
        None,
        alias="continue",
        min_length=1,
        max_length=64,
        description="`previous`, or the name of an earlier shot: this shot's takes wait for that shot's "
        "selected take (or its first completed one while none is selected) and start from its last "
        "decoded frame, on the I2V model; a cut drops the repeated frame where they join.",
    )


class VariantPlan(BaseModel):
    """Which variants of every shot to generate: seeds × the grid's combinations."""

    model_config = ConfigDict(extra="forbid")

    seeds: WholeNumber | list[WholeNumber] = Field(
        1,
        json_schema_extra={
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_SEEDS},
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_SEEDS,
                    "items": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
                },
            ]
        },
        description=f"How many seeds per shot (1–{MAX_SEEDS}: the shot's `seed`, then +1, +2 …; random "
        "when it has none), or the exact seeds.",
    )
    grid: dict[GridField, list[str]] = Field(
        default_factory=dict,
        json_schema_extra={
            "type": "object",
            "propertyNames": {"enum": list(GridField.__args__)},
            "additionalProperties": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_GRID_VALUES,
                "items": {"type": "string", "pattern": r"\S", "maxLength": MAX_FIELD_CHARS},
            },
            "properties": {
                "look": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_GRID_VALUES,
                    "items": {"type": "string", "pattern": LOOK_PATTERN},
                }
            },
        },
        description="Shot fields (or `look`) to vary, each over a few values: every combination is a "
        'variant, e.g. {"camera": ["dolly-in", "crane up", "handheld"], "look": ["none", "film"]}.',
    )

    @model_validator(mode="after")
    def _check(self) -> VariantPlan:
        if isinstance(self.seeds, int) and not 1 <= self.seeds <= MAX_SEEDS:
            raise ValueError(f"`seeds` must be between 1 and {MAX_SEEDS} but is {self.seeds}.")
        if isinstance(self.seeds, list):
            if not 1 <= len(self.seeds) <= MAX_SEEDS:
                raise ValueError(f"`seeds` must list 1 to {MAX_SEEDS} seeds but lists {len(self.seeds)}.")
            if any(not 0 <= seed <= MAX_SEED for seed in self.seeds):
                raise ValueError(f"every seed in `seeds` must be between 0 and {MAX_SEED}.")
        for field, values in self.grid.items():
            too_long = any(not value.strip() or len(value) > MAX_FIELD_CHARS for value in values)
            if not 1 <= len(values) <= MAX_GRID_VALUES or too_long:
                raise ValueError(
                    f"`grid.{field}` must list 1 to {MAX_GRID_VALUES} non-empty values "
                    f"(each ≤ {MAX_FIELD_CHARS} characters)."
                )
        if "look" in self.grid and not all(re.match(LOOK_PATTERN, look) for look in self.grid["look"]):
            raise ValueError(
                f"`grid.look` values must be look names (none, film or a project's LUT) but are "
                f"{self.grid['look']}."
            )
        return self

    @property
    def num_variants(self) -> int:
        num_seeds = self.seeds if isinstance(self.seeds, int) else len(self.seeds)
        combinations = 1
        for values in self.grid.values():
            combinations *= len(values)
        return num_seeds * combinations


# settings a board may give once for all its shots (a shot that gives its own keeps it)
BOARD_DEFAULTS = ("negative_prompt", "seconds", "duration", "size", "resolution", "aspect", "steps")
BOARD_DEFAULTS += ("upscale", "look", "label")
# fields that say one thing together: a shot that gives any of a group keeps none of the board's group
BOARD_DEFAULT_GROUPS = (("seconds", "duration"), ("size", "resolution", "aspect"))


def _board_default_field(name: str) -> Any:
    shared = GenerationSettings.model_fields[name]
    return Field(
        None,
        json_schema_extra={
            "description": f"{shared.description} The default of every shot; a shot's own wins."
        },
        **({"pattern": LOOK_PATTERN} if name == "look" else {}),
    )


class StoryboardCreate(BaseModel):
    """Shots and a variant plan: every shot × variant becomes a video, all created at once. Settings
    given at the board's level (`size`, `seconds`, `steps`, `look` …) are the default of every shot."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(SERVED_MODEL, description="The served model (as for videos).")
    project: Project | None = Field(
        None, description="Project of every video: the API key's (naming another one is 403)."
    )
    title: str | None = Field(None, max_length=200, description="A name for people.")
    priority: Priority = Field("batch", description="Priority of every video.")
    quality: Quality | None = Field(
        None, description="Tier of every shot that names none (default as for videos: by priority)."
    )
    shots: list[StoryboardShot] = Field(
        min_length=1, max_length=MAX_SHOTS, description="The shots, in order."
    )
    variants: VariantPlan = Field(default_factory=VariantPlan, description="Variants of every shot.")
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, max_length=MAX_LABELS, description="Labels of every video (shots add theirs)."
    )
    callback_url: AnyHttpUrl | None = Field(None, description="Recorded with every video of the board.")
    fps: FrameRate | None = Field(
        None,
        description="Frame rate of every shot that names none (and of the cut); default: the project's "
        "`default_fps`, else 16.",
    )

    negative_prompt: str | None = _board_default_field("negative_prompt")
    seconds: SecondsValue | None = _board_default_field("seconds")
    duration: DurationValue | None = _board_default_field("duration")
    size: SizeText | None = _board_default_field("size")
    resolution: str | None = _board_default_field("resolution")
    aspect: Literal["16:9", "9:16"] | None = _board_default_field("aspect")
    steps: WholeNumber | None = _board_default_field("steps")
    upscale: Upscale | None = _board_default_field("upscale")
    look: str | None = _board_default_field("look")
    label: StrictBool | None = _board_default_field("label")

    @model_validator(mode="before")
    @classmethod
    def _shots_take_the_board_defaults(cls, data: Any) -> Any:
        """Each shot (a mapping, as sent) gets the board-level settings it does not give itself; the shots
        are then checked as if they had said them."""
        if not isinstance(data, dict) or not isinstance(data.get("shots"), list):
            return data
        defaults = {name: data[name] for name in BOARD_DEFAULTS if data.get(name) is not None}
        if not defaults:
            return data
        return {**data, "shots": [_with_defaults(shot, defaults) for shot in data["shots"]]}

    @property
    def num_videos(self) -> int:
        return len(self.shots) * self.variants.num_variants


def _with_defaults(shot: Any, defaults: dict[str, Any]) -> Any:
    if not isinstance(shot, dict):
        return shot
    taken = dict(defaults)
    for group in BOARD_DEFAULT_GROUPS:
        if any(shot.get(name) is not None for name in group):
            for name in group:
                taken.pop(name, None)
    return {
        **taken,
        **{name: value for name, value in shot.items() if value is not None or name not in taken},
    }


@dataclass(frozen=True, slots=True)
class PlannedVideo:
    """One video of a storyboard before it is a job."""

    shot_index: int  # position of its shot in `shots`
    variant_index: int  # position among the shot's variants
    settings: GenerationSettings  # the shot's settings with this variant's seed and grid values applied
    grid: dict[str, str]  # grid field -> value of this variant


def expand(board: StoryboardCreate) -> list[PlannedVideo]:
    """Every shot × seed × grid combination, shot by shot, in a stable order.

    Raises ValueError (naming the shot) when a grid value makes a shot invalid."""
    grid_fields = list(board.variants.grid)
    combinations = list(itertools.product(*(board.variants.grid[field] for field in grid_fields)))
    planned = []
    for shot_index, shot in enumerate(board.shots):
        seeds = board.variants.seeds
        if isinstance(seeds, int):
            base = shot.seed if shot.seed is not None else secrets.randbelow(2**31)
            seeds = [min(base + offset, MAX_SEED) for offset in range(seeds)]
        variant_index = 0
        for combination in combinations:
            grid = dict(zip(grid_fields, combination, strict=True))
            update: dict[str, Any] = {}
            shot_fields = {field: value for field, value in grid.items() if field in SHOT_FIELDS}
            if shot_fields:
                base_shot = shot.shot.model_dump(exclude_none=True) if shot.shot is not None else {}
                update["shot"] = ShotSpec.model_validate({**base_shot, **shot_fields})
            if "look" in grid:
                update["look"] = grid["look"]
            if shot.fps is None and board.fps is not None:
                update["fps"] = board.fps
            fields = shot.model_dump(include=set(GenerationSettings.model_fields))
            if "cache" not in shot.model_fields_set:
                del fields["cache"]  # not named: the tier's default (named null: every step runs)
            for seed in seeds:
                settings = GenerationSettings.model_validate({**fields, **update, "seed": seed})
                planned.append(PlannedVideo(shot_index, variant_index, settings, grid))
                variant_index += 1
    return planned


class StoryboardVideo(BaseModel):
    """One variant of one shot."""

    video_id: str
    variant: int = Field(description="Index among the shot's variants.")
    take: int = Field(
        description="Its take number within the shot, 1, 2, ... in creation order (a promoted final is a "
        "new take); the same number as in the slates, the timelines and the CLI's file names."
    )
    seed: int
    grid: dict[str, str] = Field(description="Grid field -> value of this variant.")
    status: VideoState
    stage: str
    progress: int
    waiting_for: str | None = Field(
        None, description="While in progress but waiting in a stage's queue: that stage (as on the video)."
    )
    queue_position: int | None = Field(
        None,
        description="How many videos are ahead of it while it waits: in the job queue (status queued) or in "
        "the replica of the stage it is `waiting_for`; null once it runs.",
    )
    eta_seconds: float | None = Field(
        None,
        description="Seconds until it is predicted to complete, its wait included (as on the video); null "
        "when finished or not predicted yet.",
    )
    url: str = Field(description="The video object.")
    content_url: str | None = Field(None, description="The mp4, once completed.")
    thumbnail_url: str | None = Field(None, description="A JPEG poster frame, once completed.")
    error: dict[str, Any] | None = None
    quality: Quality = Field(description="`draft` or `final`.")
    promoted_to: str | None = Field(None, description="The final take promoted from this draft.")
    promoted_from: str | None = Field(None, description="The draft this final take was promoted from.")
    promoted_from_take: int | None = Field(
        None, description="That draft's take number (`1A take 3 · final from take 2`)."
    )
    review: ReviewStatus = Field("pending", description="The take's review status.")
    review_by: str | None = Field(None, description="Who set it last (the API key's name).")
    keyframe: Literal["image", "take", "continue"] | None = Field(
        None,
        description="Where its first frame comes from: a panel `image`, a `take`'s last frame, or the shot "
        "it `continue`s; null: text only. Links: `GET /v1/videos/{id}/keyframes`.",
    )


class StoryboardPromote(BaseModel):
    """Chosen takes of a board to promote to their final takes, all in one transaction."""

    model_config = ConfigDict(extra="forbid")

    video_ids: list[str] = Field(
        min_length=1,
        max_length=MAX_STORYBOARD_VIDEOS,
        json_schema_extra={"uniqueItems": True},
        description="Draft videos of this board, each named once.",
    )
    upscale: Upscale | None = Field(None, description="Default: each draft's.")
    look: str | None = Field(
        None, pattern=LOOK_PATTERN, description="`none`, `film` or a project LUT; default: each draft's."
    )
    priority: Priority | None = Field(None, description="Default: `batch`.")
    cache: StepCache | None = Field(
        None,
        description="Step caching of the final takes; omitted: the final tier's default; `null`: every step "
        "runs.",
    )

    @field_validator("video_ids")
    @classmethod
    def _distinct(cls, video_ids: list[str]) -> list[str]:
        if len(set(video_ids)) != len(video_ids):
            raise ValueError("`video_ids` must name each video once.")
        return video_ids


class PromotedTakes(BaseModel):
    """The final takes a storyboard promote created, in the order of `video_ids`."""

    object: Literal["list"] = "list"
    data: list[Video]


class StoryboardShotState(BaseModel):
    index: int
    name: str | None
    prompt: str
    videos: list[StoryboardVideo]
    selected_video_id: str | None = Field(
        None, description="The take the editor selected (PATCH); null: the cut uses the first completed one."
    )
    continues: int | None = Field(
        None,
        description="The index of the shot this one continues (`continue`): its takes start from that "
        "shot's take's last frame; null: a shot of its own.",
    )
    trim: ShotTrim | None = Field(
        None, description="The part of its take the cut uses (an edited timeline read back); null: all of it."
    )


class Storyboard(BaseModel):
    """A storyboard and the state of every shot's videos."""

    id: str
    object: Literal["storyboard"] = "storyboard"
    project: str
    title: str | None
    created_at: int = Field(description="Unix seconds.")
    status: Literal["queued", "in_progress", "completed", "failed"] = Field(
        description="completed once every video is; failed once all are finished and some failed or "
        "were cancelled; queued while none started."
    )
    progress: int = Field(description="Mean progress of its videos, 0–100.")
    num_videos: int
    counts: dict[str, int] = Field(description="Video status -> number of videos.")
    shots: list[StoryboardShotState]
    order: list[int] = Field(description="Shot indices in cut order (PATCH sets it; default the board's).")
    cut_url: str | None = Field(
        None,
        description="The board's cut: once one is rendered, or while one is queued or rendering; null "
        "again once a take of the rendered cut was deleted (the cut is then stale, its files gone) or the "
        "cut was deleted.",
    )


def board_status(states: list[str]) -> Literal["queued", "in_progress", "completed", "failed"]:
    """The storyboard's status from its videos' statuses."""
    if all(state == "completed" for state in states):
        return "completed"
    if all(state in ("completed", "failed", "cancelled") for state in states):
        return "failed"
    if all(state == "queued" for state in states):
        return "queued"
    return "in_progress"


class StoryboardList(BaseModel):
    """One page of the project's storyboards, newest first; pass `last_id` as `after` for the next."""

    object: Literal["list"] = "list"
    data: list[Storyboard]
    first_id: str | None
    last_id: str | None
    has_more: bool


class StoryboardDeleted(BaseModel):
    """`DELETE /v1/storyboards/{id}`: the board and its cut are gone; its videos too with `delete_videos`."""

    id: str
    object: Literal["storyboard.deleted"] = "storyboard.deleted"
    deleted: bool = True
    deleted_videos: list[str] = Field(
        description="The videos deleted with it (running ones were cancelled first); empty when they were "
        "kept as videos of no board."
    )
