"""The job store's vocabulary: job status (an ordered state machine), the job record, errors, job ids and
the time helpers (timezone-aware UTC; Unix seconds for the API).

Plain Python, no database: the Scheduler, the Ingress and their tests use these without a store.
"""

from __future__ import annotations

import enum
import os
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pipeline.priority import PRIORITIES as PRIORITIES
from pipeline.priority import Priority as Priority
from pipeline.stages import Stage, job_plan, progress_bands, stage, status_row

if TYPE_CHECKING:
    from serve.jobs.request import JobRequest

ApiState = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
EventKind = Literal[
    "created", "claimed", "stage", "progress", "succeeded", "failed", "cancelled", "requeued",
    "checkpoint", "resumed", "retry", "deleted", "review", "chained",
]  # fmt: skip


class JobStatus(enum.IntEnum):
    """Where a job is. Ordered: anything at or after SUCCEEDED is finished, and a job only moves forward,
    except back to QUEUED when a scheduler restart requeues it.

    The values are stored in the database; the gaps leave room for new stages without a migration.
    """

    QUEUED = 0
    # the running statuses: one per row of the stage table (pipeline.stages), its name and stored value
    ENCODING = stage("encode").status_value
    ENCODING_IMAGE = stage("encode_image").status_value
    DENOISING_HIGH = stage("denoise_high").status_value
    DENOISING_LOW = stage("denoise_low").status_value
    DECODING = stage("decode").status_value
    UPSCALING = stage("upscale").status_value
    FINISHING = stage("finish").status_value
    SUCCEEDED = 70
    CANCELLED = 80
    FAILED = 90

    @property
    def is_finished(self) -> bool:
        return self >= JobStatus.SUCCEEDED

    @property
    def is_running(self) -> bool:
        """Claimed by a scheduler and inside the pipeline."""
        return JobStatus.ENCODING <= self < JobStatus.SUCCEEDED

    @property
    def stage_row(self) -> Stage | None:
        """The stage table's row of a job in this status; None while queued or once finished."""
        return status_row(self.name)

    @property
    def api_state(self) -> ApiState:
        """The state the HTTP API shows (the stage itself is exposed separately)."""
        if self is JobStatus.QUEUED:
            return "queued"
        if self.is_running:
            return "in_progress"
        return {
            JobStatus.SUCCEEDED: "completed",
            JobStatus.CANCELLED: "cancelled",
            JobStatus.FAILED: "failed",
        }[self]


RUNNING_STATUSES = tuple(status for status in JobStatus if status.is_running)

# status -> (overall progress when the stage starts, when it ends): what advance() reports when the
# caller gives only `stage_progress`; from the stage table's weights over the plan of a job that runs the
# row (a keyframe encode's band is an I2V job's). 100 only once the clip is stored. The Scheduler gives
# each job's progress over its own plan.
PROGRESS_BANDS: dict[JobStatus, tuple[float, float]] = {
    JobStatus[row.status_name]: (start, min(end, 99))
    for plan in (job_plan(has=frozenset({"keyframes"})), job_plan())
    for row, (start, end) in zip(plan, progress_bands(plan).values(), strict=True)
}


class CancelResult(enum.StrEnum):
    """What cancel() did; the Ingress maps it to 200 / 409 / 404."""

    CANCELLED = "cancelled"
    ALREADY_FINISHED = "already_finished"
    NOT_FOUND = "not_found"


class QueueFull(Exception):
    """create() refused a job because a queue bound is reached; nothing was written (HTTP 429)."""

    def __init__(self, retry_after_s: int, scope: Literal["global", "project"], limit: int) -> None:
        self.retry_after_s = retry_after_s  # a hint for the Retry-After header, in whole seconds
        self.scope = scope  # which bound: all queued jobs, or the queued jobs of the caller's project
        self.limit = limit
        where = "The queue" if scope == "global" else "This project's queue"
        super().__init__(f"{where} is full ({limit} jobs waiting); retry in about {retry_after_s} s.")


class AlreadyPromoted(Exception):
    """create() refused a promotion: the draft was promoted already (or is gone); nothing was written."""

    def __init__(self, source_id: str, promoted_to: str | None) -> None:
        self.source_id, self.promoted_to = source_id, promoted_to
        where = f"to {promoted_to}" if promoted_to else "or deleted"
        super().__init__(f"video {source_id} was already promoted {where}")


