"""The colocated denoiser deployment (`experts.layout: colocated`): ONE deployment, `Denoiser`, holding both
experts on every replica (on every rank of its group when sharded), serving a job's high-noise steps then
its low-noise steps in one streamed call with no hop between deployments.

Each replica runs a ColocatedEngine (pipeline.denoise.colocated): a DenoiseEngine per expert with its own
adapters and step caches, driven on one engine thread, each iteration running the expert of the most
urgent request. At the boundary the state stays in the replica; the replica writes the expert-boundary
checkpoint from it in the background (a tier that checkpoints: the call carries `checkpoint_key`) while the
low-noise steps go on, and streams the write's outcome as soon as it lands. The bucket-affinity router
sends same-shape calls to one replica, as for the split pair.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from diffusers import WanTransformer3DModel
from ray import serve

from pipeline.denoise.adapters import AdapterBank
from pipeline.denoise.calibration import calibration_curve
from pipeline.denoise.colocated import ColocatedEngine, ColocatedRequest
from pipeline.denoise.engine import DenoiseEngine, EngineStats
from pipeline.denoise.experts import Expert
from pipeline.denoise.fp8 import quantize_fp8
from pipeline.denoise.kernels import compile_blocks, warm_up
from pipeline.denoise.runner import StepRunner, plain_forward
from pipeline.denoise.state import DenoiseState, tier_solvers
from pipeline.stages import COLOCATED_DEPLOYMENT
from pipeline.weights import WanComponents
from serve.config import PrevizArgs
from serve.metrics import ReplicaReporter
from serve.sharding import placement_options
from serve.stages.autoscaling import QUEUED_WORK_METRIC
from serve.stages.common import STAGE_OPTIONS, gpu_options
from serve.stages.denoiser import (
    MAX_ONGOING_CALLS,
    bucket_router,
    engine_deadline,
    fetch_condition,
    max_ongoing_calls,
    save_checkpoint,
    start_state,
    stream_state,
)
from serve.stages.payloads import (
    DenoiseBoundary,
    DenoiseCall,
    DenoiseDone,
    DenoiseEvent,
    DenoiseProgress,
    DenoiseWaiting,
    RefHold,
)
from serve.stages.router import replica_routing_stats
from serve.stages.shard_worker import RankGroup, expert_adapters, load_expert
from serve.stages.transfer import pack_state, unpack_embeds
from serve.storage import make_store

EXPERTS: tuple[Expert, Expert] = ("high", "low")


def default_options(args: PrevizArgs) -> dict[str, Any]:
    """One GPU per rank (both experts on each), a placement group when sharded, the bucket router."""
    placement = placement_options(args.experts.high.parallel, args.device)  # == low's (the config checks)
    return {
        "name": COLOCATED_DEPLOYMENT,
        "request_router_config": bucket_router(args),
        "max_ongoing_requests": max_ongoing_calls(args),
        **gpu_options(args),
        **placement,
    }


@serve.deployment(max_ongoing_requests=MAX_ONGOING_CALLS, **STAGE_OPTIONS)
class ColocatedDenoiserDeployment:
    """Both experts with one engine thread; bound once, as `Denoiser`."""

    def __init__(self, args: PrevizArgs) -> None:
        loaded = {expert: load_expert(args, expert) for expert in EXPERTS}
        banks = {expert: expert_adapters(args, expert, loaded[expert][1]) for expert in EXPERTS}  # pre-shard
        # A sharded replica is rank 0 of ONE rank group holding both experts on every rank (the plan each
        # engine sends names its expert); its engines plan here, every rank runs each step.
        self.ranks = (
            RankGroup(
                args,
                EXPERTS,
                {expert: transformer for expert, (_, transformer) in loaded.items()},
                banks,
                name=serve.get_replica_context().replica_id.to_full_id_str(),
            )
            if args.experts.high.parallel.degree.is_sharded
            else None
        )
        runner = self.ranks.runner if self.ranks is not None else None  # None: each engine's LocalRunner
        engines = {
            expert: expert_engine(args, expert, *loaded[expert], banks[expert], runner) for expert in EXPERTS
        }
        self.engine = ColocatedEngine(engines["high"], engines["low"])
        self.engine.start()
        self._metrics = [ReplicaReporter(engine).start() for engine in engines.values()]  # one per expert
        self.artifacts = make_store(args.storage)  # the expert-boundary checkpoints a call asks for
        self._streamed = RefHold()  # the states this replica streamed out, until the Scheduler borrows them

    async def denoise(self, call: DenoiseCall, bucket: str) -> AsyncIterator[DenoiseEvent]:
        """Streams what the split pair's two calls stream, in one call: DenoiseWaiting while the request
        queues, a DenoiseProgress per high-noise step, DenoiseBoundary when those are done, a DenoiseProgress
        per low-noise step, then DenoiseDone with a ref to the state (owned by this replica). With a
        `checkpoint_key`, the state at the boundary is stored there in the background and CheckpointSaved
        or CheckpointFailed is streamed as soon as the write lands (between low-noise steps, or last).

        A state already past the boundary (resumed from a checkpoint) runs its low-noise steps only, with
        no DenoiseBoundary. `bucket` is read by the BucketAffinityRouter.
        """
        if call.guidance_low is None:
            raise ValueError(
                f"request {call.request_id!r}: a call to the colocated Denoiser needs `guidance_low` (the "
                "low-noise expert's CFG scale) besides `guidance`."
            )
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[DenoiseWaiting | DenoiseProgress | _Crossed] = asyncio.Queue()

        def report(update: DenoiseWaiting | DenoiseProgress | _Crossed) -> None:  # on the engine thread
            loop.call_soon_threadsafe(updates.put_nowait, update)

        started = time.perf_counter()
        start, prompt, negative, condition = await asyncio.gather(
            start_state(call.state), call.prompt.ref[0], call.negative_prompt.ref[0], fetch_condition(call)
        )
        engine, bucket_shape = self.engine, tuple(start.latents.shape)

        def progress(expert: Expert, done: int, total: int) -> None:
            seconds = engine.seconds_per_step(expert, bucket_shape, call.quality, call.request_id)
            report(DenoiseProgress(done=done, total=total, seconds_per_step=seconds))

        request = ColocatedRequest(
            request_id=call.request_id,
            state=start,
            prompt=unpack_embeds(prompt),
            negative_prompt=unpack_embeds(negative),
            guidance_high=call.guidance,
            guidance_low=call.guidance_low,
            priority=call.priority,
            deadline=engine_deadline(call.deadline, engine.clock),
            quality=call.quality,
            adapters=tuple(call.adapters),
            cache=call.cache,
            on_progress=progress,
            on_waiting=lambda place: report(
                DenoiseWaiting(place.num_ahead, place.seconds_ahead, place.seconds_per_step)
            ),
            on_boundary=lambda state: report(_Crossed(state, time.perf_counter())),
            condition=condition,
        )
        result = engine.add(request)
        checkpoint: asyncio.Task[DenoiseEvent] | None = None
        try:
            while not result.done():
                waiter = asyncio.ensure_future(updates.get())
                pending = {waiter, result} | ({checkpoint} if checkpoint is not None else set())
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if checkpoint is not None and checkpoint.done():
                    yield checkpoint.result()
                    checkpoint = None
                if not waiter.done():
                    waiter.cancel()
                    continue
                update = waiter.result()
                if isinstance(update, _Crossed):
                    if call.checkpoint_key is not None:  # off the critical path: the low steps go on
                        packed = pack_state(update.state)
                        checkpoint = asyncio.create_task(
                            save_checkpoint(self.artifacts, call.checkpoint_key, packed)
                        )
                    yield DenoiseBoundary(step_index=update.state.step_index, seconds=update.at - started)
                    started = update.at
                else:
                    yield update
            while not updates.empty():  # the last steps' updates, the final one included
                yield updates.get_nowait()
            state = stream_state(self._streamed, pack_state(result.result()))
            yield DenoiseDone(state=state, seconds=time.perf_counter() - started)
        finally:
            if not result.done():  # the caller went away (cancel, scheduler restart): free the slot
                engine.cancel(call.request_id)
        if checkpoint is not None:
            yield await checkpoint

    def stats(self, bucket: str | None = None) -> tuple[str, dict[Expert, EngineStats]]:
        """(replica id, expert -> its engine's stats). Given a `bucket`, the router picks its replica."""
        return serve.get_replica_context().replica_id.unique_id, self.engine.stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom-metrics hook: the queued work that QueuedWorkPolicy scales on."""
        return {
            QUEUED_WORK_METRIC: replica_routing_stats(list(self.engine.stats().values())).queued_work_seconds
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve's routing-stats hook: queued work over both experts, read by the BucketAffinityRouter."""
        return replica_routing_stats(list(self.engine.stats().values())).as_dict()

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError("the colocated engine thread has stopped")
        if self.ranks is not None:
            self.ranks.check()

    def __del__(self) -> None:
        for reporter in getattr(self, "_metrics", []):
            reporter.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=5)
        ranks = getattr(self, "ranks", None)
        if ranks is not None:
            ranks.close()


