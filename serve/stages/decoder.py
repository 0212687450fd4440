"""The VAEDecoder deployment: latents to uint8 frames, which stay in the object store as a ref."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from pipeline.stages import deployment_name, stage
from pipeline.vae import VAEDecoder, decode_dtype
from serve.config import PrevizArgs
from serve.metrics import ReplicaReporter, record_decode_plan
from serve.stages.common import STAGE_OPTIONS, gpu_options, stage_components
from serve.stages.payloads import FrameBatch, StateRef
from serve.stages.turns import StageWaiting, Turns

NAME = deployment_name(stage("decode"))  # from the stage table


def default_options(args: PrevizArgs) -> dict[str, Any]:
    return {"name": NAME, **gpu_options(args)}


@serve.deployment(name="VAEDecoder", max_ongoing_requests=8, **STAGE_OPTIONS)
class VAEDecoderDeployment:
    def __init__(self, args: PrevizArgs) -> None:
        vae = stage_components(args, "vae").vae
        self.decoder = VAEDecoder(
            vae,
            dtype=decode_dtype(args.decoder.dtype, next(vae.parameters()).device),
            memory_bound_bytes=args.decoder.max_memory_bytes,
        )
        self._metrics = ReplicaReporter().start()
        self._turns = Turns()  # one decode at a time per replica: it is memory-bound

    async def decode(self, state: StateRef, fps: int) -> AsyncIterator[StageWaiting | FrameBatch]:
        """The frames of the low-noise expert's final state (fetched from its replica's object store),
        streamed after the call's place in the replica's line while it waits (a streaming call)."""
        import torch

        latents = (await state.ref[0]).latents
        async for waiting in self._turns.wait():
            yield waiting
        try:
            started = time.perf_counter()
            plan = self.decoder.plan(latents.shape)  # full frames or tiles, for the memory free now
            dtype = str(self.decoder.dtype).removeprefix("torch.")
            record_decode_plan(plan.mode, dtype, "vae", plan.estimate_bytes, plan.budget_bytes)
            frames = await asyncio.to_thread(
                self.decoder.decode, torch.from_numpy(latents.copy()), fps=fps, plan=plan
            )
            yield FrameBatch(ref=[ray.put(frames.pixels)], fps=fps, seconds=time.perf_counter() - started)
        finally:
            self._turns.leave()
