"""What every stage deployment shares: its Serve options and how it loads its part of the model (with
deterministic kernels switched on first, so a take repeats bit for bit: pipeline.determinism)."""

from __future__ import annotations

from typing import Any

from pipeline.determinism import use_deterministic_kernels
from pipeline.weights import WanComponents, load_components
from serve.config import PrevizArgs

# Minute-long work: let in-flight calls finish on shutdown, and give slow model loads time.
STAGE_OPTIONS: dict[str, Any] = dict(
    graceful_shutdown_timeout_s=600,
    graceful_shutdown_wait_loop_s=2,
    health_check_period_s=10,
    health_check_timeout_s=60,
)


def all_calls_options(args: PrevizArgs) -> dict[str, Any]:
    """The Serve options of a stage after the denoiser (decoder, upscaler, finisher): a replica takes every
    call the Scheduler can have in flight, so no call waits unseen in Serve's router queue; it waits in the
    replica instead, in a line that counts it (serve.stages.turns), or runs at once (the finisher)."""
    return {"max_ongoing_requests": max(8, args.max_jobs_in_flight)}


def gpu_options(args: PrevizArgs) -> dict[str, Any]:
    """The Serve options of a stage that runs on an accelerator: one GPU where the app runs on CUDA."""
    return {"ray_actor_options": {"num_gpus": 1}} if args.device == "cuda" else {}


def stage_components(args: PrevizArgs, *parts: str) -> WanComponents:
    """Only the networks a stage needs: real experts are 28.6 GB each, so a VAE replica must not load them."""
    use_deterministic_kernels()  # before the first CUDA op of the replica's process
    return load_components(
        args.model, model=args.sampling, device=args.device, cache_dir=args.model_cache_dir, parts=parts
    )
