"""The MoE switch of Wan2.2: which expert runs a timestep, and which of a schedule's steps each one owns."""

from __future__ import annotations

from typing import Literal

import torch

from pipeline.denoise.state import Solver, new_solver

Expert = Literal["high", "low"]


def expert_for(timestep: float, boundary_timestep: float) -> Expert:
    """The MoE switch, in one place: high-noise expert at and above the boundary."""
    return "high" if timestep >= boundary_timestep else "low"


def expert_step_indices(template: Solver, num_steps: int, boundary_ratio: float, expert: Expert) -> list[int]:
    """Indices into the request's timestep schedule that `expert` runs."""
    timesteps = new_solver(template, num_steps, torch.device("cpu")).timesteps
    boundary = boundary_ratio * template.config.num_train_timesteps
    return [index for index, t in enumerate(timesteps) if expert_for(t, boundary) == expert]
