"""WanTransformer3DModel's forward in three calls (embed -> blocks -> head), so step caching can run the
cheap ends for every row and the 40 blocks for some rows only.

Each call uses the model's own submodules in the order its `forward` uses them (diffusers 0.42,
`WanTransformer3DModel.forward`): `rope` and `patch_embedding` on the latents, `condition_embedder` on
the timesteps and prompt embeddings; then `blocks`; then `norm_out` modulated by `scale_shift_table` + the
time embedding, `proj_out`, and the unpatchify. For text-to-video only: one timestep per row (shape
(rows,)) and no image embeddings. `embed -> blocks -> head` equals `transformer(...)` bit for bit
(tests/test_stepcache.py); the blocks run whatever rows they are given, so a row's result does not depend
on which other rows computed (the layers are row-wise: pipeline.determinism).

Sharded (Ulysses) models: the calls go through the same submodules, so diffusers' context-parallel hooks
fire as in `forward`: `rope`'s output and `blocks.0`'s hidden states are cut over the Ulysses ranks and
`proj_out` gathers them, so on each rank `blocks` returns the rank's token shard and `head` the whole
prediction. `cached` keeps residuals per rank: the blocks' output shard minus the same shard of their
input (`pipeline._compat.token_shard`, cut as the hooks cut). Not covered: the per-call LoRA
`attention_kwargs` scale of `forward` (adapters are switched on the model: pipeline.denoise.adapters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import WanTransformer3DModel

from pipeline._compat import token_shard
from pipeline.denoise.forward import Rows, predict_rows
from pipeline.spec import num_video_tokens


@dataclass(frozen=True, slots=True)
class Embedded:
    """What the blocks and the head need for a set of rows, after the embedding."""

    hidden_states: torch.Tensor  # (rows, video tokens, inner_dim): the blocks' input
    encoder_hidden_states: torch.Tensor  # (rows, text tokens, inner_dim)
    temb: torch.Tensor  # (rows, inner_dim): modulates the output norm
    timestep_proj: torch.Tensor  # (rows, 6, inner_dim): modulates every block
    rotary_emb: tuple[torch.Tensor, torch.Tensor]  # shared by every row (depends on the shape only)
    grid: tuple[int, int, int]  # latent frames, height, width after patching

    @property
    def num_rows(self) -> int:
        return self.hidden_states.shape[0]

    def select(self, rows: torch.Tensor) -> Embedded:
        """The same, for the rows at indices `rows` only."""
        return Embedded(
            hidden_states=self.hidden_states[rows],
            encoder_hidden_states=self.encoder_hidden_states[rows],
            temb=self.temb[rows],
            timestep_proj=self.timestep_proj[rows],
            rotary_emb=self.rotary_emb,
            grid=self.grid,
        )


class SplitTransformer:
    """One expert's forward as embed, blocks and head (same submodules, same order, same values)."""

    def __init__(self, transformer: WanTransformer3DModel) -> None:
        self.transformer = transformer

    @property
    def inner_dim(self) -> int:
        config = self.transformer.config
        return config.num_attention_heads * config.attention_head_dim

    def num_tokens(self, latent_shape: tuple[int, ...]) -> int:
        """Video tokens of one row of latents shaped (channels, frames, height, width)."""
        return num_video_tokens(latent_shape, self.transformer.config.patch_size)

    def embed(self, rows: Rows) -> Embedded:
        model = self.transformer
        if rows.timestep.ndim != 1:
            raise ValueError(
                f"`timestep` must be one per row, shape (rows,), but is {tuple(rows.timestep.shape)}."
            )
        _, _, frames, height, width = rows.hidden_states.shape
        pt, ph, pw = model.config.patch_size
        rotary_emb = model.rope(rows.hidden_states)
        hidden = model.patch_embedding(rows.hidden_states).flatten(2).transpose(1, 2).contiguous()
        temb, timestep_proj, encoder_hidden_states, image = model.condition_embedder(
            rows.timestep, rows.encoder_hidden_states, None, timestep_seq_len=None
        )
        if image is not None:
            raise ValueError("image-conditioned Wan models are not supported (text-to-video only).")
        return Embedded(
            hidden_states=hidden,
            encoder_hidden_states=encoder_hidden_states,
            temb=temb,
            timestep_proj=timestep_proj.unflatten(1, (6, -1)),
            rotary_emb=rotary_emb,
            grid=(frames // pt, height // ph, width // pw),
        )

    def blocks(self, embedded: Embedded) -> torch.Tensor:
        """The blocks' output for every row of `embedded` (same shape as its hidden states)."""
        hidden = embedded.hidden_states
        for block in self.transformer.blocks:
            hidden = block(
                hidden, embedded.encoder_hidden_states, embedded.timestep_proj, embedded.rotary_emb
            )
        return hidden

    def head(self, embedded: Embedded, hidden: torch.Tensor) -> torch.Tensor:
        """Noise prediction (rows, channels, frames, height, width) from the blocks' output `hidden`."""
        model = self.transformer
        modulation = model.scale_shift_table.to(embedded.temb.device) + embedded.temb.unsqueeze(1)
        shift, scale = (part.to(hidden.device) for part in modulation.chunk(2, dim=1))
        hidden = (model.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = model.proj_out(hidden)
        frames, height, width = embedded.grid
        pt, ph, pw = model.config.patch_size
        patches = hidden.reshape(hidden.shape[0], frames, height, width, pt, ph, pw, -1)
        # (rows, f, h, w, pt, ph, pw, c) -> (rows, c, f * pt, h * ph, w * pw)
        return patches.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def cached(
        self, rows: Rows, reuse: Sequence[torch.Tensor | None], keep: Sequence[bool]
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """(prediction of every row, row -> its new residual or None): row i with `reuse[i]` skips the
        blocks (its block input + that residual), row i with `keep[i]` that computed hands back its new
        residual (blocks output - input). Residuals are this rank's token shard, (tokens / U, inner_dim).
        With no row reusing or keeping it is the model's own forward (`predict_rows`)."""
        num_rows = rows.num_rows
        computed = [row for row in range(num_rows) if reuse[row] is None]
        if len(computed) == num_rows and not any(keep):
            return predict_rows(self.transformer, rows), [None] * num_rows
        embedded = self.embed(rows)
        inputs = token_shard(self.transformer, embedded.hidden_states)  # the shard `blocks` returns
        if len(computed) == num_rows:
            hidden = self.blocks(embedded)
        else:
            hidden = inputs.clone()
            if computed:
                index = torch.tensor(computed, device=hidden.device)
                hidden[index] = self.blocks(embedded.select(index))
            for row, residual in enumerate(reuse):
                if residual is not None:
                    hidden[row] = inputs[row] + residual
        residuals = [
            hidden[row] - inputs[row] if keep[row] and reuse[row] is None else None for row in range(num_rows)
        ]
        return self.head(embedded, hidden), residuals

    def __call__(self, rows: Rows) -> torch.Tensor:
        """The whole forward, as `predict_rows` gives it."""
        embedded = self.embed(rows)
        return self.head(embedded, self.blocks(embedded))