class GpuQuotaExceeded(Exception):
    """create() refused a job: the project used its GPU seconds of today (UTC); nothing was written."""

    def __init__(self, project: str, used_s: float, limit_s: float, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s  # until 00:00 UTC, when the day's count starts again
        super().__init__(
            f"project {project!r} used {used_s:.1f} of its {limit_s:g} GPU seconds today; "
            "the quota resets at 00:00 UTC"
        )


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job as stored, detached from the database (a snapshot: re-read it to see changes)."""

    id: str  # "vid_" + 24 hex; sorts by creation time (the paging cursor)
    project: str  # tenant: quotas, fair share and visibility are per project
    priority: Priority  # interactive shots overtake batch backlogs
    request: JobRequest  # what to generate and how to finish it (typed; old rows are upgraded on read)
    bucket: str  # str(Bucket), e.g. "832x480x81": jobs in one bucket can share denoiser batches
    status: JobStatus
    stage_progress: float  # 0..1 within the current stage
    progress: int  # 0..100 overall; never goes down within one attempt
    attempt: int  # number of claims so far; the fence for updates from pipeline tasks
    claimed_by: str | None  # scheduler instance that runs it now (None while queued)
    created_at: datetime  # all timestamps are timezone-aware UTC
    started_at: datetime | None  # first claim
    finished_at: datetime | None
    updated_at: datetime
    timings: dict[str, float]  # stage -> seconds of the latest attempt
    error_code: str | None
    error_message: str | None
    artifact_uri: str | None  # where the finished clip is stored
    artifact_bytes: int | None
    idempotency_key: str | None  # unique per project when set
    labels: dict[str, Any]  # free-form client labels (shot, take, artist)
    seed: int | None  # the seed actually used, reported on success
    deadline: datetime | None  # the scheduler prefers jobs whose deadline is nearest
    storyboard_id: str | None  # groups the shots of one storyboard
    gpu_seconds: float | None  # accelerator seconds spent (denoise, decode, upscale), once finished
    checkpoint_uri: str | None  # denoise state saved at the expert boundary; a rerun resumes from it
    poster_uri: str | None  # key of the clip's JPEG poster frame, stored beside `artifact_uri`
    deleted_at: datetime | None  # a finished job deleted by its owner: hidden, its artifacts removed
    engine_queue_position: int | None  # requests ahead of it while it waits in a stage replica's queue
    promoted_to: str | None  # the final-tier job promoted from this draft
    eta_at: datetime | None  # predicted finish of a running job (re-predicted after each denoise step)
    take: int | None  # number within its board's shot, in creation order (None: a video of no board)
    review: str | None  # approved | rejected | needs-changes; None: pending (serve.jobs.reviews)
    review_by: str | None  # who set the review last (the API key's name)
    review_at: datetime | None  # when
    # a chained take still waiting for its predecessor shot's take: that shot's index (never claimed
    # while set); None once its first keyframe is stored, and for every other job
    continues_shot: int | None = None

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until the running job is predicted to finish (None: finished, queued or not predicted)."""
        if self.eta_at is None or not self.status.is_running:
            return None
        return max(0.0, (self.eta_at - datetime.now(UTC)).total_seconds())

    @property
    def num_ahead_in_engine(self) -> int | None:
        """While running but waiting in a stage replica's queue (the text encoder's line, a denoiser engine
        before its first step, the decoder's or upscaler's line): how many requests are ahead of it; None
        otherwise (a stale value of an ended run is never shown)."""
        return self.engine_queue_position if self.status.is_running else None

    @property
    def waiting_for(self) -> str | None:
        """While running but waiting in a stage replica's queue (the text encoder's line, a denoiser engine,
        the decoder's or the upscaler's line): that stage (`encoding`, `decoding`, ...); `continuity` while
        a chained shot's queued take waits for the take of the shot it continues; None otherwise."""
        if self.continues_shot is not None:
            return "continuity"
        return self.status.name.lower() if self.num_ahead_in_engine is not None else None

    @property
    def stage(self) -> str:
        """The stage the API shows: `queued` while it waits in a stage replica's queue, else its status."""
        return "queued" if self.num_ahead_in_engine is not None else self.status.name.lower()

    @property
    def api_state(self) -> ApiState:
        return self.status.api_state


@dataclass(frozen=True, slots=True)
class InFlight:
    """One job holding a Scheduler slot, as the queue-wait prediction reads it (JobStore.queue_view)."""

    priority: Priority  # its lane
    bucket: str  # what its run costs (the measured run times are per bucket)
    started_at: datetime | None  # its claim
    eta_at: datetime | None  # the Scheduler's prediction of its finish (None: not predicted yet)


@dataclass(frozen=True, slots=True)
class QueueView:
    """What the job store counts for a job still in the job queue: the inputs of its wait, nothing guessed."""

    num_ahead: int  # queued jobs the Scheduler picks before it (JobStore.queue_position)
    ahead_buckets: tuple[str, ...]  # the bucket of each of those jobs, oldest first
    in_flight: tuple[InFlight, ...]  # every job holding a slot now
    run_seconds: dict[str, float]  # bucket -> mean claim-to-finish seconds of its recent succeeded jobs


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """What the claim loop reads of one queued job (JobStore.queued_candidates): the fair-share inputs."""

    id: str
    project: str
    priority: Priority
    created_at: datetime
    deadline: datetime | None


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One entry of a job's event log; ids increase in commit order per job (the streaming cursor)."""

    id: int
    job_id: str
    at: datetime
    kind: EventKind
    data: dict[str, Any]  # kind-specific details, e.g. {"status": "DENOISING_HIGH", "from": "ENCODING", ...}


class _IdClock:
    """Job ids `vid_` + 12 hex of Unix milliseconds + 12 hex of randomness, like a monotonic ULID:
    they sort by creation time, and within one millisecond of one process the random part counts up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = (0, 0)  # (milliseconds, random part) of the previous id
        os.register_at_fork(after_in_child=self._reseed)  # a forked child must not continue our sequence

    def _reseed(self) -> None:
        self._lock = threading.Lock()
        self._last = (0, 0)

    def next_id(self) -> str:
        with self._lock:
            now_ms = time.time_ns() // 1_000_000
            last_ms, last_random = self._last
            if now_ms <= last_ms:  # same millisecond, or the clock stepped back: stay after the last id
                now_ms, random_part = last_ms, last_random + 1
            else:
                random_part = secrets.randbits(47)  # headroom below 2**48 for counting up
            self._last = (now_ms, random_part)
        return f"vid_{now_ms:012x}{random_part:012x}"


new_job_id = _IdClock().next_id


def new_storyboard_id() -> str:
    """`sb_` + the same time-ordered 24 hex as job ids."""
    return "sb_" + new_job_id().removeprefix("vid_")


def utcnow() -> datetime:
    """Now, timezone-aware UTC: every timestamp the store writes."""
    return datetime.now(UTC)


def unix(moment: datetime | None) -> int | None:
    """Whole Unix seconds of `moment` (None stays None): how the API shows every timestamp."""
    return None if moment is None else int(moment.timestamp())
