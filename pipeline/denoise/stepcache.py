"""Step caching per request inside the engine: MagCache (Ma et al. 2025, arXiv 2506.09045), decided and
stored per request, so requests at different steps share a batch and each skips for itself.

Why MagCache and not a first-block cache: MagCache decides a skip before the forward, from a calibrated
per-step curve of the residual's magnitude ratio (`MagnitudeCurve`) and the request's own accumulators,
so a request that skips a step takes no row in that forward's blocks (the planner does not even count its
tokens). A first-block cache (FirstBlockCache, TeaCache-style) decides from the first block's output of
this very step: every request would keep its row in block 0 of every forward, and the decision would
come in the middle of a batched forward.

What is cached (as MagCache and diffusers' MagCacheConfig): the residual of the 40 blocks, output minus
input, of the request's last computed step, one tensor (video tokens, inner_dim) per row of the request
in each expert, in the model's dtype; its cond and uncond rows share one decision. The engine on rank 0
keeps the decisions (`RequestCache`); the residuals live in the step runner's store on every rank
(pipeline.denoise.runner), each rank holding its Ulysses token shard of the rows its CFG half runs. A
skipped step still runs the cheap ends of the transformer for its rows (patch + condition embedding, then
the output norm and projection; pipeline.denoise.blocks): its prediction is head(block input + cached
residual).

The decision for step t (MagCache's, `RequestCache.decide`): never within the request's first
`warmup_steps` steps, nor without a residual (an expert's first step); else accumulated ratio *= ratio[t],
error += |1 - accumulated ratio|, and the step is skipped while error < threshold and at most `max_skip`
steps in a row; a computed step resets the accumulators. The ratio a request uses is the one of its rows
farther from 1 (cond, or uncond with CFG). Threshold 0 never skips, and then the cached forward equals the
plain one bit for bit.

Calibration: the published Wan2.2 T2V-A14B ratios (magcache_wan22_t2v_a14b.json, with its source) for
real weights; a preset's are measured by `calibrate` on the preset itself. A curve calibrated for N steps
is resampled to a request's step count by nearest index, as MagCache's `nearest_interp`.

Memory: at most one residual per request and expert (`RequestCache.max_bytes`, asserted in the engine's
stats against rank 0's store); every rank drops it when the request leaves the engine (finished,
cancelled or failed: the engine releases it from the runner). At 480p
x 81 frames in bf16 that is 32,760 tokens x 5,120 x 2 bytes = 335 MB a row, 671 MB for a request with CFG.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.denoise.blocks import SplitTransformer
from pipeline.denoise.forward import GuidedInput, apply_guidance, stack_rows
from pipeline.spec import StepCacheSettings


@dataclass(frozen=True, slots=True)
class MagnitudeCurve:
    """One model's calibrated magnitude ratios over a schedule of both experts: at step t, the mean over
    video tokens of |r_t| / |r_(t-1)|, r the blocks' residual; 1.0 at step 0 (nothing before it)."""

    cond: tuple[float, ...]  # step -> ratio of the cond row
    uncond: tuple[float, ...]  # step -> ratio of the uncond row
    source: str  # where the numbers come from (a URL, or the calibration run that measured them)

    def __post_init__(self) -> None:
        if not self.cond or len(self.cond) != len(self.uncond):
            raise ValueError(
                f"`cond` and `uncond` must have one ratio per step, the same number, but have "
                f"{len(self.cond)} and {len(self.uncond)}."
            )

    @property
    def num_steps(self) -> int:
        return len(self.cond)

    def resampled(self, num_steps: int) -> MagnitudeCurve:
        """The curve for a `num_steps` schedule, by nearest index (MagCache's `nearest_interp`)."""
        if num_steps == self.num_steps:
            return self
        if num_steps == 1:
            picks = [self.num_steps - 1]
        else:
            scale = (self.num_steps - 1) / (num_steps - 1)
            picks = [round(step * scale) for step in range(num_steps)]
        return MagnitudeCurve(
            cond=tuple(self.cond[i] for i in picks),
            uncond=tuple(self.uncond[i] for i in picks),
            source=self.source,
        )

    def step_ratios(self, num_steps: int, use_cfg: bool) -> list[float]:
        """step -> the ratio a request of `num_steps` steps decides with: its row's, or with CFG the one of
        its two rows farther from 1."""
        curve = self.resampled(num_steps)
        if not use_cfg:
            return list(curve.cond)
        return [max(c, u, key=lambda r: abs(1.0 - r)) for c, u in zip(curve.cond, curve.uncond, strict=True)]

    def to_json(self) -> dict:
        return {"source": self.source, "cond": list(self.cond), "uncond": list(self.uncond)}

    @classmethod
    def from_json(cls, data: dict) -> MagnitudeCurve:
        return cls(cond=tuple(data["cond"]), uncond=tuple(data["uncond"]), source=data["source"])

    @classmethod
    def load(cls, path: Path) -> MagnitudeCurve:
        return cls.from_json(json.loads(path.read_text()))


