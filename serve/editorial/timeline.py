"""A cut as an editorial timeline, built with OpenTimelineIO and written by its adapters: OTIO JSON (core),
CMX 3600 EDL (`otio-cmx3600-adapter`), FCP 7 XML (`otio-fcp-adapter`, the xmeml that Premiere, Resolve
and Avid import) and AAF (`otio-aaf-adapter` on pyaaf2, what Avid Media Composer takes).

One video track; one clip per shot of the cut, named "<shot> take <n>" and carrying its stable take id (the
video id: OTIO metadata, an EDL locator comment, an FCP XML clip comment, an AAF master mob comment), its
media the shot's conformed clip (slate included): a signed link, or a relative path inside the package zip
beside the cut and the timeline. Each clip also carries the take's review (status, notes): OTIO metadata,
EDL comment lines, an FCP XML clip comment and markers at the notes' frames, AAF master mob comments (one
per note: the AAF adapter writes no markers).

The timeline's rate is the cut's, or `rate` (24 or 25): each clip's length and position are then conformed
to it (rounded as the cut's conform rounds), the media still being the cut's clips, which an NLE plays at
their own rate in a timeline of another. EDL, FCP XML and AAF count SMPTE timecode, which has no 16 fps: a
16 fps cut exports to them at `rate` 24 or 25.
"""

from __future__ import annotations

import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import opentimelineio as otio

from serve.jobs.reviews import TakeNote
from serve.jobs.storyboard import CutClip, CutRecord
from serve.storage import ArtifactStore

TimelineFormat = Literal["otio", "edl", "fcpxml", "aaf"]
SMPTE_RATES = (24, 25)  # of the rates a cut may have, those SMPTE timecode counts in
AAF_TAKE = "Previz Take"  # the AAF master mob comment that holds the take id


@dataclass(frozen=True, slots=True)
class Writer:
    adapter: str  # OTIO adapter name
    media_type: str
    suffix: str


WRITERS: dict[str, Writer] = {
    "otio": Writer("otio_json", "application/json", "otio"),
    "edl": Writer("cmx_3600", "text/plain", "edl"),
    "fcpxml": Writer("fcp_xml", "application/xml", "xml"),
    "aaf": Writer("AAF", "application/octet-stream", "aaf"),
}


@dataclass(frozen=True, slots=True)
class ClipReview:
    """A take's review as its clip carries it."""

    status: str  # pending | approved | rejected | needs-changes
    by: str | None  # who set it last
    fps: int  # the take's own delivered rate: its notes' frames count at it
    notes: list[TakeNote] = field(default_factory=list)


class RateNotInTimecode(ValueError):
    """EDL and FCP XML of a 16 fps cut: SMPTE timecode has no such rate."""


def clip_file_name(clip: CutClip, index: int) -> str:
    """The clip's file in the package: `clips/001_1A_take2.mp4` (order, shot, take; safe characters)."""
    shot = re.sub(r"[^A-Za-z0-9._-]+", "-", clip.name).strip("-.") or f"shot{clip.shot + 1}"
    return f"clips/{index + 1:03d}_{shot}_take{clip.take}.mp4"


def at_rate(num_frames: int, from_fps: int, to_fps: int) -> int:
    """Frames at `from_fps` counted at `to_fps`, rounded as the cut's conform rounds."""
    return num_frames if from_fps == to_fps else round(num_frames * to_fps / from_fps)


