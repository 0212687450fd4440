"""One guided transformer forward over several requests at once.

Cond and uncond of every request go through ONE forward with per-sample timesteps (shape (B,)); each
request then gets `uncond + g * (cond - uncond)` with its own guidance scale. The batching engine calls
this for one request or many (the single-request Denoiser drives the engine), so batched and unbatched
runs share the math.

The forward is three steps so that a sharded forward (pipeline.denoise.parallel) can run the middle one
over a rank group: `stack_rows` lays the rows out (every request's cond row first, then the uncond rows
of the requests with CFG, so that CFG parallel puts cond and uncond on different halves), the
transformer predicts noise for every row, `apply_guidance` combines each request's rows.

An image-to-video request (Wan2.2-I2V-A14B) carries its condition (pipeline.vae_encode: mask + keyframe
latents, fixed for every step); each of its rows, cond and uncond alike, is its latents and its condition
concatenated on the channel axis, as WanImageToVideoPipeline's `torch.cat([latents, condition], dim=1)`.
The prediction has the latents' channels only (the experts' out_channels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    condition: torch.Tensor | None = None  # I2V: (20, frames, height, width) float32 on device; T2V: None

    @property
    def model_input(self) -> torch.Tensor:
        """What the transformer takes for this request's rows: the latents, then the condition's channels."""
        if self.condition is None:
            return self.latents
        return torch.cat([self.latents, self.condition], dim=0)


@dataclass(frozen=True, slots=True)
class Rows:
    """The transformer's inputs for one forward: one row per cond or uncond prediction."""

    hidden_states: torch.Tensor  # (rows, in_channels, frames, height, width) in the model's dtype
    timestep: torch.Tensor  # (rows,) int64
    encoder_hidden_states: torch.Tensor  # (rows, max_sequence_length, text_dim) in the model's dtype

    @property
    def num_rows(self) -> int:
        return self.hidden_states.shape[0]


# The forward the engine calls: inputs -> one guided noise prediction per input.
Forward = Callable[[Sequence[GuidedInput]], list[torch.Tensor]]


def stack_rows(inputs: Sequence[GuidedInput], dtype: torch.dtype) -> Rows:
    """Rows in forward order: every input's cond row, then the uncond rows of the inputs with CFG."""
    guided = [item for item in inputs if item.uncond is not None]
    model_inputs = [item.model_input for item in inputs]
    model_inputs += [item.model_input for item in guided]
    return Rows(
        hidden_states=torch.stack(model_inputs).to(dtype),
        timestep=torch.stack([item.timestep for item in [*inputs, *guided]]),
        encoder_hidden_states=torch.stack(
            [item.cond for item in inputs] + [item.uncond for item in guided]
        ).to(dtype),
    )


def predict_rows(transformer: WanTransformer3DModel, rows: Rows) -> torch.Tensor:
    """Noise prediction for every row: `rows.hidden_states`' shape with the model's out_channels."""
    return transformer(
        hidden_states=rows.hidden_states,
        timestep=rows.timestep,
        encoder_hidden_states=rows.encoder_hidden_states,
        return_dict=False,
    )[0]


def apply_guidance(inputs: Sequence[GuidedInput], prediction: torch.Tensor) -> list[torch.Tensor]:
    """Each input's guided noise from the rows `stack_rows` laid out."""
    out, next_uncond = [], len(inputs)
    for row, item in enumerate(inputs):
        cond = prediction[row]
        if item.uncond is None:
            out.append(cond)
        else:
            uncond = prediction[next_uncond]
            out.append(uncond + item.guidance * (cond - uncond))
            next_uncond += 1
    return out


def guided_forward(transformer: WanTransformer3DModel, inputs: Sequence[GuidedInput]) -> list[torch.Tensor]:
    """Noise predictions (one per input, float32, shaped like its latents) from a single forward."""
    return apply_guidance(inputs, predict_rows(transformer, stack_rows(inputs, transformer.dtype)))