@dataclass(frozen=True, slots=True)
class CacheDecision:
    """Whether one step of a request skips its blocks, and its accumulators once that step has run."""

    skip: bool
    accumulated_ratio: float
    accumulated_error: float
    num_in_row: int  # consecutive skipped steps, this one included


@dataclass(slots=True)
class RequestCache:
    """One request's step-cache decisions in one expert's engine (the Denoiser's too). The residual itself
    lives in the step runner's store on every rank (pipeline.denoise.runner), each rank its own shard."""

    settings: StepCacheSettings
    ratios: list[float]  # step index of the request's schedule -> magnitude ratio it decides with
    max_bytes: int  # the bound: one residual of the request's rows
    has_residual: bool = False  # a step computed and stored its residual (the runner's store holds it)
    accumulated_ratio: float = 1.0
    accumulated_error: float = 0.0
    num_in_row: int = 0
    num_skipped: int = 0  # steps served from the residual so far

    def decide(self, index: int) -> CacheDecision:
        """MagCache's decision for step `index` of the request's schedule; changes nothing (`commit` does)."""
        settings = self.settings
        if index < settings.warmup_steps or not self.has_residual:
            return CacheDecision(False, 1.0, 0.0, 0)
        ratio = self.accumulated_ratio * self.ratios[index]
        error = self.accumulated_error + abs(1.0 - ratio)
        num_in_row = self.num_in_row + 1
        if error < settings.threshold and num_in_row <= settings.max_skip:
            return CacheDecision(True, ratio, error, num_in_row)
        return CacheDecision(False, 1.0, 0.0, 0)

    def commit(self, decision: CacheDecision) -> None:
        """Record a step that ran as `decision` said (a computed step stored its new residual)."""
        self.accumulated_ratio = decision.accumulated_ratio
        self.accumulated_error = decision.accumulated_error
        self.num_in_row = decision.num_in_row
        if decision.skip:
            self.num_skipped += 1
        else:
            self.has_residual = True


def new_request_cache(
    settings: StepCacheSettings,
    curve: MagnitudeCurve,
    split: SplitTransformer,
    item: GuidedInput,
    num_steps: int,
) -> RequestCache:
    """An empty cache for a request whose forward input looks like `item`, on a `num_steps` schedule."""
    rows = 1 if item.uncond is None else 2
    dtype = split.transformer.dtype
    element_size = torch.empty((), dtype=dtype).element_size()
    return RequestCache(
        settings=settings,
        ratios=curve.step_ratios(num_steps, item.uncond is not None),
        max_bytes=rows * split.num_tokens(tuple(item.latents.shape)) * split.inner_dim * element_size,
    )


@dataclass(slots=True)
class CachedOutput:
    """What one cached forward produced."""

    noise: list[torch.Tensor]  # input -> guided noise prediction
    residuals: list[torch.Tensor | None]  # input -> its new residual (computed and kept), else None
    num_rows: int  # rows that went through the blocks


def cached_guided_forward(
    split: SplitTransformer,
    inputs: Sequence[GuidedInput],
    reuse: Sequence[torch.Tensor | None],
    keep: Sequence[bool],
) -> CachedOutput:
    """`guided_forward` where input i with `reuse[i]` (rows, tokens, inner_dim) skips the blocks (block
    input + that residual) and input i with `keep[i]` (computed) returns its new residual. Rows as
    `stack_rows` lays them out; the math is `SplitTransformer.cached`, which the engine's runner calls."""
    rows = stack_rows(inputs, split.transformer.dtype)
    row_ids, next_uncond = [], len(inputs)  # input -> its rows: cond, then uncond with CFG
    for index, item in enumerate(inputs):
        row_ids.append([index] if item.uncond is None else [index, next_uncond])
        next_uncond += item.uncond is not None
    row_reuse: list[torch.Tensor | None] = [None] * rows.num_rows
    row_keep = [False] * rows.num_rows
    for index, ids in enumerate(row_ids):
        for position, row in enumerate(ids):
            row_reuse[row] = None if reuse[index] is None else reuse[index][position]
            row_keep[row] = keep[index]
    prediction, row_residuals = split.cached(rows, row_reuse, row_keep)
    residuals = [
        torch.stack([row_residuals[row] for row in ids]) if keep[index] and reuse[index] is None else None
        for index, ids in enumerate(row_ids)
    ]
    num_rows = sum(residual is None for residual in row_reuse)
    return CachedOutput(noise=apply_guidance(inputs, prediction), residuals=residuals, num_rows=num_rows)
