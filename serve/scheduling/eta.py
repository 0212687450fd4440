"""When will a running job finish? Re-predicted after each denoising step, from measurements only.

The denoise part is the job's steps still to run (both experts) times the step time its replica measured
for the job itself over the last iterations it took part in (DenoiseProgress.seconds_per_step: the wall
time of a whole batched iteration, so a busy replica predicts slower steps; a step its cache skipped
counts at what that iteration cost, so a caching job predicts the mix it is getting). What follows the
denoiser (decode, upscale, finish) is the mean of what this Scheduler measured for the same bucket, tier
and upscale; a stage never measured yet counts 0, so an early prediction is optimistic, never padded.

A job waiting for the text encoder (its first stage) is predicted from the encoder's own count: the
seconds until its embeddings (the forwards ahead and its own at the replica's measured forward time), then
the rest of the job as this Scheduler measured it for the same key (`AFTER_ENCODE`: from the embeddings to
the stored clip of recent successes); with that never measured, no prediction.
"""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime, timedelta

from pipeline.stages import after

AFTER_DENOISE = tuple(row.name for row in after("denoise_low"))  # the stages timed after the denoiser
AFTER_ENCODE = "after_encode"  # measured: a successful attempt's seconds from its embeddings to its clip
WINDOW = 16  # finished stages each mean looks back over

# (width x height x frames bucket, quality, upscale): what a job's later stages cost
StageKey = tuple[str, str, str]


class EtaModel:
    """Stage times measured by this Scheduler, and the predictions made from them."""

    def __init__(self) -> None:
        self._seconds: dict[tuple[StageKey, str], deque[float]] = {}  # (key, stage) -> recent seconds

    def observe(self, key: StageKey, stage: str, seconds: float) -> None:
        """A finished stage of a job with `key` took `seconds`."""
        self._seconds.setdefault((key, stage), deque(maxlen=WINDOW)).append(seconds)

    def after_denoise_s(self, key: StageKey) -> float:
        """Predicted seconds of the stages after the denoiser (0 for a stage not measured yet)."""
        total = 0.0
        for stage in AFTER_DENOISE:
            recent = self._seconds.get((key, stage))
            if recent:
                total += sum(recent) / len(recent)
        return total

    def predict_from(
        self, key: StageKey, stage: str, *, num_ahead: int, now: datetime | None = None
    ) -> datetime:
        """When a job that waits for stage `stage` (after the denoiser) with `num_ahead` calls before it
        finishes: those calls and its own at the stage's mean, then the stages after it (unmeasured: 0)."""
        now = now or datetime.now(UTC)
        later = AFTER_DENOISE[AFTER_DENOISE.index(stage) :]
        seconds = sum(self._mean(key, name) for name in later) + num_ahead * self._mean(key, stage)
        return now + timedelta(seconds=seconds)

    def predict_encode_wait(
        self, key: StageKey, *, seconds_left: float, now: datetime | None = None
    ) -> datetime | None:
        """When a job waiting for the text encoder, its embeddings `seconds_left` away, finishes: then the
        rest of the job at its measured mean (None: never measured for `key`)."""
        if not self._seconds.get((key, AFTER_ENCODE)):
            return None
        now = now or datetime.now(UTC)
        return now + timedelta(seconds=seconds_left + self._mean(key, AFTER_ENCODE))

    def _mean(self, key: StageKey, stage: str) -> float:
        recent = self._seconds.get((key, stage))
        return sum(recent) / len(recent) if recent else 0.0

    def predict(
        self,
        key: StageKey,
        *,
        steps_left: int,
        seconds_per_step: float,
        wait_s: float = 0.0,
        now: datetime | None = None,
    ) -> datetime:
        """When the job finishes: `wait_s` (the work queued before its next step, where it waits), its
        steps left at the measured step time, then the later stages."""
        now = now or datetime.now(UTC)
        seconds = wait_s + max(0, steps_left) * seconds_per_step + self.after_denoise_s(key)
        return now + timedelta(seconds=seconds)
