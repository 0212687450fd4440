"""The typed messages between the Scheduler and the stage deployments (CPU numpy, or object refs for
frames). Every call and every streamed message is one of these dataclasses, never a dict told apart by
its keys."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import ray

from pipeline.spec import Priority, StepCacheSettings
from serve.jobs.request import LutRef
from serve.stages.transfer import PackedState


@dataclass(frozen=True, slots=True)
class DenoiseCall:
    """One job's share of an expert."""

    request_id: str  # job id + attempt: unique per run of a job
    state: PackedState
    prompt: np.ndarray  # (tokens, text_dim) prompt embeddings
    negative_prompt: np.ndarray
    guidance: float
    priority: Priority
    deadline: datetime | None
    quality: str = "final"  # the tier: which solver continues the state
    adapters: tuple[tuple[str, float], ...] = ()  # sorted (name, weight) LoRA adapters of the request
    cache: StepCacheSettings | None = None  # step caching; None: every step runs


@dataclass(frozen=True, slots=True)
class FrameBatch:
    """Decoded frames living in the object store."""

    ref: list[
        ray.ObjectRef
    ]  # one ref to the (frames, height, width, 3) uint8 array; a list so Serve keeps it a ref
    fps: int
    seconds: float  # compute time of the stage that made them


@dataclass(frozen=True, slots=True)
class DenoiseWaiting:
    """Streamed by `denoise` while the request waits in the engine's queue for its first step."""

    num_ahead: int  # requests more urgent than it in the replica's engine (its queue position)


@dataclass(frozen=True, slots=True)
class DenoiseProgress:
    """Streamed by `denoise` after each step of the call's expert."""

    done: int  # steps of this expert done so far
    total: int  # steps this expert runs for the request
    seconds_per_step: float | None = None  # this replica's recent step time for this request (ETA)


@dataclass(frozen=True, slots=True)
class DenoiseDone:
    """The last message of `denoise`: the state after the expert's last step."""

    state: PackedState
    seconds: float  # wall time of the call inside the replica (queueing in the engine included)


DenoiseEvent = DenoiseWaiting | DenoiseProgress | DenoiseDone


@dataclass(frozen=True, slots=True)
class FinishCall:
    """How to finish one clip and where it goes."""

    project: str
    job_id: str
    attempt: int
    seed: int
    look: str
    label: str | None
    metadata: dict[str, str]
    fps: int = 16  # delivered rate: frames at another rate are conformed to it before grading
    lut: LutRef | None = None  # the LUT file of a look that names one (`look` is then its name)


@dataclass(frozen=True, slots=True)
class FinishedClip:
    """The stored clip: what the job row records."""

    uri: str  # the store's URI of the clip (file path or s3://)
    key: str  # its artifact key (JobArtifacts.clip)
    size_bytes: int
    poster_key: str  # the JPEG poster's key (JobArtifacts.poster)
    num_frames: int
    width: int
    height: int
    seconds: float
