"""HTTP schemas of a take's review: notes with an optional frame, and its review status."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from serve.jobs.reviews import ReviewStatus
from serve.numbers import whole_number

MAX_NOTE_CHARS = 4000
NoteText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_NOTE_CHARS)]


class NoteCreate(BaseModel):
    """A note on a take."""

    model_config = ConfigDict(extra="forbid")

    text: NoteText = Field(description="What the reviewer says.")
    frame: whole_number(ge=0) | None = Field(
        None,
        description="The frame it is about, 0-based at the take's own delivered rate (its `fps`; below its "
        "`num_frames`); null: the take as a whole.",
    )


class Note(BaseModel):
    """A note on a take, with who wrote it and when."""

    id: str
    object: Literal["video.note"] = "video.note"
    video_id: str
    author: str = Field(description="The name of the API key that wrote it (its id when it has none).")
    text: str
    frame: int | None = Field(description="At the take's own rate; null: the take as a whole.")
    seconds: float | None = Field(description="`frame` in seconds from the take's start.")
    created_at: int = Field(description="Unix seconds.")


class NoteList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Note] = Field(description="Oldest first.")


class ReviewUpdate(BaseModel):
    """A take's new review status."""

    model_config = ConfigDict(extra="forbid")

    status: ReviewStatus = Field(description="pending, approved, rejected or needs-changes.")


class Review(BaseModel):
    """A take's review status."""

    object: Literal["video.review"] = "video.review"
    video_id: str
    status: ReviewStatus
    review_by: str | None = Field(description="Who set it last (null: never set).")
    reviewed_at: int | None = Field(description="Unix seconds of the last change.")
    changed: bool = Field(description="Whether this request changed it (a webhook fires on a change).")
