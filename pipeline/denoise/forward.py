"""One guided transformer forward over several requests at once.

Cond and uncond of every request go through ONE forward with per-sample timesteps (shape (B,)); each
request then gets `uncond + g * (cond - uncond)` with its own guidance scale. The single-request
Denoiser and the batching engine both call this, so batched and unbatched runs share the math.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import WanTransformer3DModel


@dataclass(frozen=True, slots=True)
class GuidedInput:
    """One request's share of a forward."""

    latents: torch.Tensor  # (channels, frames, height, width) on the model's device, float32
    timestep: torch.Tensor  # scalar int64: this request's current timestep
    cond: torch.Tensor  # (max_sequence_length, text_dim) prompt embeddings on device
    uncond: torch.Tensor | None  # same for the negative prompt; None when guidance <= 1 (no CFG)
    guidance: float  # CFG scale applied when `uncond` is given


def guided_forward(transformer: WanTransformer3DModel, inputs: Sequence[GuidedInput]) -> list[torch.Tensor]:
    """Noise predictions (one per input, float32, shaped like its latents) from a single forward."""
    dtype = transformer.dtype
    latents, timesteps, texts = [], [], []
    for item in inputs:
        rows = 1 if item.uncond is None else 2
        latents.extend([item.latents] * rows)
        timesteps.extend([item.timestep] * rows)
        texts.append(item.cond)
        if item.uncond is not None:
            texts.append(item.uncond)
    prediction = transformer(
        hidden_states=torch.stack(latents).to(dtype),
        timestep=torch.stack(timesteps),
        encoder_hidden_states=torch.stack(texts).to(dtype),
        return_dict=False,
    )[0]
    out, row = [], 0
    for item in inputs:
        cond = prediction[row]
        if item.uncond is None:
            out.append(cond)
            row += 1
        else:
            uncond = prediction[row + 1]
            out.append(uncond + item.guidance * (cond - uncond))
            row += 2
    return out
