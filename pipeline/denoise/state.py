"""Per-request denoising state: latents plus the UniPC solver's multistep history.

UniPC's next step depends on the previous model outputs and sample, so the high-noise expert hands the
low-noise expert this whole state at the boundary, not just the latents; otherwise the first low step
would be first-order and the clip would differ from the reference pipeline. The state is plain CPU
tensors, so it can also be checkpointed or sent through Ray's object store.

A tier's recipe names its solver (`tier_solvers`): UniPC for `final`, flow-matching Euler for `draft` (what
the distill LoRAs were distilled with; its only history is the step index). Both experts of a request
must use the same tier's solver; the engine picks it by the request's quality.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from pipeline.spec import ModelSpec, Quality, ResolvedRequest, TierRecipe

# A solver template: every request gets its own copy (UniPC keeps history).
Solver = UniPCMultistepScheduler | FlowMatchEulerDiscreteScheduler


@dataclass(slots=True)
class SolverHistory:
    """The mutable part of a UniPCMultistepScheduler between steps (everything `step` reads or writes)."""

    step_index: int  # index into the request's timesteps of the next step to run
    lower_order_nums: int  # warm-up counter of the multistep solver
    this_order: int  # order used in the last step (read by the corrector)
    model_outputs: list[torch.Tensor | None]  # last `solver_order` converted model outputs
    timestep_list: list[torch.Tensor | int | None]  # their timesteps
    last_sample: torch.Tensor | None  # sample before the last predictor step (for the corrector)


@dataclass(slots=True)
class DenoiseState:
    """Everything needed to continue denoising one request on any replica."""

    latents: torch.Tensor  # (channels, latent_frames, latent_height, latent_width) float32, CPU
    num_steps: int  # total steps of the request (both experts)
    history: SolverHistory = field(
        default_factory=lambda: SolverHistory(0, 0, 0, [None, None], [None, None], None)
    )

    @property
    def step_index(self) -> int:
        return self.history.step_index

    @property
    def is_done(self) -> bool:
        return self.history.step_index >= self.num_steps


def initial_state(request: ResolvedRequest, model: ModelSpec, channels: int = 16) -> DenoiseState:
    """Gaussian noise from the request's seed, drawn exactly as WanPipeline.prepare_latents draws it."""
    return initial_noise(request.seed, request.latent_shape(model, channels), request.steps)


def initial_noise(seed: int, shape: tuple[int, ...], num_steps: int) -> DenoiseState:
    """The state of a request of `num_steps` steps before its first: noise of latent `shape` from `seed`."""
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = randn_tensor((1, *shape), generator=generator, device=torch.device("cpu"), dtype=torch.float32)
    return DenoiseState(latents=latents[0], num_steps=num_steps)


def tier_solver(recipe: TierRecipe, unipc: UniPCMultistepScheduler) -> Solver:
    """The solver template of a tier; `unipc` is the model's own (its config, from a Diffusers folder)."""
    if recipe.solver == "euler":
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=unipc.config.num_train_timesteps, shift=recipe.flow_shift
        )
    if recipe.flow_shift == unipc.config.flow_shift:
        return unipc
    return UniPCMultistepScheduler.from_config(unipc.config, flow_shift=recipe.flow_shift)


def tier_solvers(model: ModelSpec, unipc: UniPCMultistepScheduler) -> dict[Quality, Solver]:
    """quality -> solver template of every tier of `model`."""
    return {quality: tier_solver(model.recipe(quality), unipc) for quality in ("draft", "final")}


def solver_for(solvers: Mapping[str, Solver], quality: str) -> Solver:
    solver = solvers.get(quality)
    if solver is None:
        raise ValueError(f"`quality` must be one of {', '.join(sorted(solvers))} but is {quality!r}.")
    return solver


def new_solver(template: Solver, num_steps: int, device: torch.device) -> Solver:
    """A fresh solver for one request (never share one: UniPC keeps history)."""
    solver = type(template).from_config(template.config)
    if isinstance(solver, FlowMatchEulerDiscreteScheduler):
        # Lightning's schedule: sigmas linspace(1, 0, steps + 1) without the last, shifted by the solver
        sigmas = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)[:-1]
        solver.set_timesteps(sigmas=sigmas.tolist(), device=device)
    else:
        solver.set_timesteps(num_steps, device=device)
    solver.set_begin_index(0)
    return solver


def restore_solver(template: Solver, state: DenoiseState, device: torch.device) -> Solver:
    """A solver positioned where `state` left off, with its history on `device`."""
    solver = new_solver(template, state.num_steps, device)
    history = state.history
    if history.step_index > 0:
        solver._step_index = history.step_index
    if not isinstance(solver, UniPCMultistepScheduler):
        return solver  # Euler: the step index is all it keeps
    solver.lower_order_nums = history.lower_order_nums
    solver.this_order = history.this_order
    solver.model_outputs = [_to(t, device) for t in history.model_outputs]
    solver.timestep_list = [_to(t, device) for t in history.timestep_list]
    solver.last_sample = _to(history.last_sample, device)
    return solver


def capture_history(solver: Solver) -> SolverHistory:
    """Copy the solver's between-step state to CPU."""
    cpu = torch.device("cpu")
    if not isinstance(solver, UniPCMultistepScheduler):
        return SolverHistory(int(solver.step_index or 0), 0, 0, [None, None], [None, None], None)
    return SolverHistory(
        step_index=int(solver.step_index or 0),
        lower_order_nums=int(solver.lower_order_nums),
        this_order=int(getattr(solver, "this_order", 0)),
        model_outputs=[_to(t, cpu) for t in solver.model_outputs],
        timestep_list=[_to(t, cpu) for t in solver.timestep_list],
        last_sample=_to(solver.last_sample, cpu),
    )


def _to(value, device: torch.device):
    return value.to(device) if isinstance(value, torch.Tensor) else value