def build_timeline(
    cut: CutRecord,
    title: str,
    media_url: Callable[[CutClip, int], str],
    *,
    rate: int | None = None,
    reviews: Mapping[str, ClipReview] | None = None,
    note_markers: bool = True,
) -> otio.schema.Timeline:
    """The cut's timeline at `rate` (default the cut's); `media_url(clip, index)` says where each clip's
    media is; `reviews` (video id -> its review) go on the clips; `note_markers`: a marker per note with a
    frame (EDL writes markers as locators: its notes are comment lines already)."""
    rate = rate or cut.fps
    reviews = reviews or {}

    def time(frames: int) -> otio.opentime.RationalTime:
        return otio.opentime.RationalTime(frames, rate)

    timeline = otio.schema.Timeline(name=title, global_start_time=time(0))
    timeline.metadata["previz"] = {"cut_id": cut.id, "cut_fps": cut.fps, "rate": rate}
    track = otio.schema.Track(name="V1", kind=otio.schema.TrackKind.Video)
    timeline.tracks.append(track)
    for index, clip in enumerate(cut.clips):
        whole = otio.opentime.TimeRange(time(0), time(max(1, at_rate(clip.num_frames, cut.fps, rate))))
        media = otio.schema.ExternalReference(target_url=media_url(clip, index), available_range=whole)
        review = reviews.get(clip.video_id)
        item = otio.schema.Clip(
            name=f"{clip.name} take {clip.take}",
            media_reference=media,
            source_range=whole,
            metadata=clip_metadata(clip, review),
        )
        # EDL: a locator on the clip's first frame carries the take id (the EDL reader keeps locators)
        item.markers.append(
            otio.schema.Marker(
                name=take_tag(clip.video_id),
                marked_range=otio.opentime.TimeRange(time(0), time(0)),
                color=otio.schema.MarkerColor.WHITE,
            )
        )
        for note in review.notes if review is not None and note_markers else []:
            if note.frame is None:
                continue
            # the note's frame is the take's; in the clip it comes after the slate, conformed and trimmed
            in_cut = at_rate(note.frame, review.fps, cut.fps) - clip.content_start
            if 0 <= in_cut < clip.num_frames - clip.slate_frames:
                at = at_rate(clip.slate_frames + in_cut, cut.fps, rate)
                item.markers.append(
                    otio.schema.Marker(
                        name=f"{note.author}: {note.text}"[:200],
                        marked_range=otio.opentime.TimeRange(time(at), time(0)),
                        color=otio.schema.MarkerColor.YELLOW,
                        metadata={"previz": {"note_id": note.id}},
                    )
                )
        track.append(item)
    return timeline


def clip_metadata(clip: CutClip, review: ClipReview | None) -> dict:
    """What a clip carries of its take in each format: OTIO `previz`, FCP XML clip comments (its `id`
    attribute is the adapter's own `clipitem-N`), EDL comment lines, AAF master mob comments."""
    status = review.status if review is not None else "pending"
    notes = review.notes if review is not None else []
    review_line = f"PREVIZ REVIEW {status.upper()}" + (f" BY {review.by}" if review and review.by else "")
    note_lines = [
        f"PREVIZ NOTE{'' if note.frame is None else f' F{note.frame}'} {note.author}: {note.text}"
        for note in notes
    ]
    return {
        "previz": {
            "shot": clip.shot,
            "take": clip.take,
            "take_id": clip.video_id,
            "video_id": clip.video_id,
            "slate_frames": clip.slate_frames,
            "content_start": clip.content_start,
            "review": status,
            "review_by": review.by if review is not None else None,
            "notes": [
                {
                    "id": note.id,
                    "author": note.author,
                    "text": note.text,
                    "frame": note.frame,
                    "created_at": int(note.created_at.timestamp()),
                }
                for note in notes
            ],
        },
        "fcp_xml": {"comments": {"clipcommenta": take_tag(clip.video_id), "clipcommentb": review_line}},
        "cmx_3600": {"comments": [review_line, *(" ".join(line.split()) for line in note_lines)]},
        "AAF": {"UserComments": aaf_comments(clip, status, review)},
    }


def aaf_comments(clip: CutClip, status: str, review: ClipReview | None) -> dict[str, str]:
    """The clip's master mob comments (Avid shows them as bin columns): its take id, review status, who set
    it, and one `Previz Note <n>` per note ("F<frame> author: text", the frame the take's own). The AAF
    adapter (otio-aaf-adapter 2.0.0) writes no markers, so the notes ride as comments only."""
    comments = {AAF_TAKE: clip.video_id, "Previz Review": status}
    if review is not None and review.by:
        comments["Previz Review By"] = review.by
    for number, note in enumerate(review.notes if review is not None else [], start=1):
        at = "" if note.frame is None else f"F{note.frame} "
        comments[f"Previz Note {number}"] = f"{at}{note.author}: {note.text}"
    return comments


