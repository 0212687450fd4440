"""The typed messages between the Scheduler and the stage deployments. Every call and every streamed
message is one of these dataclasses, never a dict told apart by its keys.

Tensors travel as object refs from the stage that made them to the stage that needs them (embeddings:
TextEncoder -> both experts; denoise state: high-noise -> low-noise expert -> VAEDecoder, where the
colocated Denoiser keeps it in memory at the boundary; frames: decoder -> upscaler -> Finisher); the
Scheduler passes the refs on and sees only their sizes. A ref is held in a one-element list, so Serve
passes it through instead of resolving it as an argument. A ref lives as long as the replica that
`ray.put` it: if that replica is lost, the stage that needs the ref fails with an ObjectLostError, which
the Scheduler treats like a lost replica (serve.scheduling.faults.REPLICA_LOST): the job is requeued once
the expert-boundary checkpoint in flight has landed, and its rerun resumes from that checkpoint (or starts
over without one).

A ref yielded by a streaming call (the denoisers' DenoiseDone) is also kept by its maker for REF_HOLD_S
(RefHold): a unary return keeps a nested ref alive until the caller has borrowed it, a Serve stream does
not, and a low-noise call that ended right after its yield lost its state to Ray's reference counting
before the Scheduler had borrowed it (ReferenceCountingAssertionError in the VAEDecoder, about 1 job in 6)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from datetime import datetime

import ray

from pipeline.spec import StepCacheSettings
from serve.jobs.cuts import CutRequest
from serve.jobs.models import Priority
from serve.jobs.request import LutRef
from serve.jobs.storyboard import CutRecord
from serve.stages.transfer import PackedState

REF_HOLD_S = 60.0  # how long a streamed ref's maker keeps it: the Scheduler borrows it within milliseconds


class RefHold:
    """Refs a replica made and streamed out, kept alive for `seconds` so the receiver can borrow them."""

    def __init__(self, seconds: float = REF_HOLD_S) -> None:
        self.seconds = seconds
        self._held: dict[int, list[ray.ObjectRef]] = {}
        self._keys = itertools.count()

    def keep(self, ref: list[ray.ObjectRef]) -> list[ray.ObjectRef]:
        """`ref`, held until `seconds` from now (call from the replica's event loop)."""
        key = next(self._keys)
        self._held[key] = ref
        asyncio.get_running_loop().call_later(self.seconds, self._held.pop, key, None)
        return ref

    def __len__(self) -> int:
        return len(self._held)


@dataclass(frozen=True, slots=True)
class EmbedsRef:
    """Prompt embeddings in the object store, owned by the TextEncoder replica that made them."""

    ref: list[ray.ObjectRef]  # one ref to the (tokens, text_dim) float32 array
    nbytes: int  # its size, for the Scheduler's books


@dataclass(frozen=True, slots=True)
class StateRef:
    """A denoise state (PackedState) in the object store, owned by the denoiser replica that made it."""

    ref: list[ray.ObjectRef]  # one ref to the PackedState
    step_index: int  # steps of the request done in it
    nbytes: int  # the arrays' size, for the Scheduler's books


@dataclass(frozen=True, slots=True)
class InitialNoise:
    """Where a request's denoising starts: the noise its seed draws, made by the replica that runs it."""

    seed: int
    shape: tuple[int, int, int, int]  # (channels, latent_frames, latent_height, latent_width)
    num_steps: int
    step_index: int = 0  # a request starting from noise has done no steps


@dataclass(frozen=True, slots=True)
class EncodeImageCall:
    """The keyframe encode of one I2V job: the VAEEncoder reads the job's stored keyframes itself
    (serve.jobs.keyframes), so no image passes through the Scheduler."""

    project: str
    job_id: str
    num_frames: int  # of the clip: the condition covers all of them


@dataclass(frozen=True, slots=True)
class ConditionRef:
    """An I2V job's condition (mask + keyframe latents) in the object store, owned by the VAEEncoder
    replica that made it; both experts fetch it."""

    ref: list[ray.ObjectRef]  # one ref to the (20, latent_frames, latent_height, latent_width) float32 array
    nbytes: int  # its size, for the Scheduler's books
    seconds: float  # the encode's compute time


@dataclass(frozen=True, slots=True)
class DenoiseCall:
    """One job's share of an expert."""

    request_id: str  # job id + attempt: unique per run of a job
    state: InitialNoise | StateRef | PackedState  # PackedState: read back from a checkpoint
    prompt: EmbedsRef
    negative_prompt: EmbedsRef
    guidance: float
    priority: Priority
    deadline: datetime | None
    quality: str = "final"  # the tier: which solver continues the state
    adapters: tuple[tuple[str, float], ...] = ()  # sorted (name, weight) LoRA adapters of the request
    cache: StepCacheSettings | None = None  # step caching; None: every step runs
    checkpoint_key: str | None = None  # where to save the state at the expert boundary (none for drafts)
    # The colocated Denoiser runs both experts in one call: `guidance` is then the high-noise expert's CFG
    # scale and this the low-noise one's. None: a call to one expert's deployment (the split layout).
    guidance_low: float | None = None
    condition: ConditionRef | None = None  # an I2V job's condition (the VAEEncoder's); None: T2V


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
    """Streamed by `denoise` while the request waits in the engine's queue for its first step
    (pipeline.denoise.engine.QueuePlace, as the engine counted and measured it)."""

    num_ahead: int  # requests more urgent than it in the replica's engine (its queue position)
    seconds_ahead: float | None = None  # their queued work at the replica's measured rate; None: unmeasured
    seconds_per_step: float | None = None  # one step of its bucket here, measured; None: unmeasured


@dataclass(frozen=True, slots=True)
class DenoiseProgress:
    """Streamed by `denoise` after each step of the call's expert."""

    done: int  # steps of this expert done so far
    total: int  # steps this expert runs for the request
    seconds_per_step: float | None = None  # this replica's recent step time for this request (ETA)


@dataclass(frozen=True, slots=True)
class DenoiseBoundary:
    """Streamed by the colocated Denoiser when the request's high-noise steps are done: its low-noise
    steps follow in the same call, on the same replica (no state leaves it). The DenoiseProgress after it
    count the low-noise expert's steps."""

    step_index: int  # steps of the request done at the boundary (where a resumed run starts)
    seconds: float  # wall time of the call's high-noise part inside the replica (queueing included)


@dataclass(frozen=True, slots=True)
class DenoiseDone:
    """Streamed by `denoise` after the expert's last step: the state, for the next stage to fetch."""

    state: StateRef
    seconds: float  # wall time of the call inside the replica (queueing in the engine included); for the
    # colocated Denoiser, of its low-noise part (from DenoiseBoundary on)


@dataclass(frozen=True, slots=True)
class CheckpointSaved:
    """The last message of a call with a `checkpoint_key`, after DenoiseDone: the state is stored there.
    (The colocated Denoiser streams it as soon as the write lands: between its low-noise steps, or last.)"""

    key: str
    step_index: int


@dataclass(frozen=True, slots=True)
class CheckpointFailed:
    """The last message of a call whose checkpoint could not be stored (a rerun then starts over)."""

    key: str
    reason: str


DenoiseEvent = (
    DenoiseWaiting | DenoiseProgress | DenoiseBoundary | DenoiseDone | CheckpointSaved | CheckpointFailed
)


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


@dataclass(frozen=True, slots=True)
class CutCall:
    """Render one cut job (the Finisher's `render_cut`): which cut, where its files go, what is in it."""

    cut_id: str
    attempt: int  # the cut job's attempt: part of its files' names (the Scheduler fences what it records)
    project: str
    storyboard_id: str
    request: CutRequest


@dataclass(frozen=True, slots=True)
class CutProgress:
    """`done` of `total` shots of the cut are rendered and stored; `seconds` since the render began."""

    done: int
    total: int
    seconds: float


@dataclass(frozen=True, slots=True)
class CutRendered:
    """The cut is stored (every file under its keys): what the board records."""

    cut: CutRecord
    seconds: float


CutEvent = CutProgress | CutRendered
