"""A job's keyframes: the images an image-to-video job starts (and may end) from, stored as PNG artifacts
beside the job's clip (`JobArtifacts.keyframe`), and the last decoded frame of a finished clip that a
chained shot starts from (`JobArtifacts.last_frame`).

Fit rule (stated once, used everywhere): an image is scaled, keeping its aspect ratio, to the smallest
size that covers the job's width x height (Lanczos), then centre-cropped to exactly width x height.
Nothing is stretched; a panel of another aspect ratio loses equal margins on its long side.

Stored keyframes are already fitted, so `load_keyframes` hands the VAE-encode stage uint8 (H, W, 3) RGB
arrays of the job's size, and a retried attempt conditions on the very same pixels. A remixed job gets
its own copy (`copy_keyframes`), so deleting the source job never takes a remix's condition with it.

The condition latents the VAEEncoder makes of them are kept too (`save_condition`, one per job, beside the
keyframes): encoding is a clip-length VAE pass, about as costly as a decode, so a retried attempt reads
the first attempt's condition back (`load_condition`) instead of encoding again. It is stored with the
digest of what it was made from (the keyframes' pixels and the clip length): a condition that does not
match, or cannot be read, is not used, and the keyframes are encoded again.
"""

from __future__ import annotations

import hashlib
import io
import logging
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from serve.storage import ArtifactNotFoundError, ArtifactStore, JobArtifacts, StorageError

logger = logging.getLogger("ray.serve")

Which = Literal["first", "last"]
PNG = "image/png"
CONDITION_FORMAT = 1  # bump when the stored condition's layout changes: older ones are encoded again


def fit_to_size(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` as RGB, scaled to cover width x height and centre-cropped to it (the module's fit rule)."""
    return ImageOps.fit(image.convert("RGB"), (width, height), method=Image.Resampling.LANCZOS)


def save_keyframes(
    store: ArtifactStore,
    project: str,
    job_id: str,
    first: Image.Image | None,
    last: Image.Image | None,
    *,
    size: tuple[int, int] | None = None,
) -> None:
    """Store the job's keyframes as PNG. `size` (width, height): fit each image to it first; None: the
    images are already fitted (the admission path fits them when it validates them)."""
    artifacts = JobArtifacts(project, job_id)
    for which, image in (("first", first), ("last", last)):
        if image is None:
            continue
        if size is not None:
            image = fit_to_size(image, *size)
        store.put_bytes(artifacts.keyframe(which), png_bytes(image), PNG)


def load_keyframes(
    store: ArtifactStore, project: str, job_id: str
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(first, last): uint8 (H, W, 3) RGB arrays of the stored keyframes, None for one the job has none of."""
    artifacts = JobArtifacts(project, job_id)
    return _load(store, artifacts.keyframe("first")), _load(store, artifacts.keyframe("last"))


def copy_keyframes(store: ArtifactStore, project: str, source_job: str, job_id: str) -> None:
    """Give `job_id` the stored keyframes of `source_job` (a remix conditions on the same images)."""
    source, target = JobArtifacts(project, source_job), JobArtifacts(project, job_id)
    for which in ("first", "last"):
        try:
            data = store.read_bytes(source.keyframe(which))
        except ArtifactNotFoundError:
            continue
        store.put_bytes(target.keyframe(which), data, PNG)


def save_last_frame(store: ArtifactStore, project: str, job_id: str, frame: np.ndarray) -> str:
    """Store a clip's last decoded frame (uint8 (H, W, 3), before label, LUT and conform); returns its key."""
    key = JobArtifacts(project, job_id).last_frame
    store.put_bytes(key, png_bytes(Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8))), PNG)
    return key


def load_last_frame(store: ArtifactStore, project: str, job_id: str) -> np.ndarray | None:
    """The stored last decoded frame of a finished job, None if the job stored none."""
    return _load(store, JobArtifacts(project, job_id).last_frame)


def condition_digest(first: np.ndarray, last: np.ndarray | None, num_frames: int) -> str:
    """What a condition is made from: the keyframes' pixels (shape and bytes) and the clip's frame count."""
    digest = hashlib.sha256(f"condition-v{CONDITION_FORMAT} frames={num_frames}".encode())
    for image in (first, last):
        digest.update(b" none" if image is None else f" {image.shape}".encode() + image.tobytes())
    return digest.hexdigest()


def save_condition(
    store: ArtifactStore, project: str, job_id: str, digest: str, condition: np.ndarray
) -> None:
    """Keep job `job_id`'s condition latents (made from the keyframes of `digest`) for its retries."""
    buffer = io.BytesIO()
    np.savez(buffer, condition=condition, digest=np.array(digest))
    store.put_bytes(JobArtifacts(project, job_id).condition, buffer.getvalue(), "application/octet-stream")


def load_condition(store: ArtifactStore, project: str, job_id: str, digest: str) -> np.ndarray | None:
    """The kept condition of job `job_id` if it was made from the keyframes of `digest`; None when there is
    none, it is unreadable or it was made from other keyframes (the caller encodes them again)."""
    key = JobArtifacts(project, job_id).condition
    try:
        data = store.read_bytes(key)
    except ArtifactNotFoundError:
        return None
    except StorageError:
        logger.warning("job %s: its kept condition %s cannot be read", job_id, key, exc_info=True)
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if str(npz["digest"]) != digest:
                logger.warning("job %s: its kept condition is of other keyframes; encoding again", job_id)
                return None
            return npz["condition"]
    except (OSError, ValueError, KeyError) as error:  # not an npz, or fields missing
        logger.warning("job %s: its kept condition %s is unreadable (%s); encoding again", job_id, key, error)
        return None


def png_bytes(image: Image.Image) -> bytes:
    """`image` as RGB PNG bytes (lossless: the decoded frame and the stored condition compare equal)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _load(store: ArtifactStore, key: str) -> np.ndarray | None:
    try:
        data = store.read_bytes(key)
    except ArtifactNotFoundError:
        return None
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
