"""A storyboard's first cut: its selected takes in shot order, conformed to one frame rate and size, with
optional slates, written as one mp4 plus one mp4 per shot (what the timeline's clips point at).

Which take a shot uses: the one the editor selected (`StoryboardEdit.takes`), else the shot's first
completed variant. Which shots, in which order: `StoryboardEdit.order`, else every shot as on the board.
Rendering is CPU work on finished clips (decode, resize, interpolate, encode); the Ingress runs it in a
worker thread, never on its event loop (serve/http/routes/storyboards.py says why not a job).
"""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.interpolate import Interpolator, conform
from pipeline.slate import slate_frames
from pipeline.upscale import resize_frames
from pipeline.video import VideoWriter, read_frames
from serve.jobs import JobRecord, JobStatus, StoryboardRecord
from serve.storage import ArtifactStore, CutArtifacts


class StoryboardEdit(BaseModel):
    """The editor's choices on a board (the `edit` column)."""

    model_config = ConfigDict(extra="forbid")

    order: list[int] | None = Field(None, description="Shot indices in cut order; None: the board's order.")
    takes: dict[str, str] = Field(default_factory=dict, description="Shot index -> its selected video.")


class CutClip(BaseModel):
    """One shot of a cut."""

    shot: int  # index in the board's shots
    name: str  # the shot's name on the board, or "shot N" (1-based) without one
    video_id: str  # the take
    take: int  # the take's variant, 1-based, as editors count takes
    key: str  # its conformed clip (slate included) in the artifact store
    start_frame: int  # where it starts in the cut
    num_frames: int  # its length in the cut, slate included
    slate_frames: int  # of which the slate


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


class CutNotReady(Exception):
    """A shot of the cut has no completed take to use (HTTP 409)."""


@dataclass(frozen=True, slots=True)
class TakeChoice:
    shot: int
    name: str
    job: JobRecord


def shot_name(record: StoryboardRecord, shot: int) -> str:
    return record.request["shots"][shot].get("name") or f"shot {shot + 1}"


def choose_takes(record: StoryboardRecord, jobs: list[JobRecord]) -> list[TakeChoice]:
    """The take of every shot of the cut, in cut order; CutNotReady names a shot without one."""
    edit = StoryboardEdit.model_validate(record.edit or {})
    order = edit.order if edit.order is not None else list(range(len(record.request["shots"])))
    by_shot: dict[int, list[JobRecord]] = {}
    for job in jobs:
        if job.request.storyboard is not None:
            by_shot.setdefault(job.request.storyboard.shot, []).append(job)
    choices = []
    for shot in order:
        takes = sorted(by_shot.get(shot, []), key=lambda job: job.request.storyboard.variant)
        selected = edit.takes.get(str(shot))
        if selected is not None:
            takes = [job for job in takes if job.id == selected]
        completed = [job for job in takes if job.status == JobStatus.SUCCEEDED and job.artifact_uri]
        if not completed:
            which = f"its selected take {selected}" if selected else "none of its takes"
            raise CutNotReady(f"shot {shot} ({shot_name(record, shot)}): {which} is completed")
        choices.append(TakeChoice(shot, shot_name(record, shot), completed[0]))
    return choices


def render_cut(
    artifacts: ArtifactStore,
    record: StoryboardRecord,
    choices: list[TakeChoice],
    *,
    fps: int,
    size: tuple[int, int] | None,
    slate_seconds: float | None,
    interpolator: Interpolator | None = None,
) -> CutRecord:
    """Assemble `choices` into one mp4 at `fps` and `size` (None: the first take's), each shot also
    stored alone; `slate_seconds` puts a slate before each shot. Returns the stored cut."""
    cut_id = f"cut_{secrets.token_hex(8)}"
    keys = CutArtifacts(record.project, record.id)
    key = keys.cut(cut_id)
    writer = VideoWriter(label=None)  # the takes carry their label already; the marker stays in metadata
    metadata = {"title": (record.title or record.id)[:200], "previz_storyboard": record.id}
    clips: list[CutClip] = []
    with tempfile.TemporaryDirectory(prefix="previz-cut-") as scratch:
        folder = Path(scratch)
        first = _take_frames(artifacts, choices[0].job, folder)
        width, height = size or (first.width, first.height)
        with writer.stream(folder / "cut.mp4", width, height, fps, metadata=metadata) as cut:
            for index, choice in enumerate(choices):
                frames = first if index == 0 else _take_frames(artifacts, choice.job, folder)
                frames = conform(resize_frames(frames, width, height), fps, interpolator)
                take = choice.job.request.storyboard.variant + 1
                num_slate = round(slate_seconds * fps) if slate_seconds else 0
                clip_key = keys.clip(cut_id, index, choice.shot)
                path = folder / f"clip-{index}.mp4"
                with writer.stream(path, width, height, fps, metadata=metadata) as clip:
                    if num_slate:
                        slate = slate_frames([choice.name, f"take {take}"], width, height, num_slate)
                        clip.add(slate)
                        cut.add(slate)
                    clip.add(frames.pixels)
                    cut.add(frames.pixels)
                artifacts.put_file(clip_key, path, "video/mp4")
                clips.append(
                    CutClip(
                        shot=choice.shot,
                        name=choice.name,
                        video_id=choice.job.id,
                        take=take,
                        key=clip_key,
                        start_frame=cut.num_frames - num_slate - frames.num_frames,
                        num_frames=num_slate + frames.num_frames,
                        slate_frames=num_slate,
                    )
                )
            num_frames = cut.num_frames
        artifacts.put_file(key, folder / "cut.mp4", "video/mp4")
    return CutRecord(
        id=cut_id,
        key=key,
        fps=fps,
        width=width,
        height=height,
        num_frames=num_frames,
        slates=bool(slate_seconds),
        created_at=time.time(),
        clips=clips,
    )


def _take_frames(artifacts: ArtifactStore, job: JobRecord, folder: Path):
    with _local_copy(artifacts, job.artifact_uri, folder) as path:
        return read_frames(path)


@contextmanager
def _local_copy(artifacts: ArtifactStore, key: str, folder: Path) -> Iterator[Path]:
    """A file with the artifact's bytes: the store's own file when it is local, else a download."""
    local = artifacts.local_path(key)
    if local is not None:
        yield local
        return
    path = folder / f"take-{secrets.token_hex(4)}.mp4"
    with artifacts.open(key) as stream, path.open("wb") as out:
        for chunk in stream:
            out.write(chunk)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