def take_tag(video_id: str) -> str:
    """The stable take id as every timeline format carries it (OTIO metadata, EDL locator comment, FCP XML
    clip comment), so an edited timeline that comes back is matched to its takes: `PREVIZ TAKE vid_…`."""
    return f"PREVIZ TAKE {video_id}"


def take_ids(timeline: otio.schema.Timeline) -> list[str | None]:
    """The take id of each clip of a timeline read back from any of the formats (None: not a Previz take)."""
    return [take_id(clip) for clip in timeline.find_clips()]


def take_id(clip: otio.schema.Clip) -> str | None:
    """The take id a clip carries: its OTIO metadata or AAF mob comment, else an EDL locator or FCP XML clip
    comment."""
    video_id = dict(clip.metadata.get("previz", {})).get("take_id")
    video_id = video_id or dict(dict(clip.metadata.get("AAF", {})).get("UserComments", {})).get(AAF_TAKE)
    if video_id is not None:
        return str(video_id)
    comments = dict(dict(clip.metadata.get("fcp_xml", {})).get("comments", {}))
    for text in [marker.name for marker in clip.markers] + [str(text) for text in comments.values()]:
        if text.upper().startswith("PREVIZ TAKE "):
            return text.split()[-1].lower()  # the EDL writer upper-cases locators
    return None


def write_timeline(timeline: otio.schema.Timeline, fmt: TimelineFormat, rate: int) -> bytes:
    """The timeline in `fmt` (UTF-8 text, or an AAF file's bytes); RateNotInTimecode for EDL, FCP XML and
    AAF of a rate SMPTE timecode lacks."""
    if fmt != "otio" and rate not in SMPTE_RATES:
        raise RateNotInTimecode(
            f"{fmt} needs SMPTE timecode, which has no {rate} fps; export at `rate` 24 or 25 (the clips are "
            "conformed to it), render the cut at 24 or 25 fps, or take the otio timeline"
        )
    if fmt != "aaf":
        return otio.adapters.write_to_string(timeline, adapter_name=WRITERS[fmt].adapter).encode()
    with tempfile.TemporaryDirectory(prefix="previz-aaf-") as scratch:  # pyaaf2 writes files only
        path = Path(scratch) / "timeline.aaf"
        # no source files to take MobIDs from: the adapter makes a fresh one per clip
        otio.adapters.write_to_file(timeline, str(path), adapter_name="AAF", use_empty_mob_ids=True)
        return path.read_bytes()


def package(
    artifacts: ArtifactStore,
    cut: CutRecord,
    title: str,
    fmt: TimelineFormat,
    name: str,
    path: Path,
    *,
    rate: int | None = None,
    reviews: Mapping[str, ClipReview] | None = None,
) -> Path:
    """Write to `path` a zip of `<name>/cut.mp4`, `<name>/clips/…` and `<name>/timeline.<suffix>` whose
    media references are the clips' relative paths; the mp4s are streamed in, never held whole."""
    timeline = build_timeline(
        cut, title, clip_file_name, rate=rate, reviews=reviews, note_markers=fmt != "edl"
    )
    text = write_timeline(timeline, fmt, rate or cut.fps)
    # mp4s do not compress: stored, so the zip costs no CPU beyond the copy
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{name}/timeline.{WRITERS[fmt].suffix}", text)
        members = [("cut.mp4", cut.key)] + [
            (clip_file_name(clip, index), clip.key) for index, clip in enumerate(cut.clips)
        ]
        for member, key in members:
            with (
                artifacts.open(key) as source,
                archive.open(f"{name}/{member}", "w", force_zip64=True) as out,
            ):
                for chunk in source:
                    out.write(chunk)
    return path
