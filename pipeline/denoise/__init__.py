"""Denoising: per-request solver state, the single-request Denoiser and the batching engine."""

from pipeline.denoise.batching import RequestStatus, ScheduledRequest, StepBatch, StepScheduler
from pipeline.denoise.denoiser import Denoiser, expert_for
from pipeline.denoise.engine import (
    DenoiseEngine,
    EngineError,
    EngineRequest,
    EngineShutdown,
    EngineStats,
    RequestCancelled,
    RequestFailed,
)
from pipeline.denoise.state import DenoiseState, initial_state

__all__ = [
    "DenoiseEngine",
    "DenoiseState",
    "Denoiser",
    "EngineError",
    "EngineRequest",
    "EngineShutdown",
    "EngineStats",
    "RequestCancelled",
    "RequestFailed",
    "RequestStatus",
    "ScheduledRequest",
    "StepBatch",
    "StepScheduler",
    "expert_for",
    "initial_state",
]
