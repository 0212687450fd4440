"""A create's keyframes, from what the client sent to checked, fitted PNG bytes ready to store with the job.

Shapes read (the ones the official `openai` package sends for `input_reference`, and the studio's
`keyframes: {first, last}`):

    input_reference = <file>                 a multipart upload (`videos.create(input_reference=open(...))`)
    input_reference = {"image_url": "data:image/png;base64,..."}   a data URL (JSON, or the openai
                                             package's `input_reference[image_url]` form part)
    input_reference = {"file_id": "vid_..."} Previz has no Files API: a file id names a finished video of
                                             the project, whose last decoded frame is the keyframe
    keyframes.first / .last = "data:..." or {"video": "vid_..."}   an image, or that take's last frame

An http(s) `image_url` is refused (`image_url_not_allowed`): the Ingress never fetches a URL for a client.
Each image passes serve.http.images' rules, is fitted to the job's size (serve.jobs.keyframes' rule) and
then shown to the content policy's frame check, all before the job exists; a refusal stores nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from pipeline.safety import FrameCheck, SafetyCheckError
from serve.http.errors import ApiError, safety_unavailable
from serve.http.forms import UploadedFile
from serve.http.images import image_from_data_url, read_image
from serve.http.schemas import KeyframesIn
from serve.jobs import JobRecord, JobStatus, JobStore
from serve.jobs.keyframes import fit_to_size, load_keyframes, load_last_frame, png_bytes
from serve.jobs.request import Keyframes, KeyframeSource
from serve.metrics import record_safety_block
from serve.storage import ArtifactStore

logger = logging.getLogger("ray.serve")

Which = Literal["first", "last"]


@dataclass(frozen=True, slots=True)
class KeyframeInput:
    """One keyframe as the client gave it: an image, or the take whose last frame it is."""

    param: str  # where it sits in the body, for errors (`input_reference`, `shots.2.keyframes.first`)
    image: Image.Image | None = None
    video: str | None = None  # a take: its last decoded frame
    origin: KeyframeSource | None = None  # a remix's or promote's: where the source's keyframe came from


@dataclass(frozen=True, slots=True)
class KeyframeInputs:
    first: KeyframeInput | None = None
    last: KeyframeInput | None = None

    def items(self) -> list[tuple[Which, KeyframeInput]]:
        return [(which, given) for which, given in (("first", self.first), ("last", self.last)) if given]


@dataclass(frozen=True, slots=True)
class CheckedKeyframes:
    """Keyframes ready to store: what the job request records, and the PNG bytes of each."""

    keyframes: Keyframes
    pngs: dict[Which, bytes]  # which -> PNG of the fitted image


def input_reference(value: Any, param: str = "input_reference") -> KeyframeInput | None:
    """The keyframe of OpenAI's `input_reference`, or None when it is absent or empty."""
    if value is None or value == "":
        return None
    if isinstance(value, UploadedFile):
        return KeyframeInput(param, image=read_image(value.data, param))
    if isinstance(value, str):  # a bare URL where the object was meant
        return KeyframeInput(param, image=image_from_data_url(value, param))
    if isinstance(value, dict) and set(value) == {"image_url"} and isinstance(value["image_url"], str):
        return KeyframeInput(param, image=image_from_data_url(value["image_url"], f"{param}.image_url"))
    if isinstance(value, dict) and set(value) == {"file_id"} and isinstance(value["file_id"], str):
        return KeyframeInput(param, video=value["file_id"])
    raise ApiError(
        400,
        "invalid_value",
        f'`{param}` must be an image file, {{"image_url": "data:image/...;base64,..."}} or '
        f'{{"file_id": "<a video id of the project>"}}',
        param,
    )


def keyframe_inputs(
    keyframes: KeyframesIn | None, reference: KeyframeInput | None, prefix: str = ""
) -> KeyframeInputs | None:
    """A create's keyframes: `input_reference` (already read) or `keyframes.first`, and `keyframes.last`.
    Decodes images: call it in a worker thread."""
    given = keyframes or KeyframesIn()
    if reference is not None and given.first is not None:
        raise ApiError(
            400,
            "invalid_value",
            "give the first frame once: `input_reference` or `keyframes.first`, not both",
            f"{prefix}keyframes.first",
        )
    first = reference or keyframe_ref(given.first, f"{prefix}keyframes.first")
    last = keyframe_ref(given.last, f"{prefix}keyframes.last")
    return KeyframeInputs(first, last) if first is not None or last is not None else None


