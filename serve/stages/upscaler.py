"""The Upscaler deployment: neural super-resolution of decoded frames (a resize without SR weights)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from pipeline.frames import Frames
from pipeline.local import default_upscaler
from pipeline.stages import deployment_name, stage
from pipeline.upscale import Upscaler, resize_frames
from pipeline.weights import pick_device
from serve.config import PrevizArgs
from serve.metrics import ReplicaReporter
from serve.stages.common import STAGE_OPTIONS, all_calls_options, gpu_options
from serve.stages.payloads import FrameBatch
from serve.stages.turns import StageWaiting, Turns

NAME = deployment_name(stage("upscale"))  # from the stage table


def default_options(args: PrevizArgs) -> dict[str, Any]:
    return {"name": NAME, **gpu_options(args), **all_calls_options(args)}


@serve.deployment(name="Upscaler", max_ongoing_requests=8, **STAGE_OPTIONS)
class UpscalerDeployment:
    def __init__(self, args: PrevizArgs) -> None:
        device = pick_device(args.device)
        if args.sr_weights is not None:
            self.upscaler: Upscaler | None = Upscaler.from_file(args.sr_weights, device=device)
        else:
            self.upscaler = default_upscaler(args.model)
            if self.upscaler is not None:
                self.upscaler.descriptor.to(device)
        self._turns = Turns()  # one upscale at a time per replica
        self._metrics = ReplicaReporter().start()

    async def upscale(
        self, frames: FrameBatch, width: int, height: int
    ) -> AsyncIterator[StageWaiting | FrameBatch]:
        """The frames at `width` x `height`, streamed after the call's place in the replica's line while
        it waits (a streaming call)."""
        pixels = await frames.ref[0]
        source = Frames(pixels=pixels, fps=frames.fps)
        async for waiting in self._turns.wait():
            yield waiting
        try:
            started = time.perf_counter()
            if self.upscaler is None:
                result = await asyncio.to_thread(resize_frames, source, width, height)
            else:
                result = await asyncio.to_thread(self.upscaler.upscale, source, width, height)
            seconds = time.perf_counter() - started
        finally:
            self._turns.leave()
        if result is source:
            yield FrameBatch(ref=frames.ref, fps=frames.fps, seconds=seconds)
        else:
            yield FrameBatch(ref=[ray.put(result.pixels)], fps=frames.fps, seconds=seconds)
