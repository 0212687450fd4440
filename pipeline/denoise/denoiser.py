"""Denoiser: one expert of Wan2.2 runs its share of one request's timesteps, in the calling thread.

It is a thin driver over the batching engine (pipeline.denoise.engine): each `run` submits one request to
the expert's DenoiseEngine and steps it to the end, so the one-process pipeline (`previz generate`) and a
served replica share one constructor, one adapter switch, one step cache and one solver loop.

The high-noise expert owns the timesteps t >= boundary_ratio * num_train_timesteps (a prefix of the
schedule), the low-noise expert the rest; the request's DenoiseState (latents + solver history) is handed
from one to the other at the boundary.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

from pipeline.denoise.adapters import AdapterBank
from pipeline.denoise.engine import DenoiseEngine, EngineRequest
from pipeline.denoise.experts import Expert
from pipeline.denoise.runner import StepRunner
from pipeline.denoise.state import DenoiseState, Solver
from pipeline.denoise.stepcache import MagnitudeCurve
from pipeline.spec import AdapterSet, StepCacheSettings
from pipeline.text import PromptEmbeds

# (step index just finished, steps this expert runs for the request) -> None
StepCallback = Callable[[int, int], None]


class Denoiser:
    """Runs one expert's steps for one request at a time, on the calling thread."""

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        scheduler: UniPCMultistepScheduler,
        *,
        expert: Expert,
        boundary_ratio: float,
        max_sequence_length: int = 512,
        runner: StepRunner | None = None,
        solvers: Mapping[str, Solver] | None = None,
        adapters: AdapterBank | None = None,
        cache_curve: MagnitudeCurve | None = None,
    ) -> None:
        """The engine's arguments (`solvers`: quality -> solver template of the other tiers; `adapters`:
        the expert's loaded LoRA adapters, None: a request with adapters is refused; `runner`: a rank
        group's GroupRunner, None: this device)."""
        self.engine = DenoiseEngine(
            transformer,
            scheduler,
            expert=expert,
            boundary_ratio=boundary_ratio,
            max_sequence_length=max_sequence_length,
            max_batch_size=1,
            runner=runner,
            solvers=solvers,
            adapters=adapters,
            cache_curve=cache_curve,
        )
        self._request_ids = itertools.count()

    @property
    def expert(self) -> Expert:
        return self.engine.expert

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def cache_curve(self) -> MagnitudeCurve | None:
        return self.engine.cache_curve

    @cache_curve.setter
    def cache_curve(self, curve: MagnitudeCurve | None) -> None:
        self.engine.cache_curve = curve

    @property
    def num_forwards(self) -> int:
        """Transformer calls so far (a step served from the step cache makes none)."""
        return self.engine.num_forwards

    @property
    def num_cached_steps(self) -> int:
        """Steps served from a step cache instead of the blocks, so far."""
        return self.engine.stats().num_cached_steps

    def run(
        self,
        state: DenoiseState,
        prompt: PromptEmbeds,
        negative_prompt: PromptEmbeds,
        guidance: float,
        *,
        on_step: StepCallback | None = None,
        quality: str = "final",
        adapters: AdapterSet = (),
        cache: StepCacheSettings | None = None,
        condition: torch.Tensor | None = None,
    ) -> DenoiseState:
        """Continue `state` through every step this expert owns, with `quality`'s solver and the LoRA
        `adapters` (sorted (name, weight) pairs), an I2V request with its `condition`
        (pipeline.vae_encode); returns the state to hand over (`state` itself when the
        next step is the other expert's). Bad input raises ValueError; a failed step RequestFailed."""
        request_id = f"{self.expert}-{next(self._request_ids)}"
        future = self.engine.submit(
            EngineRequest(
                request_id=request_id,
                state=state,
                prompt=prompt,
                negative_prompt=negative_prompt,
                guidance=guidance,
                quality=quality,
                adapters=adapters,
                on_progress=on_step,
                cache=cache,
                condition=condition,
            )
        )
        try:
            while not future.done():
                self.engine.step()
        finally:
            if not future.done():  # a step raised past the engine (a broken rank group, an interrupt)
                self.engine.cancel(request_id)
                self.engine.step()  # the request leaves at this boundary; nothing is forwarded
        return future.result()