def stored_keyframe_inputs(artifacts: ArtifactStore, source: JobRecord) -> KeyframeInputs | None:
    """The keyframes `source` was admitted with, as inputs of a new job (a remix or promote of it): the
    stored pixels, so the new job starts from the same image even if a referenced take is gone since."""
    recorded = source.request.keyframes
    if recorded is None:
        return None
    first, last = load_keyframes(artifacts, source.project, source.id)
    inputs = {
        which: KeyframeInput("video_id", image=Image.fromarray(pixels), origin=origin)
        for which, pixels, origin in (("first", first, recorded.first), ("last", last, recorded.last))
        if pixels is not None and origin is not None
    }
    return KeyframeInputs(**inputs) if inputs else None


def keyframe_ref(value: Any, param: str) -> KeyframeInput | None:
    """A `keyframes.first` / `.last` (already shaped by the schema): a data URL or `{"video": id}`."""
    if value is None:
        return None
    if isinstance(value, str):
        return KeyframeInput(param, image=image_from_data_url(value, param))
    return KeyframeInput(param, video=value.video)


async def check_keyframes(
    given: KeyframeInputs,
    *,
    project: str,
    size: tuple[int, int],
    store: JobStore,
    artifacts: ArtifactStore,
    frame_check: FrameCheck | None,
) -> CheckedKeyframes:
    """Each keyframe fitted to `size` (width, height) and passed by the frame check; a take reference must
    be a completed video of `project` with a stored last frame. ApiError otherwise, nothing stored."""
    sources: dict[Which, KeyframeSource] = {}
    pngs: dict[Which, bytes] = {}
    for which, keyframe in given.items():
        if keyframe.video is not None:
            pixels = await take_last_frame(keyframe.video, keyframe.param, project, store, artifacts)
            image = Image.fromarray(pixels)
        else:
            assert keyframe.image is not None  # an input is an image or a take, by construction
            image = keyframe.image
        fitted = await asyncio.to_thread(fit_to_size, image, *size)
        await check_frame(frame_check, np.asarray(fitted)[None], keyframe.param)
        data = await asyncio.to_thread(png_bytes, fitted)
        digest = hashlib.sha256(data).hexdigest()
        if keyframe.origin is not None:
            sources[which] = keyframe.origin.model_copy(update={"sha256": digest})
        else:
            kind = "take" if keyframe.video is not None else "image"
            sources[which] = KeyframeSource(kind=kind, video=keyframe.video, sha256=digest)
        pngs[which] = data
    return CheckedKeyframes(Keyframes(**sources), pngs)


async def take_last_frame(
    video_id: str, param: str, project: str, store: JobStore, artifacts: ArtifactStore
) -> np.ndarray:
    """The stored last frame of a finished take of `project`: 400 `invalid_take_reference` for a video of
    no take here (another project's reads as none), `take_not_finished` before it completed."""
    job = await asyncio.to_thread(store.get, video_id, project=project)
    if job is None:
        raise ApiError(
            400,
            "invalid_take_reference",
            f"`{param}` names {video_id!r}, which is no video of project {project!r}",
            param,
        )
    if job.status != JobStatus.SUCCEEDED:
        raise ApiError(
            400,
            "take_not_finished",
            f"`{param}` names video {video_id}, which is {job.status.api_state}; a take's last frame exists "
            "once it completed (a storyboard shot can wait for it with `continue`)",
            param,
        )
    frame = await asyncio.to_thread(load_last_frame, artifacts, job.project, job.id)
    if frame is None:
        raise ApiError(
            400,
            "take_not_finished",
            f"`{param}` names video {video_id}, which has no stored last frame (it finished before frames "
            "were kept, or its files were deleted)",
            param,
        )
    return frame


async def check_frame(frame_check: FrameCheck | None, pixels: np.ndarray, param: str) -> None:
    """The content policy's frame check on a keyframe: 422 `content_blocked` (fails closed: 503)."""
    if frame_check is None:
        return
    try:
        verdict = await asyncio.to_thread(frame_check.check, pixels)
    except SafetyCheckError:
        logger.exception("the frame check failed on a keyframe; refusing the request")
        raise safety_unavailable(param) from None
    if verdict is not None:
        record_safety_block("keyframe", verdict.category)
        raise ApiError(
            422,
            "content_blocked",
            f"the keyframe image was blocked by the content policy (category `{verdict.category}`); "
            "nothing was queued",
            param,
            category=verdict.category,
        )
