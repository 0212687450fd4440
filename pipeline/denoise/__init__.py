"""Denoising: per-request solver state, the batching engine, the single-request Denoiser that drives it,
the step runners that run its plans on one device or a rank group (runner, parallel)."""

from pipeline.denoise.batching import RequestStatus, ScheduledRequest, StepBatch, StepScheduler
from pipeline.denoise.denoiser import Denoiser
from pipeline.denoise.engine import (
    DenoiseEngine,
    EngineError,
    EngineRequest,
    EngineShutdown,
    EngineStats,
    QueuePlace,
    RequestCancelled,
    RequestFailed,
)
from pipeline.denoise.experts import expert_for
from pipeline.denoise.parallel import (
    GroupRunner,
    ParallelDegree,
    ShardedForward,
    ShardGroup,
    ShardGroupError,
    allowed_sizes,
    shape_problem,
    worker_loop,
)
from pipeline.denoise.runner import Holding, LocalRunner, StepPlan, StepRunner
from pipeline.denoise.state import DenoiseState, initial_state

__all__ = [
    "DenoiseEngine",
    "DenoiseState",
    "Denoiser",
    "EngineError",
    "EngineRequest",
    "EngineShutdown",
    "EngineStats",
    "GroupRunner",
    "Holding",
    "LocalRunner",
    "ParallelDegree",
    "QueuePlace",
    "RequestCancelled",
    "RequestFailed",
    "RequestStatus",
    "ScheduledRequest",
    "ShardGroup",
    "ShardGroupError",
    "ShardedForward",
    "StepBatch",
    "StepPlan",
    "StepRunner",
    "StepScheduler",
    "allowed_sizes",
    "expert_for",
    "initial_state",
    "shape_problem",
    "worker_loop",
]
