"""A cut as an editorial timeline, built with OpenTimelineIO and written by its adapters: OTIO JSON (core),
CMX 3600 EDL (`otio-cmx3600-adapter`) and FCP 7 XML (`otio-fcp-adapter`, the xmeml that Premiere, Resolve
and Avid import).

One video track; one clip per shot of the cut, named "<shot> take <n>" and carrying its stable take id (the
video id: OTIO metadata, an EDL locator comment, an FCP XML clip comment), its media the shot's conformed
clip (slate included) at the cut's rate: a signed link, or a relative path inside the package zip beside
the cut and the timeline. EDL and FCP XML write SMPTE timecode, which has no 16 fps: those need a cut at
24 or 25 fps.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import opentimelineio as otio

from serve.jobs.storyboard import CutClip, CutRecord
from serve.storage import ArtifactStore

TimelineFormat = Literal["otio", "edl", "fcpxml"]
SMPTE_RATES = (24, 25)  # of the rates a cut may have, those SMPTE timecode counts in


@dataclass(frozen=True, slots=True)
class Writer:
    adapter: str  # OTIO adapter name
    media_type: str
    suffix: str


WRITERS: dict[str, Writer] = {
    "otio": Writer("otio_json", "application/json", "otio"),
    "edl": Writer("cmx_3600", "text/plain", "edl"),
    "fcpxml": Writer("fcp_xml", "application/xml", "xml"),
}


class RateNotInTimecode(ValueError):
    """EDL and FCP XML of a 16 fps cut: SMPTE timecode has no such rate."""


def clip_file_name(clip: CutClip, index: int) -> str:
    """The clip's file in the package: `clips/001_1A_take2.mp4` (order, shot, take; safe characters)."""
    shot = re.sub(r"[^A-Za-z0-9._-]+", "-", clip.name).strip("-.") or f"shot{clip.shot + 1}"
    return f"clips/{index + 1:03d}_{shot}_take{clip.take}.mp4"


def build_timeline(
    cut: CutRecord, title: str, media_url: Callable[[CutClip, int], str]
) -> otio.schema.Timeline:
    """The cut's timeline; `media_url(clip, index)` says where each clip's media is."""
    rate = cut.fps
    timeline = otio.schema.Timeline(name=title, global_start_time=otio.opentime.RationalTime(0, rate))
    track = otio.schema.Track(name="V1", kind=otio.schema.TrackKind.Video)
    timeline.tracks.append(track)
    for index, clip in enumerate(cut.clips):
        whole = otio.opentime.TimeRange(
            otio.opentime.RationalTime(0, rate), otio.opentime.RationalTime(clip.num_frames, rate)
        )
        media = otio.schema.ExternalReference(target_url=media_url(clip, index), available_range=whole)
        item = otio.schema.Clip(
            name=f"{clip.name} take {clip.take}",
            media_reference=media,
            source_range=whole,
            metadata={
                "previz": {
                    "shot": clip.shot,
                    "take": clip.take,
                    "take_id": clip.video_id,
                    "video_id": clip.video_id,
                    "slate_frames": clip.slate_frames,
                },
                # FCP 7 XML: a clip comment (its `id` attribute is the adapter's own `clipitem-N`)
                "fcp_xml": {"comments": {"clipcommenta": take_tag(clip.video_id)}},
            },
        )
        # EDL: a locator on the clip's first frame is the one comment line the writer emits per clip
        item.markers.append(
            otio.schema.Marker(
                name=take_tag(clip.video_id),
                marked_range=otio.opentime.TimeRange(
                    otio.opentime.RationalTime(0, rate), otio.opentime.RationalTime(0, rate)
                ),
                color=otio.schema.MarkerColor.WHITE,
            )
        )
        track.append(item)
    return timeline


def take_tag(video_id: str) -> str:
    """The stable take id as every timeline format carries it (OTIO metadata, EDL locator comment, FCP XML
    clip comment), so an edited timeline that comes back is matched to its takes: `PREVIZ TAKE vid_…`."""
    return f"PREVIZ TAKE {video_id}"


def take_ids(timeline: otio.schema.Timeline) -> list[str | None]:
    """The take id of each clip of a timeline read back from any of the formats (None: not a Previz take)."""
    found = []
    for clip in timeline.find_clips():
        video_id = dict(clip.metadata.get("previz", {})).get("take_id")
        comments = dict(dict(clip.metadata.get("fcp_xml", {})).get("comments", {}))
        texts = [marker.name for marker in clip.markers] + [str(text) for text in comments.values()]
        for text in texts if video_id is None else []:
            if text.upper().startswith("PREVIZ TAKE "):
                video_id = text.split()[-1].lower()  # the EDL writer upper-cases locators
                break
        found.append(video_id)
    return found


def write_timeline(timeline: otio.schema.Timeline, fmt: TimelineFormat, rate: int) -> str:
    """The timeline as text in `fmt`; RateNotInTimecode for EDL / FCP XML of a rate SMPTE lacks."""
    if fmt != "otio" and rate not in SMPTE_RATES:
        raise RateNotInTimecode(
            f"{fmt} needs SMPTE timecode, which has no {rate} fps; render the cut at 24 or 25 fps "
            "(`fps` of POST /v1/storyboards/{id}/cut), or take the otio timeline"
        )
    return otio.adapters.write_to_string(timeline, adapter_name=WRITERS[fmt].adapter)


def package(
    artifacts: ArtifactStore, cut: CutRecord, title: str, fmt: TimelineFormat, name: str, path: Path
) -> Path:
    """Write to `path` a zip of `<name>/cut.mp4`, `<name>/clips/…` and `<name>/timeline.<suffix>` whose
    media references are the clips' relative paths; the mp4s are streamed in, never held whole."""
    text = write_timeline(build_timeline(cut, title, clip_file_name), fmt, cut.fps)
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
