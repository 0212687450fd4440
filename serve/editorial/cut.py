"""A storyboard's first cut: its selected takes in shot order, conformed to one frame rate and size, with
optional slates, written as one mp4 plus one mp4 per shot (what the timeline's clips point at).

Which take a shot uses: the one the editor selected (`StoryboardEdit.takes`), else the shot's first
completed variant. Which shots, in which order: `StoryboardEdit.order`, else every shot as on the board.
Which part of the take: all of it, or its trim (`StoryboardEdit.trims`, set by an edited timeline read
back), converted to the cut's rate and kept inside the take. A chained shot's take (`continue`) that
follows, in the cut, the very take it started from loses its first frame (conformed to the cut's rate),
which repeats that take's last: the cut plays through the join without a held frame. A trim decides alone.
`choose_takes` decides that when the cut is asked for (the Ingress), and the cut job stores it
(serve.jobs.cuts.CutRequest); `render_cut` is the CPU work on finished clips (decode, resize, interpolate,
encode) that the Finisher's replicas run for the Scheduler, about 8 s per 5 s shot on one core.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.frames import Frames
from pipeline.interpolate import Interpolator, conform
from pipeline.slate import slate_frames
from pipeline.upscale import resize_frames
from pipeline.video import VideoWriter, read_frames
from serve.jobs import JobRecord, JobStatus
from serve.jobs.cuts import CutRequest, CutTake
from serve.jobs.storyboard import CutClip, CutRecord, ShotTrim, StoryboardRecord
from serve.jobs.takes import take_number
from serve.storage import ArtifactStore, CutArtifacts

ClipDone = Callable[[int, int], None]  # (clips rendered, clips in the cut); raising stops the render


class CutNotReady(Exception):
    """A shot of the cut has no completed take to use (HTTP 409)."""


def choose_takes(record: StoryboardRecord, jobs: list[JobRecord]) -> list[CutTake]:
    """The take of every shot of the cut, in cut order; CutNotReady names a shot without one."""
    selected_takes = record.edit.takes if record.edit is not None else {}
    trims = record.edit.trims if record.edit is not None else {}
    by_shot: dict[int, list[JobRecord]] = {}
    for job in jobs:
        if job.request.storyboard is not None:
            by_shot.setdefault(job.request.storyboard.shot, []).append(job)
    choices: list[CutTake] = []
    for shot in record.shot_order:
        takes = sorted(by_shot.get(shot, []), key=take_number)
        selected = selected_takes.get(str(shot))
        if selected is not None:
            takes = [job for job in takes if job.id == selected]
        completed = [job for job in takes if job.status == JobStatus.SUCCEEDED and job.artifact_uri]
        if not completed:
            which = f"its selected take {selected}" if selected else "none of its takes"
            raise CutNotReady(f"shot {shot} ({record.request.shot_name(shot)}): {which} is completed")
        job = completed[0]
        name = record.request.shot_name(shot)
        first = job.request.keyframes.first if job.request.keyframes is not None else None
        joins = (
            first is not None
            and first.kind == "continue"
            and bool(choices)
            and first.video == choices[-1].video_id
        )
        choices.append(
            CutTake(
                shot=shot,
                name=name,
                video_id=job.id,
                take=take_number(job),
                key=job.artifact_uri,
                trim=trims.get(str(shot)),
                joins_previous=joins,
            )
        )
    return choices


def render_cut(
    artifacts: ArtifactStore,
    cut_id: str,
    attempt: int,
    project: str,
    storyboard_id: str,
    request: CutRequest,
    *,
    interpolator: Interpolator | None = None,
    clip_done: ClipDone | None = None,
) -> CutRecord:
    """Assemble the request's takes into one mp4 at its rate and size (None: the first take's), each shot
    also stored alone, under the keys of `cut_id`'s `attempt`; a slate before each shot when asked.
    `clip_done` hears of each shot rendered, and may raise to stop. Returns the stored cut."""
    keys = CutArtifacts(project, storyboard_id)
    key = keys.cut(cut_id, attempt)
    fps, takes, slate_seconds = request.fps, request.takes, request.slate_seconds
    writer = VideoWriter(label=None)  # the takes carry their label already; the marker stays in metadata
    metadata = {"title": request.title[:200], "previz_storyboard": storyboard_id}
    clips: list[CutClip] = []
    with tempfile.TemporaryDirectory(prefix="previz-cut-") as scratch:
        folder = Path(scratch)
        first = _take_frames(artifacts, takes[0].key, folder)
        width, height = request.size or (first.width, first.height)
        with writer.stream(folder / "cut.mp4", width, height, fps, metadata=metadata) as cut:
            for index, choice in enumerate(takes):
                frames = first if index == 0 else _take_frames(artifacts, choice.key, folder)
                frames = conform(resize_frames(frames, width, height), fps, interpolator)
                frames, content_start = trim_frames(frames, choice.trim)
                if choice.joins_previous and choice.trim is None and frames.num_frames > 1:
                    frames, content_start = Frames(pixels=frames.pixels[1:], fps=frames.fps), 1
                num_slate = round(slate_seconds * fps) if slate_seconds else 0
                clip_key = keys.clip(cut_id, index, choice.shot, attempt)
                path = folder / f"clip-{index}.mp4"
                with writer.stream(path, width, height, fps, metadata=metadata) as clip:
                    if num_slate:
                        slate = slate_frames([choice.name, f"take {choice.take}"], width, height, num_slate)
                        clip.add(slate)
                        cut.add(slate)
                    clip.add(frames.pixels)
                    cut.add(frames.pixels)
                artifacts.put_file(clip_key, path, "video/mp4")
                clips.append(
                    CutClip(
                        shot=choice.shot,
                        name=choice.name,
                        video_id=choice.video_id,
                        take=choice.take,
                        key=clip_key,
                        start_frame=cut.num_frames - num_slate - frames.num_frames,
                        num_frames=num_slate + frames.num_frames,
                        slate_frames=num_slate,
                        content_start=content_start,
                        trimmed=choice.trim is not None,
                    )
                )
                if clip_done is not None:
                    clip_done(index + 1, len(takes))
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


def trim_frames(frames: Frames, trim: ShotTrim | None) -> tuple[Frames, int]:
    """The part of a conformed take that `trim` keeps (all of it without one), and where it starts; a trim
    reaching past the take's end keeps what there is, at least its last frame."""
    if trim is None:
        return frames, 0
    start, num_frames = trim.at(frames.fps)
    start = min(start, frames.num_frames - 1)
    return Frames(pixels=frames.pixels[start : start + num_frames], fps=frames.fps), start


def _take_frames(artifacts: ArtifactStore, key: str, folder: Path):
    with _local_copy(artifacts, key, folder) as path:
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
