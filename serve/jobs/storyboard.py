"""StoryboardRecord and what it holds, typed: the board's request, the editor's choices, its last cut.

Each stored part names its `format`, and `from_stored` reads rows of every earlier format, as
`JobRequest.from_stored` does for jobs:
- `request` format 1 was the validated create body as an untyped dict, with `body_sha256` added; it is
  upgraded on read (its shots' names and prompts, the board's rate and title, the body kept as sent).
- `edit` format 1 is `{"order", "takes"}`; rows written before it had a `format` read as format 1.
- `cut` format 1 is CutRecord, which always carried its format.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

STORYBOARD_REQUEST_FORMAT = 2  # 1: the create body as an untyped dict (upgraded on read)


class BoardShot(BaseModel):
    """What the board says of one shot (its videos' own requests hold the rest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, description="The shot's name on the board, e.g. `12A`.")
    prompt: str | None = Field(None, description="Its prompt as sent (None: a structured shot only).")
    continues: int | None = Field(None, description="The earlier shot it continues (`continue`), by index.")


class StoryboardRequest(BaseModel):
    """What a storyboard was created with (the `request` JSON column)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[2] = STORYBOARD_REQUEST_FORMAT
    title: str | None = None
    shots: list[BoardShot] = Field(description="The board's shots, in board order.")
    fps: int | None = Field(None, description="The board's frame rate (of shots naming none, and the cut).")
    body_sha256: str | None = Field(None, description="Fingerprint of the body, to tell replays apart.")
    body: dict[str, Any] = Field(
        default_factory=dict, description="The validated create body as JSON, kept as sent (read by no key)."
    )

    def shot_name(self, shot: int) -> str:
        """The shot's name, or `shot N` (1-based) when it has none."""
        return self.shots[shot].name or f"shot {shot + 1}"

    def to_stored(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> StoryboardRequest:
        """The request of a stored row, whatever format wrote it."""
        if data.get("format") == STORYBOARD_REQUEST_FORMAT:
            return cls.model_validate(data)
        # format 1: {"title", "shots": [{"name", "prompt", ...}], "fps", ..., "body_sha256"}
        body = {key: value for key, value in data.items() if key != "body_sha256"}
        return cls(
            title=data.get("title"),
            shots=[BoardShot(name=shot.get("name"), prompt=shot.get("prompt")) for shot in data["shots"]],
            fps=data.get("fps"),
            body_sha256=data.get("body_sha256"),
            body=body,
        )


class ShotTrim(BaseModel):
    """The part of a shot's take the cut uses: `num_frames` from `start`, counted at `fps` from the take's
    first frame (slate excluded). The cut converts it to its own rate and keeps it inside the take."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fps: int = Field(gt=0, description="The rate the trim counts at (the edited timeline's).")
    start: int = Field(ge=0, description="First frame of the take used.")
    num_frames: int = Field(gt=0, description="How many frames from there.")

    def at(self, fps: int) -> tuple[int, int]:
        """(start, num_frames) at `fps`, rounded as the cut's conform rounds; at least one frame."""
        if fps == self.fps:
            return self.start, self.num_frames
        return round(self.start * fps / self.fps), max(1, round(self.num_frames * fps / self.fps))


class StoryboardEdit(BaseModel):
    """The editor's choices on a board (the `edit` column)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1
    order: list[int] | None = Field(None, description="Shot indices in cut order; None: the board's order.")
    takes: dict[str, str] = Field(default_factory=dict, description="Shot index -> its selected video.")
    # Shot index -> the part of its take the cut uses (an edited timeline read back sets them); rows
    # written before trims existed have none.
    trims: dict[str, ShotTrim] = Field(default_factory=dict, description="Shot index -> its trim.")


class CutClip(BaseModel):
    """One shot of a cut."""

    shot: int  # index in the board's shots
    name: str  # the shot's name on the board, or "shot N" (1-based) without one
    video_id: str  # the take
    take: int  # the take's number within its shot (serve.jobs.takes), as editors count takes
    key: str  # its conformed clip (slate included) in the artifact store
    start_frame: int  # where it starts in the cut
    num_frames: int  # its length in the cut, slate included
    slate_frames: int  # of which the slate
    # Where its content starts in the take conformed to the cut's rate (a head trim), and whether the edit
    # trimmed it (StoryboardEdit.trims): a timeline read back counts its trims from here.
    content_start: int = 0
    trimmed: bool = False


class CutRecord(BaseModel):
    """A rendered cut (the `cut` column): its mp4 and what is in it, at its rate."""

    format: Literal[1] = 1
    id: str  # "cut_" + 16 hex; a new one per render
    key: str  # the assembled mp4 in the artifact store
    fps: int
    width: int
    height: int
    num_frames: int  # the sum of its clips' frames
    slates: bool
    created_at: float  # Unix seconds
    clips: list[CutClip]
    # Why the cut is no longer served (a take in it was deleted; its files are deleted with it); None while
    # it is the board's current cut. A stale cut is rendered again by POST /v1/storyboards/{id}/cut.
    stale: str | None = None

    @property
    def keys(self) -> list[str]:
        """Every file of the cut: the assembled mp4 and each shot's clip."""
        return [self.key, *(clip.key for clip in self.clips)]


@dataclass(frozen=True, slots=True)
class StoryboardRecord:
    """One storyboard as stored: what was asked for; its videos are the jobs with its `storyboard_id`."""

    id: str  # "sb_" + 24 hex; sorts by creation time
    project: str
    title: str | None
    request: StoryboardRequest  # typed; rows of earlier formats are upgraded on read
    num_jobs: int  # videos created with it
    idempotency_key: str | None  # unique per project when set
    created_at: datetime
    edit: StoryboardEdit | None = None  # selected takes and shot order; None: never edited
    cut: CutRecord | None = None  # the last cut rendered; None: none (or deleted)

    @property
    def shot_order(self) -> list[int]:
        """Shot indices in cut order: the edit's, else the board's."""
        if self.edit is not None and self.edit.order is not None:
            return list(self.edit.order)
        return list(range(len(self.request.shots)))

    @property
    def served_cut(self) -> CutRecord | None:
        """The cut the API serves: none while stale (a take of it was deleted) until rendered again."""
        return self.cut if self.cut is not None and self.cut.stale is None else None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> StoryboardRecord:
        """The record of a `storyboards` row, whatever formats its JSON columns hold."""
        edit, cut = row.get("edit"), row.get("cut")
        return cls(
            id=row["id"],
            project=row["project"],
            title=row["title"],
            request=StoryboardRequest.from_stored(row["request"]),
            num_jobs=row["num_jobs"],
            idempotency_key=row["idempotency_key"],
            created_at=row["created_at"],
            edit=None if edit is None else StoryboardEdit.model_validate(edit),
            cut=None if cut is None else CutRecord.model_validate(cut),
        )
