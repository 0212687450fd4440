"""An edited timeline read back onto its board: the clips' order becomes the shot order, each clip's take
becomes its shot's selected take, and each clip's range becomes its shot's trim.

Clips are matched by the take id every export writes (OTIO metadata, the EDL locator, the FCP XML clip
comment, the AAF mob comment: serve.editorial.timeline.take_id), never by names an editor may change. A
clip is unmatched when it carries no take id, or one that is no live take of this board; a shot used
twice is refused too.
`apply_timeline` is pure: it answers the new edit, or raises TimelineRefused naming every clip it could
not use, and the caller stores the edit in one write (nothing is half-applied).

Trims: a clip's range (source in, duration, at the timeline's rate) is measured against the clip as the
board's last cut exported it (its slate, where its content started in the take): a range that still covers
the whole untrimmed clip is no trim; any other becomes `ShotTrim(rate, start, num_frames)` of the take's
content, slate excluded. A take swapped in for another of the same shot is measured against the clip it
replaced.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import opentimelineio as otio

from serve.editorial.timeline import at_rate, take_id
from serve.jobs import JobRecord
from serve.jobs.storyboard import CutClip, CutRecord, ShotTrim, StoryboardEdit, StoryboardRecord

ReadFormat = Literal["otio", "edl", "fcpxml", "aaf"]
READERS: dict[ReadFormat, str] = {"otio": "otio_json", "edl": "cmx_3600", "fcpxml": "fcp_xml", "aaf": "AAF"}


class UnreadableTimeline(ValueError):
    """The body is no timeline of the format named (HTTP 400)."""


@dataclass(frozen=True, slots=True)
class EditedClip:
    """One clip of an edited timeline, as read."""

    index: int  # its place among the timeline's clips, 0-based
    name: str
    video_id: str | None  # the take id it carries; None: none
    start: int  # source in, frames at the timeline's rate
    num_frames: int  # its duration there


@dataclass(frozen=True, slots=True)
class EditedTimeline:
    rate: int  # frames per second its clips count at
    clips: list[EditedClip]


@dataclass(frozen=True, slots=True)
class Unmatched:
    """A clip that cannot be applied, and why."""

    index: int
    name: str
    video_id: str | None
    code: str  # the reason, machine-readable (serve.http.schemas.UnmatchedClip.reason lists them)
    reason: str  # the reason, for a person

    def __str__(self) -> str:
        if self.index < 0:  # not one clip: the timeline as a whole
            return self.reason
        take = f" (take {self.video_id})" if self.video_id else ""
        return f"clip {self.index + 1} {self.name!r}{take}: {self.reason}"


class TimelineRefused(ValueError):
    """The timeline cannot be applied; nothing was changed. `code`: `foreign_timeline` when none of its
    clips is a take of this board, else `unmatched_clips`."""

    def __init__(self, code: str, unmatched: list[Unmatched]) -> None:
        self.code, self.unmatched = code, unmatched
        super().__init__("; ".join(str(clip) for clip in unmatched))


def read_timeline(data: bytes, fmt: ReadFormat, rate: int) -> EditedTimeline:
    """The clips of the first video track of a timeline in `fmt` (EDL counts at `rate`; OTIO and FCP XML
    carry their own, the first clip's counts)."""
    try:
        if fmt == "aaf":
            timeline = _read_aaf(data)
        else:
            options = {"rate": rate} if fmt == "edl" else {}
            timeline = otio.adapters.read_from_string(
                data.decode("utf-8"), adapter_name=READERS[fmt], **options
            )
    except Exception as error:  # the adapters raise anything from ValueError to their own parse errors
        raise UnreadableTimeline(f"the body is no {fmt} timeline: {str(error)[:300]}") from None
    if not isinstance(timeline, otio.schema.Timeline):
        raise UnreadableTimeline(f"the body is a {type(timeline).__name__}, not an {fmt} timeline")
    tracks = timeline.video_tracks()
    if not tracks:
        raise UnreadableTimeline("the timeline has no video track")
    clips = [item for item in tracks[0] if isinstance(item, otio.schema.Clip)]
    if clips:
        rate = round(clips[0].trimmed_range().duration.rate)
    edited = []
    for index, clip in enumerate(clips):
        span = clip.trimmed_range()
        edited.append(
            EditedClip(
                index=index,
                name=clip.name,
                video_id=take_id(clip),
                start=round(span.start_time.rescaled_to(rate).value),
                num_frames=round(span.duration.rescaled_to(rate).value),
            )
        )
    return EditedTimeline(rate=rate, clips=edited)


def _read_aaf(data: bytes) -> otio.schema.Timeline:
    with tempfile.TemporaryDirectory(prefix="previz-aaf-") as scratch:  # pyaaf2 reads files only
        path = Path(scratch) / "timeline.aaf"
        path.write_bytes(data)
        return otio.adapters.read_from_file(str(path), adapter_name=READERS["aaf"])


def apply_timeline(
    record: StoryboardRecord, jobs: list[JobRecord], cut: CutRecord, edited: EditedTimeline
) -> StoryboardEdit:
    """The board's edit after `edited`; TimelineRefused (nothing applied) when a clip cannot be used."""
    shot_of = {
        job.id: job.request.storyboard.shot
        for job in jobs
        if job.request.storyboard is not None and job.deleted_at is None
    }
    in_cut = {clip.shot: clip for clip in cut.clips}
    unmatched: list[Unmatched] = []
    seen: dict[int, EditedClip] = {}
    for clip in edited.clips:
        refusal = None  # (code, reason)
        if clip.video_id is None:
            refusal = ("no_take_id", "it carries no Previz take id")
        elif clip.video_id not in shot_of:
            refusal = ("not_this_board", "it is no take of this board")
        elif shot_of[clip.video_id] in seen:
            earlier = seen[shot_of[clip.video_id]].index + 1
            refusal = ("shot_used_twice", f"its shot is already used by clip {earlier}")
        elif clip.num_frames <= 0:
            refusal = ("empty", "it is empty")
        else:
            seen[shot_of[clip.video_id]] = clip
            reference = in_cut.get(shot_of[clip.video_id])
            slate = _slate(cut, reference, edited.rate)
            if clip.start + clip.num_frames <= slate:
                refusal = ("slate_only", "it is trimmed to its slate only")
        if refusal is not None:
            unmatched.append(Unmatched(clip.index, clip.name, clip.video_id, *refusal))
    if unmatched:
        foreign = not any(clip.video_id in shot_of for clip in edited.clips)
        raise TimelineRefused("foreign_timeline" if foreign else "unmatched_clips", unmatched)
    if not seen:
        raise TimelineRefused(
            "unmatched_clips", [Unmatched(-1, "", None, "no_clips", "the timeline has no clips")]
        )
    edit = record.edit.model_copy(deep=True) if record.edit is not None else StoryboardEdit()
    edit.order = list(seen)
    for shot, clip in seen.items():
        edit.takes[str(shot)] = clip.video_id  # type: ignore[assignment]
        trim = _trim(cut, in_cut.get(shot), clip, edited.rate)
        if trim is None:
            edit.trims.pop(str(shot), None)
        else:
            edit.trims[str(shot)] = trim
    return edit


def _slate(cut: CutRecord, reference: CutClip | None, rate: int) -> int:
    """The clip's slate frames at `rate` (a shot that was not in the cut: the cut's slate length)."""
    frames = (
        reference.slate_frames if reference is not None else (cut.clips[0].slate_frames if cut.clips else 0)
    )
    return at_rate(frames, cut.fps, rate)


def _trim(cut: CutRecord, reference: CutClip | None, clip: EditedClip, rate: int) -> ShotTrim | None:
    slate = _slate(cut, reference, rate)
    head = max(clip.start, slate)  # an editor who trims into the slate trims the slate, not the take
    end = clip.start + clip.num_frames
    if reference is not None:
        whole = max(1, at_rate(reference.num_frames, cut.fps, rate))
        if not reference.trimmed and head == slate and end >= whole:
            return None
        content_start = at_rate(reference.content_start, cut.fps, rate)
    else:
        content_start = 0
    return ShotTrim(fps=rate, start=content_start + head - slate, num_frames=end - head)
