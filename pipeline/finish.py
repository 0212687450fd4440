"""The one finisher: decoded (and upscaled) frames become a delivered clip.

In order: conform to the delivered frame rate (motion-interpolated; before grading, so the film look's
grain is drawn per delivered frame, never interpolated), grade (a built-in look or a .cube LUT), the frame
safety check (a blocked clip raises ContentBlocked before anything is written), the "AI-generated draft"
label and the mp4 encode, and a JPEG poster. The Finisher deployment (serve/stages/finisher.py) and
`previz generate` (pipeline.local) both call `Finisher.finish`, so a local clip and a served clip of the
same frames are the same clip.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.frames import Frames
from pipeline.grade import Grader
from pipeline.interpolate import CONFORM_RATES, FlowInterpolator, Interpolator, conform
from pipeline.lut import Lut, read_cube
from pipeline.safety import ContentBlocked, FrameCheck
from pipeline.stages import stage
from pipeline.video import DRAFT_LABEL, VideoWriter, poster_frame_jpeg

# (part, units done, units total) -> None; parts are FINISH_PARTS
ProgressCallback = Callable[[str, int, int], None]
# What `finish` reports and times, in order; "grade" includes the frame check that follows it.
FINISH_PARTS = stage("finish").local_steps  # ("conform", "grade", "encode_video"), from the stage table


@dataclass(frozen=True, slots=True)
class ClipFinish:
    """How to finish one clip: the choices of the request, none of them about where the clip goes."""

    seed: int  # the film look's grain is seeded by the request's, so a take re-finishes identically
    look: str = "none"  # a built-in look (none | film), or the name a LUT is known by when `lut` is set
    lut: Lut | None = None  # the LUT of a look that names one
    fps: int | None = None  # delivered rate (16, 24, 25); None keeps the decoded frames' own
    label: str | None = DRAFT_LABEL  # burned into the pixels; None: unmarked pixels (the metadata marks)
    metadata: dict[str, str] = field(default_factory=dict)  # container tags (title, seed, ...)

    def __post_init__(self) -> None:
        if self.fps is not None and self.fps not in CONFORM_RATES:
            raise ValueError(f"`fps` must be one of 16, 24, 25 but is {self.fps}.")
        Grader(self.look, lut=self.lut)  # refuses an unknown look here, before any frame is made


@dataclass(frozen=True, slots=True)
class FinishedFiles:
    """What `finish` wrote, and the delivered clip's shape."""

    clip: Path
    poster: Path | None  # None when no poster was asked for
    num_frames: int
    width: int
    height: int
    part_seconds: dict[str, float]  # FINISH_PARTS -> wall seconds


class Finisher:
    """Conform, grade, check, label, encode and poster; holds what is costly to build (the interpolator)."""

    def __init__(
        self, frame_check: FrameCheck | None = None, interpolator: Interpolator | None = None
    ) -> None:
        """`frame_check`: the content policy's hook on finished frames (None: no check);
        `interpolator`: makes the in-between frames of a conform (default: optical flow, no weights)."""
        self.frame_check = frame_check
        self.interpolator = interpolator or FlowInterpolator()

    def finish(
        self,
        frames: Frames,
        how: ClipFinish,
        clip: Path,
        *,
        poster: Path | None = None,
        progress: ProgressCallback | None = None,
    ) -> FinishedFiles:
        """Write the finished clip to `clip` (and its poster frame to `poster`). A clip the frame check
        blocks raises ContentBlocked and writes nothing; a failing check raises SafetyCheckError."""
        report = progress or (lambda _part, _done, _total: None)
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        conformed = self.conform(frames, how)
        seconds["conform"], started = time.perf_counter() - started, time.perf_counter()
        report("conform", 1, 1)
        graded = self.grade(conformed, how)
        self.check(graded)
        seconds["grade"], started = time.perf_counter() - started, time.perf_counter()
        report("grade", 1, 1)
        path = VideoWriter(label=how.label).write(graded, clip, metadata=how.metadata)
        if poster is not None:
            poster.write_bytes(poster_frame_jpeg(path))
        seconds["encode_video"] = time.perf_counter() - started
        report("encode_video", 1, 1)
        return FinishedFiles(
            clip=path,
            poster=poster,
            num_frames=graded.num_frames,
            width=graded.width,
            height=graded.height,
            part_seconds=seconds,
        )

    def conform(self, frames: Frames, how: ClipFinish) -> Frames:
        """`frames` retimed to the delivered rate (themselves when it is theirs)."""
        return conform(frames, how.fps or frames.fps, self.interpolator)

    def grade(self, frames: Frames, how: ClipFinish) -> Frames:
        """`frames` with the look (or LUT) applied; the same seed gives the same bytes."""
        return Grader(how.look, lut=how.lut).grade(frames, seed=how.seed)

    def check(self, frames: Frames) -> None:
        """ContentBlocked when the frame check refuses `frames`; nothing without a check."""
        verdict = self.frame_check.check(frames.pixels) if self.frame_check is not None else None
        if verdict is not None:
            raise ContentBlocked.of(verdict)


def lut_from_cube(text: str, interpolation: str = "tetrahedral") -> Lut:
    """A look's LUT from the text of a .cube file (CubeError names a malformed line)."""
    return Lut(read_cube(text), interpolation)
