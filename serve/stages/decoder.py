"""The VAEDecoder deployment: latents to uint8 frames, which stay in the object store as a ref."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from pipeline.stages import deployment_name, stage
from pipeline.taehv import FastDecoder, fast_decoder_network
from pipeline.vae import VAEDecoder, decode_dtype
from serve.config import PrevizArgs
from serve.metrics import ReplicaReporter, record_decode_plan
from serve.stages.common import STAGE_OPTIONS, all_calls_options, gpu_options, stage_components
from serve.stages.payloads import FrameBatch, StateRef
from serve.stages.turns import StageWaiting, Turns

NAME = deployment_name(stage("decode"))  # from the stage table


def default_options(args: PrevizArgs) -> dict[str, Any]:
    return {"name": NAME, **gpu_options(args), **all_calls_options(args)}


@serve.deployment(name="VAEDecoder", max_ongoing_requests=8, **STAGE_OPTIONS)
class VAEDecoderDeployment:
    def __init__(self, args: PrevizArgs) -> None:
        vae = stage_components(args, "vae").vae
        self.decoder = VAEDecoder(
            vae,
            dtype=decode_dtype(args.decoder.dtype, next(vae.parameters()).device),
            memory_bound_bytes=args.decoder.max_memory_bytes,
        )
        # the draft tier's TAEHV decoder when configured; finals always take the full VAE
        self.fast = (
            FastDecoder(
                fast_decoder_network(args.decoder.fast_weights, args.model, self.decoder.device),
                dtype=self.decoder.dtype,
            )
            if args.decoder.draft == "fast"
            else None
        )
        self.num_decodes: Counter[str] = Counter()  # decoder (vae | fast) -> decodes by this replica
        self._metrics = ReplicaReporter().start()
        self._turns = Turns()  # one decode at a time per replica: it is memory-bound

    async def decode(
        self, state: StateRef, fps: int, quality: str = "final"
    ) -> AsyncIterator[StageWaiting | FrameBatch]:
        """The frames of the low-noise expert's final state (fetched from its replica's object store),
        streamed after the call's place in the replica's line while it waits (a streaming call); by the
        fast decoder for a draft when one is configured, else by the full VAE."""
        import torch

        latents = torch.from_numpy((await state.ref[0]).latents.copy())
        dtype = str(self.decoder.dtype).removeprefix("torch.")
        async for waiting in self._turns.wait():
            yield waiting
        try:
            started = time.perf_counter()
            if quality == "draft" and self.fast is not None:
                self.num_decodes["fast"] += 1
                record_decode_plan("full", dtype, "fast", None, None)
                frames = await asyncio.to_thread(self.fast.decode, latents, fps=fps)
            else:
                self.num_decodes["vae"] += 1
                plan = self.decoder.plan(latents.shape)  # full frames or tiles, for the memory free now
                record_decode_plan(plan.mode, dtype, "vae", plan.estimate_bytes, plan.budget_bytes)
                frames = await asyncio.to_thread(self.decoder.decode, latents, fps=fps, plan=plan)
            yield FrameBatch(ref=[ray.put(frames.pixels)], fps=fps, seconds=time.perf_counter() - started)
        finally:
            self._turns.leave()

    async def stats(self) -> dict[str, int]:
        """Decodes by this replica per decoder (`vae`, `fast`): which tier took which decoder."""
        return dict(self.num_decodes)
