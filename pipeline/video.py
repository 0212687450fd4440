"""VideoWriter: H.264 mp4 encoding with an always-present "AI-generated draft" marker, plus readers.

Every clip Previz writes carries the marker in its container metadata; by default the label is also
burned into the pixels, so a draft stays recognisable after re-encodes that strip metadata.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.frames import Frames

CODEC = "libx264"  # the H.264 encoder bundled in PyAV's wheels; crf/preset below are its options
X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
)
# x264's MB-tree rate control makes this build's output differ from run to run for the same frames, even
# single-threaded (measured: 10 of 12 encodes of one 480p, 81-frame clip differed, decoded pixels up to
# 21/255 apart, mean 0.11): without it the same frames give the same bytes, so the same seed gives the same
# take, for 17 % more bytes at the same crf on that (noise-like) clip.
X264_PARAMS = "mbtree=0"
DRAFT_LABEL = "AI-generated draft"  # the burned-in label and the metadata marker: the one spelling of it
# container tags that mark every file as an AI-generated draft; callers cannot override them
AI_MARKER: dict[str, str] = {"comment": DRAFT_LABEL, "previz_ai_generated": "true"}


@dataclass(frozen=True, slots=True)
class VideoInfo:
    """What a decode of an mp4 finds: used by tests and by the API to describe artifacts."""

    num_frames: int  # frames actually decoded, not the header's claim
    width: int
    height: int
    fps: float  # average frame rate of the video stream
    codec: str  # decoder name, e.g. "h264"
    metadata: dict[str, str]  # container-level tags (mp4 udta / ilst)


class VideoWriter:
    """Encodes `Frames` to H.264 yuv420p mp4, writing atomically (temp file in the same dir, then rename)."""

    def __init__(self, crf: int = 18, preset: str = "medium", label: str | None = DRAFT_LABEL) -> None:
        if not 0 <= crf <= 51:
            raise ValueError(f"`crf` must be between 0 and 51 but is {crf}.")
        if preset not in X264_PRESETS:
            raise ValueError(f"`preset` must be one of {', '.join(X264_PRESETS)} but is {preset!r}.")
        if label is not None and not label.strip():
            raise ValueError(f"`label` must be None or non-blank text but is {label!r}.")
        if CODEC not in av.codecs_available:
            raise RuntimeError(
                f"This PyAV build has no {CODEC} encoder; install a PyAV wheel that bundles it."
            )
        self.crf = crf
        self.preset = preset
        self.label = label

    def write(self, frames: Frames, path: Path, *, metadata: dict[str, str] | None = None) -> Path:
        """Encode `frames` to `path` at frames.fps with exactly frames.num_frames frames; returns `path`."""
        with self.stream(path, frames.width, frames.height, frames.fps, metadata=metadata) as out:
            out.add(frames.pixels)
        return Path(path)

    @contextmanager
    def stream(
        self, path: Path, width: int, height: int, fps: int, *, metadata: dict[str, str] | None = None
    ) -> Iterator[VideoStream]:
        """An mp4 written a batch of frames at a time (a long assembly never sits in memory whole); the
        file appears at `path` when the block ends without an error, never half-written."""
        path = Path(path)
        if width % 2 or height % 2:
            raise ValueError(
                f"Frame `width` and `height` must be even for H.264 yuv420p but are {width} and {height}."
            )
        tags = _merge_metadata(metadata or {})
        overlay = _label_overlay(self.label, width, height) if self.label is not None else None
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        try:
            # use_metadata_tags: without it the mp4 muxer drops every key it has no atom for
            with av.open(
                tmp_name, mode="w", format="mp4", options={"movflags": "use_metadata_tags"}
            ) as container:
                container.metadata.update(tags)
                stream = container.add_stream(CODEC, rate=fps)
                stream.width = width
                stream.height = height
                stream.pix_fmt = "yuv420p"
                stream.codec_context.time_base = Fraction(1, fps)  # pts = frame index
                stream.options = {"crf": str(self.crf), "preset": self.preset, "x264-params": X264_PARAMS}
                out = VideoStream(container, stream, overlay)
                yield out
                container.mux(stream.encode(None))
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


class VideoStream:
    """The open encoder of VideoWriter.stream: `add` frames in order."""

    def __init__(self, container: Any, stream: Any, overlay: tuple[np.ndarray, np.ndarray] | None) -> None:
        self._container, self._stream, self._overlay = container, stream, overlay
        self.num_frames = 0  # frames added so far

    def add(self, pixels: np.ndarray) -> None:
        """Encode (n, height, width, 3) uint8 RGB frames after those added before."""
        if pixels.ndim != 4 or pixels.shape[1:] != (self._stream.height, self._stream.width, 3):
            raise ValueError(
                f"`pixels` must have shape (n, {self._stream.height}, {self._stream.width}, 3) but has "
                f"{pixels.shape}."
            )
        for rgb in pixels:
            if self._overlay is not None:
                rgb = _burn(rgb, self._overlay)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self.num_frames
            self._container.mux(self._stream.encode(frame))
            self.num_frames += 1


def _merge_metadata(metadata: dict[str, str]) -> dict[str, str]:
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"`metadata` keys and values must be str but {key!r} maps to {value!r}.")
        if key in AI_MARKER and value != AI_MARKER[key]:
            raise ValueError(
                f"`metadata` key {key!r} is reserved for the AI-generated marker "
                f"({AI_MARKER[key]!r}) but was given {value!r}."
            )
    return {**metadata, **AI_MARKER}


def _label_overlay(label: str, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Rendered once per clip: (rgb (h, w, 3) float32, alpha (h, w, 1) float32) for the bottom-left corner."""
    font_size = max(8, round(height * 0.035))
    margin = max(2, round(font_size * 0.6))
    pad = max(2, round(font_size * 0.35))
    font = ImageFont.load_default(size=font_size)
    left, top, right, bottom = font.getbbox(label)
    box_w = min(width, right - left + 2 * pad + margin)
    box_h = min(height, bottom - top + 2 * pad + margin)
    # the patch covers the box plus the margin to the frame corner; the box itself sits inside it
    patch = Image.new("RGBA", (box_w, box_h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(patch)
    draw.rectangle((margin, 0, box_w - 1, box_h - margin - 1), fill=(0, 0, 0, 150))
    draw.text((margin + pad - left, pad - top), label, font=font, fill=(255, 255, 255, 255))
    rgba = np.asarray(patch, dtype=np.float32) / 255.0
    return rgba[..., :3], rgba[..., 3:]


def _burn(rgb: np.ndarray, overlay: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Alpha-composite the label patch onto the bottom-left corner of one (h, w, 3) uint8 frame."""
    patch_rgb, alpha = overlay
    box_h, box_w = alpha.shape[:2]
    out = rgb.copy()
    region = out[-box_h:, :box_w].astype(np.float32) / 255.0
    blended = region * (1.0 - alpha) + patch_rgb * alpha
    out[-box_h:, :box_w] = (blended * 255.0 + 0.5).astype(np.uint8)
    return out


def read_video_info(path: str | Path) -> VideoInfo:
    """Decode `path` fully and report frame count, size, fps, codec and container metadata."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        num_frames = sum(1 for _ in container.decode(stream))
        rate = stream.average_rate or stream.guessed_rate
        return VideoInfo(
            num_frames=num_frames,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=float(rate) if rate is not None else 0.0,
            codec=stream.codec_context.name,
            metadata=dict(container.metadata),
        )


def poster_frame_jpeg(path: str | Path, quality: int = 90) -> bytes:
    """The first decoded frame of `path` as JPEG bytes (for thumbnails)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            buffer = io.BytesIO()
            frame.to_image().save(buffer, format="JPEG", quality=quality)
            return buffer.getvalue()
    raise ValueError(f"`path` {str(path)!r} has no decodable video frame.")


def read_frames(path: str | Path) -> Frames:
    """Every frame of `path` as RGB, at its stream's average rate (rounded to whole frames a second)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        pixels = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        rate = stream.average_rate or stream.guessed_rate
    if not pixels:
        raise ValueError(f"`path` {str(path)!r} has no decodable video frame.")
    return Frames(pixels=np.stack(pixels), fps=round(float(rate)) if rate else 16)
