"""The denoiser deployments: one expert each with its step-level batching engine, bound twice
(HighNoiseDenoiser, LowNoiseDenoiser); the bucket-affinity router sends same-shape calls to one replica."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import ray
import torch
from ray import serve
from ray.serve.config import RequestRouterConfig

from pipeline.denoise.calibration import calibration_curve
from pipeline.denoise.engine import DenoiseEngine, EngineRequest, EngineStats
from pipeline.denoise.fp8 import quantize_fp8
from pipeline.denoise.kernels import compile_blocks, warm_up
from pipeline.denoise.runner import plain_forward
from pipeline.denoise.state import DenoiseState, initial_noise, tier_solvers
from serve.config import PrevizArgs
from serve.metrics import ReplicaReporter
from serve.scheduling.checkpoints import write_checkpoint
from serve.sharding import DEPLOYMENT_NAMES, Expert, placement_options
from serve.stages.autoscaling import QUEUED_WORK_METRIC
from serve.stages.common import STAGE_OPTIONS, gpu_options
from serve.stages.payloads import (
    CheckpointFailed,
    CheckpointSaved,
    DenoiseCall,
    DenoiseDone,
    DenoiseEvent,
    DenoiseProgress,
    DenoiseWaiting,
    InitialNoise,
    RefHold,
    StateRef,
)
from serve.stages.router import replica_routing_stats
from serve.stages.shard_worker import RankGroup, expert_adapters, load_expert
from serve.stages.transfer import PackedState, pack_state, state_nbytes, unpack_embeds, unpack_state
from serve.storage import ArtifactStore, StorageError, make_store

ROUTING_STATS_PERIOD_S = 1.0  # how stale a replica's queued work may be at the router (Serve's default: 10)
MAX_ONGOING_CALLS = 256  # a denoiser replica's Serve limit, far above the Scheduler's usual slots (8-96)


def max_ongoing_calls(args: PrevizArgs) -> int:
    """A denoiser replica's `max_ongoing_requests`: every call the Scheduler can have in flight (a job has
    one per expert at a time), since the load-aware router may send them all to one replica. Past it calls
    would wait in Serve's FIFO queue, where an interactive shot's priority does not act."""
    return max(MAX_ONGOING_CALLS, args.max_jobs_in_flight)


def bucket_router(args: PrevizArgs) -> RequestRouterConfig:
    """The load-aware bucket router with this deployment's load bound (`routing.load_factor`)."""
    return RequestRouterConfig(
        request_router_class="serve.stages.router:BucketAffinityRouter",
        request_router_kwargs={"load_factor": args.routing.load_factor},
        request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
        request_routing_stats_timeout_s=5 * ROUTING_STATS_PERIOD_S,
    )


def default_options(args: PrevizArgs, expert: Expert) -> dict[str, Any]:
    placement = placement_options(args.experts.of(expert).parallel, args.device)
    return {
        "name": DEPLOYMENT_NAMES[expert],
        "request_router_config": bucket_router(args),
        "max_ongoing_requests": max_ongoing_calls(args),
        **gpu_options(args),
        **placement,
    }


