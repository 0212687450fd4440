"""The VAEDecoder deployment: latents to uint8 frames, which stay in the object store as a ref.

With `decoder.parallel: N` a replica owns a rank group of N (serve.stages.decode_group) and splits each
full-VAE decode over it, unless the clip cannot be split or one rank's block would not fit the memory
budget: then rank 0 decodes it alone, in tiles if need be. The fast draft decoder always runs on rank 0."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import ray
from PIL import Image
from ray import serve

from pipeline.stages import deployment_name, stage
from pipeline.taehv import FastDecoder, fast_decoder_network
from pipeline.vae import VAEDecoder, decode_dtype
from serve.config import PrevizArgs
from serve.jobs.keyframes import PNG, png_bytes
from serve.metrics import ReplicaReporter, record_decode
from serve.sharding import rank_group_options
from serve.stages.common import STAGE_OPTIONS, all_calls_options, gpu_options, stage_components
from serve.stages.decode_group import DecodeGroup
from serve.stages.payloads import FrameBatch, StateRef
from serve.stages.turns import StageWaiting, Turns
from serve.storage import ArtifactStore, make_store

NAME = deployment_name(stage("decode"))  # from the stage table


def default_options(args: PrevizArgs) -> dict[str, Any]:
    return {
        "name": NAME,
        **gpu_options(args),
        **rank_group_options(args.decoder.parallel, args.device),
        **all_calls_options(args),
    }


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
        self.ranks = (
            DecodeGroup(args, vae, name=serve.get_replica_context().replica_id.to_full_id_str())
            if args.decoder.parallel > 1
            else None
        )
        self.num_decodes: Counter[str] = Counter()  # vae | fast | split -> decodes by this replica
        self._metrics = ReplicaReporter().start()
        self._turns = Turns()  # one decode at a time per replica: it is memory-bound
        self._storage = args.storage
        self._artifacts: ArtifactStore | None = None  # where the last decoded frames go

    async def decode(
        self, state: StateRef, fps: int, quality: str = "final", last_frame_key: str | None = None
    ) -> AsyncIterator[StageWaiting | FrameBatch]:
        """The frames of the low-noise expert's final state (fetched from its replica's object store),
        streamed after the call's place in the replica's line while it waits (a streaming call); by the
        fast decoder for a draft when one is configured, else by the full VAE. `last_frame_key`: where to
        store the clip's last decoded frame as PNG, raw (before any upscale, label, look or conform): what
        a shot that continues this one starts from (serve.jobs.keyframes)."""
        import torch

        latents = torch.from_numpy((await state.ref[0]).latents.copy())
        dtype = str(self.decoder.dtype).removeprefix("torch.")
        async for waiting in self._turns.wait():
            yield waiting
        try:
            started = time.perf_counter()
            if quality == "draft" and self.fast is not None:
                self.num_decodes["fast"] += 1
                frames = await asyncio.to_thread(self.fast.decode, latents, fps=fps)
                how = ("full", "fast", 1, None, None)
            else:
                self.num_decodes["vae"] += 1
                budget = self.decoder.budget_bytes()
                block = (
                    self.ranks.decoder.block_plan(latents.shape, budget) if self.ranks is not None else None
                )
                if block is not None:  # split over the group, each rank's block in full frames
                    self.num_decodes["split"] += 1
                    frames = await asyncio.to_thread(self.ranks.decode, latents, fps)
                    how = ("full", "vae", self.ranks.world_size, block.estimate_bytes, budget)
                else:  # full frames or tiles on this device, for the memory free now
                    plan = self.decoder.plan(latents.shape)
                    frames = await asyncio.to_thread(self.decoder.decode, latents, fps=fps, plan=plan)
                    how = (plan.mode, "vae", 1, plan.estimate_bytes, plan.budget_bytes)
            seconds = time.perf_counter() - started
            mode, decoder, ranks, estimate, budget = how
            record_decode(mode, dtype, decoder, ranks, seconds, estimate, budget)
            if last_frame_key is not None:
                await asyncio.to_thread(self._store_last_frame, last_frame_key, frames.pixels[-1])
            yield FrameBatch(ref=[ray.put(frames.pixels)], fps=fps, seconds=seconds)
        finally:
            self._turns.leave()

    def _store_last_frame(self, key: str, frame: Any) -> None:
        if self._artifacts is None:  # made on first use: a replica that never stores one needs no client
            self._artifacts = make_store(self._storage)
        self._artifacts.put_bytes(key, png_bytes(Image.fromarray(frame)), PNG)

    async def stats(self) -> dict[str, int]:
        """Decodes by this replica per decoder (`vae`, `fast`): which tier took which decoder; `split`: the
        full-VAE decodes split over its rank group."""
        return dict(self.num_decodes)

    def check_health(self) -> None:
        if self.ranks is not None:
            self.ranks.check()

    def __del__(self) -> None:
        ranks = getattr(self, "ranks", None)
        if ranks is not None:
            ranks.close()
