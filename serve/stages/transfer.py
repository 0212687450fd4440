"""Stage payloads as CPU numpy, the form they cross deployments in (Ray's object store is zero-copy for
numpy arrays; torch tensors would be pickled and copied).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.denoise.state import DenoiseState, SolverHistory
from pipeline.text import PromptEmbeds


@dataclass(frozen=True, slots=True)
class PackedState:
    """DenoiseState with tensors as numpy; timesteps as plain ints."""

    latents: np.ndarray
    num_steps: int
    step_index: int
    lower_order_nums: int
    this_order: int
    model_outputs: tuple[np.ndarray | None, ...]
    timestep_list: tuple[int | None, ...]
    last_sample: np.ndarray | None


def pack_state(state: DenoiseState) -> PackedState:
    history = state.history
    return PackedState(
        latents=_array(state.latents),
        num_steps=state.num_steps,
        step_index=history.step_index,
        lower_order_nums=history.lower_order_nums,
        this_order=history.this_order,
        model_outputs=tuple(_array(t) if t is not None else None for t in history.model_outputs),
        timestep_list=tuple(int(t) if t is not None else None for t in history.timestep_list),
        last_sample=_array(history.last_sample) if history.last_sample is not None else None,
    )


def unpack_state(packed: PackedState) -> DenoiseState:
    return DenoiseState(
        latents=torch.from_numpy(packed.latents.copy()),
        num_steps=packed.num_steps,
        history=SolverHistory(
            step_index=packed.step_index,
            lower_order_nums=packed.lower_order_nums,
            this_order=packed.this_order,
            model_outputs=[
                torch.from_numpy(a.copy()) if a is not None else None for a in packed.model_outputs
            ],
            timestep_list=[torch.tensor(t) if t is not None else None for t in packed.timestep_list],
            last_sample=torch.from_numpy(packed.last_sample.copy())
            if packed.last_sample is not None
            else None,
        ),
    )


def state_nbytes(state: PackedState) -> int:
    """Bytes of the arrays in `state` (what moving it costs)."""
    arrays = [state.latents, state.last_sample, *state.model_outputs]
    return sum(array.nbytes for array in arrays if array is not None)


def pack_embeds(embeds: PromptEmbeds) -> np.ndarray:
    return _array(embeds.embeds)


def unpack_embeds(array: np.ndarray) -> PromptEmbeds:
    return PromptEmbeds(embeds=torch.from_numpy(array.copy()))


def _array(tensor: torch.Tensor) -> np.ndarray:
    """CPU numpy; bf16 (no numpy dtype) travels as float32."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()
