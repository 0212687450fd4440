"""Denoiser stage: one expert of Wan2.2 runs its share of one request's timesteps.

The high-noise expert owns the timesteps t >= boundary_ratio * num_train_timesteps (a prefix of the
schedule), the low-noise expert the rest; the request's DenoiseState (latents + solver history) is
handed from one to the other at the boundary. A request's quality tier picks the solver template that
continues its state (`solvers`), and its adapter set the LoRA adapters its forwards run with.

With `cache` (step caching, pipeline.denoise.stepcache) a run keeps one request's residual and skips the
steps its MagCache decision allows, exactly as the batching engine does for each of its requests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

from pipeline.denoise.adapters import AdapterBank
from pipeline.denoise.blocks import SplitTransformer
from pipeline.denoise.forward import Forward, GuidedInput, guided_forward
from pipeline.denoise.state import (
    DenoiseState,
    Solver,
    capture_history,
    new_solver,
    restore_solver,
    solver_for,
)
from pipeline.denoise.stepcache import MagnitudeCurve, cached_guided_forward, new_request_cache
from pipeline.determinism import make_batch_invariant
from pipeline.spec import AdapterSet, StepCacheSettings
from pipeline.text import PromptEmbeds, pad_embeds

Expert = Literal["high", "low"]

# (step index just finished, steps this expert runs for the request) -> None
StepCallback = Callable[[int, int], None]


def expert_for(timestep: float, boundary_timestep: float) -> Expert:
    """The MoE switch, in one place: high-noise expert at and above the boundary."""
    return "high" if timestep >= boundary_timestep else "low"


def expert_step_indices(template: Solver, num_steps: int, boundary_ratio: float, expert: Expert) -> list[int]:
    """Indices into the request's timestep schedule that `expert` runs."""
    timesteps = new_solver(template, num_steps, torch.device("cpu")).timesteps
    boundary = boundary_ratio * template.config.num_train_timesteps
    return [index for index, t in enumerate(timesteps) if expert_for(t, boundary) == expert]


class Denoiser:
    """Runs one expert's steps for one request at a time."""

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        scheduler: UniPCMultistepScheduler,
        *,
        expert: Expert,
        boundary_ratio: float,
        max_sequence_length: int = 512,
        forward: Forward | None = None,
        solvers: Mapping[str, Solver] | None = None,
        adapters: AdapterBank | None = None,
        cache_curve: MagnitudeCurve | None = None,
    ) -> None:
        """`solvers`: quality -> solver template of the other tiers (`final` is `scheduler`); `adapters`:
        the expert's loaded LoRA adapters (None: a request with adapters is refused)."""
        self.transformer = make_batch_invariant(transformer)  # the same rows as the batching engine's
        # inputs -> guided noise; a ShardedForward runs it over a rank group (pipeline.denoise.parallel)
        self.forward: Forward = forward or functools.partial(guided_forward, self.transformer)
        # embed -> blocks -> head for step caching; None with a custom forward (caching needs the blocks)
        self.split = SplitTransformer(self.transformer) if forward is None else None
        self.cache_curve = cache_curve
        self.scheduler = scheduler
        self.solvers: dict[str, Solver] = {**(solvers or {}), "final": scheduler}
        self.adapters = adapters
        self.expert: Expert = expert
        self.boundary_timestep = boundary_ratio * scheduler.config.num_train_timesteps
        self.max_sequence_length = max_sequence_length
        self.num_forwards = 0  # transformer calls so far (tests and stats count them)
        self.num_cached_steps = 0  # steps served from a step cache instead of the blocks

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def owns(self, timestep: float) -> bool:
        return expert_for(timestep, self.boundary_timestep) == self.expert

    @torch.inference_mode()
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
    ) -> DenoiseState:
        """Continue `state` through every step this expert owns, with `quality`'s solver and the LoRA
        `adapters` (sorted (name, weight) pairs); returns the state to hand over.

        With `cache`, steps its decision allows reuse the residual of the last computed step (needs
        `cache_curve`; with a custom `forward` every step runs, as in the engine)."""
        if cache is not None and self.cache_curve is None:
            raise ValueError(
                "`cache` needs the expert's magnitude curve; this Denoiser has no `cache_curve`."
            )
        device = self.device
        solver = restore_solver(solver_for(self.solvers, quality), state, device)
        if adapters and self.adapters is None:
            raise ValueError(f"the {self.expert} Denoiser has no LoRA adapters loaded but got {adapters!r}.")
        if self.adapters is not None:
            self.adapters.activate(self.adapters.effective(adapters))
        indices = []  # the contiguous run of this expert's steps from where the state stands
        for index in range(state.step_index, state.num_steps):
            if not self.owns(solver.timesteps[index]):
                break
            indices.append(index)
        cond, uncond = pad_embeds([prompt, negative_prompt], self.max_sequence_length).to(device)
        latents = state.latents.to(device)
        request_cache = None
        for done, index in enumerate(indices, start=1):
            t = solver.timesteps[index]
            item = GuidedInput(
                latents=latents,
                timestep=t,
                cond=cond,
                uncond=uncond if guidance > 1.0 else None,
                guidance=guidance,
            )
            if cache is not None and self.split is not None:
                if request_cache is None:
                    request_cache = new_request_cache(
                        cache, self.cache_curve, self.split, item, state.num_steps
                    )
                decision = request_cache.decide(index)
                reuse = [request_cache.residual if decision.skip else None]
                out = cached_guided_forward(self.split, [item], reuse, [True])
                request_cache.commit(decision, out.residuals[0])
                noise = out.noise[0]
                self.num_forwards += out.num_rows > 0
                self.num_cached_steps += decision.skip
            else:
                noise = self.forward([item])[0]
                self.num_forwards += 1
            latents = solver.step(noise[None], t, latents[None], return_dict=False)[0][0]
            if on_step is not None:
                on_step(done, len(indices))
        if not indices:
            return state
        return DenoiseState(latents=latents.cpu(), num_steps=state.num_steps, history=capture_history(solver))
