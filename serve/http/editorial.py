"""HTTP schemas of a storyboard's edit: the selected takes and shot order, the cut, its timeline."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StringConstraints, field_validator

from serve.http.schemas import VideoError
from serve.http.storyboards import MAX_SHOTS
from serve.jobs.models import ApiState
from serve.jobs.request import FrameRate
from serve.numbers import whole_number

ShotKey = Annotated[str, StringConstraints(pattern=r"^(?:0|[1-9][0-9]{0,2})$")]  # a shot index as text
VideoId = Annotated[str, StringConstraints(min_length=1, max_length=64)]
CUT_SIZES = {"480p": 480, "720p": 720, "1080p": 1080}  # size -> short side


class StoryboardUpdate(BaseModel):
    """The editor's choices; fields left out keep their value."""

    model_config = ConfigDict(extra="forbid")

    order: list[whole_number(ge=0, lt=MAX_SHOTS)] | None = Field(
        None,
        min_length=1,
        max_length=MAX_SHOTS,
        json_schema_extra={"uniqueItems": True},
        description="Shot indices in cut order (each once; shots left out are left out of the cut); "
        "null: the board's own order.",
    )
    takes: dict[ShotKey, VideoId | None] = Field(
        default_factory=dict,
        max_length=MAX_SHOTS,
        json_schema_extra={"additionalProperties": False},  # keys are shot indices, nothing else
        description='Shot index -> the video that is its selected take ({"0": "vid_…"}); null clears '
        "the choice (the cut then uses the shot's first completed take).",
    )

    trims: dict[ShotKey, None] = Field(
        default_factory=dict,
        max_length=MAX_SHOTS,
        json_schema_extra={"additionalProperties": False},
        description='Shot index -> null clears its trim ({"2": null}): the cut then uses the whole take '
        "(trims are set by PUT /v1/storyboards/{id}/timeline).",
    )

    @field_validator("order")
    @classmethod
    def _each_shot_once(cls, order: list[int] | None) -> list[int] | None:
        if order is not None and len(set(order)) != len(order):
            raise ValueError(f"`order` must name each shot once but is {order}.")
        return order


class CutCreate(BaseModel):
    """How to assemble the cut."""

    model_config = ConfigDict(extra="forbid")

    fps: FrameRate | None = Field(
        None, description="The cut's rate; default: the board's `fps`, the project's `default_fps`, else 24."
    )
    size: Literal["480p", "720p", "1080p"] | None = Field(
        None, description="Short side of the cut (the first take's aspect); default: the first take's size."
    )
    slates: StrictBool = Field(
        False, description="A slate (shot name, take, 'AI-generated draft') before each shot."
    )
    slate_seconds: Annotated[StrictFloat, Field(ge=0.5, le=5.0)] | whole_number(
        ge=1, le=5
    ) = Field(1.0, description="How long each slate stays on screen.")


class CutClipView(BaseModel):
    shot: int = Field(description="Index of the shot in the board's `shots`.")
    name: str = Field(description="The shot's name (or `shot N`).")
    video_id: str = Field(description="The take used.")
    take: int = Field(description="Its take number within the shot (1, 2, ... in creation order).")
    start_frame: int = Field(description="Where it starts in the cut, in frames at the cut's rate.")
    num_frames: int = Field(description="Its length in the cut, slate included.")
    slate_frames: int
    content_start: int = Field(
        0, description="Where its content starts in the take (at the cut's rate): its head trim."
    )
    trimmed: bool = Field(
        False, description="Whether the board's edit trims the shot (a timeline read back)."
    )
    content_url: str = Field(description="A signed link to the shot's conformed clip (slate included).")


class CutState(BaseModel):
    """Where a cut job is; `completed` once its files are stored and it is the board's cut."""

    status: ApiState = Field(description="queued | in_progress | completed | failed | cancelled.")
    progress: int = Field(ge=0, le=100, description="Percent of the cut's shots rendered and stored.")
    eta_seconds: float | None = Field(
        None, description="While rendering: seconds until it is predicted done (from its shots so far)."
    )
    error: VideoError | None = Field(None, description="Why it failed (`status` failed).")


class Cut(CutState):
    """A storyboard's cut: a job of the Scheduler while it renders (status, progress, ETA), then the rendered
    cut (its mp4, clips and timeline)."""

    id: str
    object: Literal["storyboard.cut"] = "storyboard.cut"
    storyboard_id: str
    fps: int
    size: str | None = Field(description="`WxH` of every frame (null until rendered: the first take's).")
    num_frames: int | None = Field(description="Null until rendered.")
    seconds: float | None = Field(description="Null until rendered.")
    slates: bool
    num_clips: int = Field(description="Shots in the cut.")
    created_at: int = Field(description="Unix seconds.")
    content_url: str | None = Field(description="A signed link to the cut's mp4, once completed.")
    timeline_url: str | None = Field(
        description="Its timeline (`?format=otio|edl|fcpxml`, `&package=true`), once completed."
    )
    events_url: str = Field(
        description="Server-sent events of the board's cut: `status` changes, then `done`."
    )
    clips: list[CutClipView] = Field(description="Its shots, once completed (empty before).")


class CutCancelled(BaseModel):
    """`POST /v1/storyboards/{id}/cut/cancel`: the cut stopped; the board keeps its earlier cut, if any."""

    id: str = Field(description="The cancelled cut.")
    object: Literal["storyboard.cut"] = "storyboard.cut"
    storyboard_id: str
    status: Literal["cancelled"] = "cancelled"


class CutDeleted(BaseModel):
    """`DELETE /v1/storyboards/{id}/cut`: the cut's mp4 and clips are gone; the takes stay."""

    id: str = Field(description="The deleted cut.")
    object: Literal["storyboard.cut.deleted"] = "storyboard.cut.deleted"
    storyboard_id: str
    deleted: bool = True


class ShotTrimView(BaseModel):
    fps: int = Field(description="The rate it counts at.")
    start: int = Field(description="First frame of the take used (slate excluded).")
    num_frames: int


class TimelineApplied(BaseModel):
    """What an edited timeline changed on its board."""

    storyboard_id: str
    format: Literal["otio", "edl", "fcpxml", "aaf"]
    rate: int = Field(description="The rate the timeline's clips counted at.")
    order: list[int] = Field(description="The board's shot order now (the timeline's clips, in order).")
    takes: dict[str, str] = Field(description="Shot index -> its selected take now.")
    trims: dict[str, ShotTrimView] = Field(description="Shot index -> its trim now (untrimmed shots absent).")
    dropped: list[int] = Field(description="Shots of the board's previous order that the timeline left out.")
    num_frames: int = Field(description="The timeline's length in frames at `rate`: the next cut's at it.")
