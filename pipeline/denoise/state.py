"""Per-request denoising state: latents plus the UniPC solver's multistep history.

UniPC's next step depends on the previous model outputs and sample, so the high-noise expert hands the
low-noise expert this whole state at the boundary, not just the latents; otherwise the first low step
would be first-order and the clip would differ from the reference pipeline. The state is plain CPU
tensors, so it can also be checkpointed or sent through Ray's object store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import UniPCMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from pipeline.spec import ModelSpec, ResolvedRequest


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
    generator = torch.Generator("cpu").manual_seed(request.seed)
    shape = (1, *request.latent_shape(model, channels))
    latents = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
    return DenoiseState(latents=latents[0], num_steps=request.steps)


def new_solver(
    template: UniPCMultistepScheduler, num_steps: int, device: torch.device
) -> UniPCMultistepScheduler:
    """A fresh solver for one request (never share one: UniPC keeps history)."""
    solver = UniPCMultistepScheduler.from_config(template.config)
    solver.set_timesteps(num_steps, device=device)
    solver.set_begin_index(0)
    return solver


def restore_solver(
    template: UniPCMultistepScheduler, state: DenoiseState, device: torch.device
) -> UniPCMultistepScheduler:
    """A solver positioned where `state` left off, with its history on `device`."""
    solver = new_solver(template, state.num_steps, device)
    history = state.history
    if history.step_index > 0:
        solver._step_index = history.step_index
    solver.lower_order_nums = history.lower_order_nums
    solver.this_order = history.this_order
    solver.model_outputs = [_to(t, device) for t in history.model_outputs]
    solver.timestep_list = [_to(t, device) for t in history.timestep_list]
    solver.last_sample = _to(history.last_sample, device)
    return solver


def capture_history(solver: UniPCMultistepScheduler) -> SolverHistory:
    """Copy the solver's between-step state to CPU."""
    cpu = torch.device("cpu")
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