@serve.deployment(max_ongoing_requests=MAX_ONGOING_CALLS, **STAGE_OPTIONS)
class DenoiserDeployment:
    """One expert with its step-level batching engine; bound twice (HighNoiseDenoiser, LowNoiseDenoiser)."""

    def __init__(self, args: PrevizArgs, expert: Expert) -> None:
        parts, transformer = load_expert(args, expert)
        model, settings = parts.model, args.experts.of(expert)
        bank = expert_adapters(args, expert, transformer)  # before a rank group shards the model
        # A sharded replica is rank 0 of a rank group: the engine plans on it, every rank runs each step
        # with the same adapters and its own shard of the step caches.
        self.ranks = (
            RankGroup(
                args,
                (expert,),
                {expert: transformer},
                {expert: bank},
                name=serve.get_replica_context().replica_id.to_full_id_str(),
            )
            if settings.parallel.degree.is_sharded
            else None
        )
        self.engine = DenoiseEngine(
            transformer,
            parts.scheduler,
            expert=expert,
            boundary_ratio=model.boundary_ratio,
            max_sequence_length=model.max_sequence_length,
            max_num_tokens=args.engine.max_num_tokens,
            max_batch_size=args.engine.max_batch_size,
            runner=self.ranks.runner if self.ranks is not None else None,
            solvers=tier_solvers(model, parts.scheduler),
            adapters=bank,
            cache_curve=calibration_curve(args.model, model, parts.task),
        )
        if settings.fp8:  # after the adapters (peft wraps nn.Linear only); refused without FP8 tensor cores
            quantize_fp8(self.engine.transformer, self.engine.device)
        if settings.compile:  # after the engine made its layers batch-invariant: compile what runs
            compile_blocks(self.engine.transformer)
        shapes = [bucket.latent_shape(model, transformer.config.in_channels) for bucket in settings.warmup]
        forward = plain_forward(self.engine.runner, expert)  # every rank
        warm_up(forward, self.engine.transformer, shapes, model.max_sequence_length)
        self.engine.start()
        self._metrics = ReplicaReporter(self.engine).start()
        self.artifacts = make_store(args.storage)  # the expert-boundary checkpoints a call asks for
        self._streamed = RefHold()  # the states this replica streamed out, until the Scheduler borrows them

    async def denoise(self, call: DenoiseCall, bucket: str) -> AsyncIterator[DenoiseEvent]:
        """Streams a DenoiseWaiting while the request queues for its first step (each time its place
        changes), a DenoiseProgress per step, then one DenoiseDone with a ref to the state (owned by this
        replica); with a `checkpoint_key`, it then stores the state there and ends with CheckpointSaved or
        CheckpointFailed, so the next expert starts without waiting for the write.

        The embeddings and a StateRef are fetched from the replicas that made them; one whose replica is
        gone raises ObjectLostError (the Scheduler requeues the job).
        `bucket` is read by the BucketAffinityRouter so same-shape calls meet on one replica.
        """
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[DenoiseWaiting | DenoiseProgress] = asyncio.Queue()

        def report(update: DenoiseWaiting | DenoiseProgress) -> None:  # on the engine thread
            loop.call_soon_threadsafe(updates.put_nowait, update)

        started = time.perf_counter()
        start, prompt, negative, condition = await asyncio.gather(
            start_state(call.state), call.prompt.ref[0], call.negative_prompt.ref[0], fetch_condition(call)
        )
        engine, bucket_shape = self.engine, tuple(start.latents.shape)

        def progress(done: int, total: int) -> None:
            seconds = engine.seconds_per_step(bucket_shape, call.quality, call.request_id)
            report(DenoiseProgress(done=done, total=total, seconds_per_step=seconds))

        request = EngineRequest(
            request_id=call.request_id,
            state=start,
            prompt=unpack_embeds(prompt),
            negative_prompt=unpack_embeds(negative),
            guidance=call.guidance,
            priority=call.priority,
            deadline=engine_deadline(call.deadline, self.engine.clock),
            quality=call.quality,
            adapters=tuple(call.adapters),
            on_progress=progress,
            on_waiting=lambda place: report(
                DenoiseWaiting(place.num_ahead, place.seconds_ahead, place.seconds_per_step)
            ),
            cache=call.cache,
            condition=condition,
        )
        result = self.engine.add(request)
        try:
            while not result.done():
                waiter = asyncio.ensure_future(updates.get())
                await asyncio.wait({waiter, result}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    yield waiter.result()
                else:
                    waiter.cancel()
            while not updates.empty():  # the last steps' updates, the final one included
                yield updates.get_nowait()
            packed = pack_state(result.result())
            state = stream_state(self._streamed, packed)
            yield DenoiseDone(state=state, seconds=time.perf_counter() - started)
        finally:
            if not result.done():  # the caller went away (cancel, scheduler restart): free the slot
                self.engine.cancel(call.request_id)
        if call.checkpoint_key is not None:
            yield await save_checkpoint(self.artifacts, call.checkpoint_key, packed)

    def stats(self, bucket: str | None = None) -> tuple[str, EngineStats]:
        """(replica id, engine stats). Given a `bucket`, the router sends this to that bucket's replica."""
        return serve.get_replica_context().replica_id.unique_id, self.engine.stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom-metrics hook: the queued work that QueuedWorkPolicy scales on."""
        return {QUEUED_WORK_METRIC: replica_routing_stats([self.engine.stats()]).queued_work_seconds}

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve's routing-stats hook: this replica's queued work, read by the BucketAffinityRouter."""
        return replica_routing_stats([self.engine.stats()]).as_dict()

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError(f"the {self.engine.expert} engine thread has stopped")
        if self.ranks is not None:
            self.ranks.check()

    def __del__(self) -> None:
        reporter = getattr(self, "_metrics", None)
        if reporter is not None:
            reporter.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=5)
        ranks = getattr(self, "ranks", None)
        if ranks is not None:
            ranks.close()


def stream_state(streamed: RefHold, packed: PackedState) -> StateRef:
    """A ref to `packed` in this replica's object store, held until the Scheduler borrows it."""
    return StateRef(
        ref=streamed.keep([ray.put(packed)]), step_index=packed.step_index, nbytes=state_nbytes(packed)
    )


async def start_state(state: InitialNoise | StateRef | PackedState) -> DenoiseState:
    """The state a call starts from: fresh noise drawn here, another replica's state fetched from the
    object store, or a checkpoint's state the Scheduler read back."""
    match state:
        case InitialNoise(seed=seed, shape=shape, num_steps=num_steps):
            return initial_noise(seed, shape, num_steps)
        case StateRef(ref=ref):
            return unpack_state(await ref[0])
        case PackedState():
            return unpack_state(state)


async def fetch_condition(call: DenoiseCall) -> torch.Tensor | None:
    """An I2V call's condition, fetched from the VAEEncoder replica that made it; None for T2V."""
    if call.condition is None:
        return None
    return torch.from_numpy(await call.condition.ref[0])


async def save_checkpoint(artifacts: ArtifactStore, key: str, state: PackedState) -> DenoiseEvent:
    """Store the expert-boundary checkpoint (best effort: without it a rerun starts from scratch)."""
    try:
        await asyncio.to_thread(write_checkpoint, artifacts, key, state)
    except StorageError as error:
        return CheckpointFailed(key=key, reason=str(error))
    return CheckpointSaved(key=key, step_index=state.step_index)


def engine_deadline(deadline: datetime | None, clock: Callable[[], float]) -> float | None:
    """A call's wall-clock deadline on the engine's clock (monotonic by default); None: no deadline."""
    if deadline is None:
        return None
    return clock() + (deadline.timestamp() - time.time())