class _Crossed:
    """The request crossed the expert boundary (engine thread -> the call's stream)."""

    __slots__ = ("state", "at")

    def __init__(self, state: DenoiseState, at: float) -> None:
        self.state = state  # after the last high-noise step; never written afterwards
        self.at = at  # time.perf_counter() when it crossed


def expert_engine(
    args: PrevizArgs,
    expert: Expert,
    parts: WanComponents,
    transformer: WanTransformer3DModel,
    bank: AdapterBank | None,
    runner: StepRunner | None,
) -> DenoiseEngine:
    """One expert's engine, with its kernels and warm-up, as a split replica builds it (`runner`: the rank
    group's, shared by both experts; None: its own on this device)."""
    model, settings = parts.model, args.experts.of(expert)
    engine = DenoiseEngine(
        transformer,
        parts.scheduler,
        expert=expert,
        boundary_ratio=model.boundary_ratio,
        max_sequence_length=model.max_sequence_length,
        max_num_tokens=args.engine.max_num_tokens,
        max_batch_size=args.engine.max_batch_size,
        runner=runner,
        solvers=tier_solvers(model, parts.scheduler),
        adapters=bank,
        cache_curve=calibration_curve(args.model, model, parts.task),
    )
    if settings.fp8:  # after the adapters (peft wraps nn.Linear only); refused without FP8 tensor cores
        quantize_fp8(engine.transformer, engine.device)
    if settings.compile:  # after the engine made its layers batch-invariant: compile what runs
        compile_blocks(engine.transformer)
    shapes = [bucket.latent_shape(model, transformer.config.in_channels) for bucket in settings.warmup]
    warm_up(plain_forward(engine.runner, expert), engine.transformer, shapes, model.max_sequence_length)
    return engine
