"""How long a Wan2.2 A14B expert forward and a whole clip take on GPUs: FLOPs, throughput, communication.

    python -m loadtest.capacity --calibrate      # this model against the published official timings

One expert forward of `rows` rows of N video tokens on a rank group of U (Ulysses) x C (CFG) GPUs:
    compute   = (matmul FLOPs / matmul throughput + attention FLOPs / attention throughput) / U,
                over ceil(rows / C) rows on each CFG half (pipeline.denoise.flops counts the FLOPs; self-
                attention is the 4 N^2 d term, quadratic in the tokens)
    comm      = Ulysses all-to-all bytes one rank sends / link bandwidth
                + 4 all-to-alls a layer x collective latency            (U > 1; parallel.ulysses_bytes_…)
                + one all-gather of the halves' predictions (C > 1: latency only, the latents are small)
A clip: every step of each expert (CFG: 2 rows) plus the serial part that no rank group shares (VAE
decode and text encoding, proportional to the clip's pixels x frames).

The defaults are ONE set of parameters fitted (by `fit`, a seeded random search then a local refinement)
to all six published points of the official Wan2.2 scripts on H100 (80 GB, 989 TFLOP/s dense bf16): 720p
1041.5 / 288.7 / 155.1 s and 480p 326.9 / 91.7 / 51.5 s on 1 / 4 / 8 GPUs (81 frames, 40 steps, CFG,
Ulysses over all GPUs), from the Wan2.2 README's computational-efficiency table. Two throughputs are
needed, not one: the published 1-GPU times grow 3.19x from 480p to 720p while the FLOPs grow 3.88x
(with one MFU the best fit misses by 9 %); attention at long sequence keeps the GPU busier than the
projections do. Fitted: matmul 30 % and attention 71 % of peak, 216 GB/s and 142 µs per collective,
243 s of serial work per 1e9 pixel-frames (18 s for a 720p clip); worst error 0.9 %. (`fit()` with its
default budget lands in a neighbouring optimum, 2.6 %; the defaults are the best of longer searches.)
It is a model of those scripts on that machine: other
kernels (FlashAttention 3, compile) move the throughputs, which the CLI lets you set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from pipeline.denoise.flops import wan_forward_flops
from pipeline.denoise.parallel import ParallelDegree, ulysses_bytes_per_forward

# Wan2.2-T2V-A14B, one expert: dim 5120 = 40 heads x 128, 40 layers, FFN 13824 (its config.json)
DIM, FFN_DIM, NUM_LAYERS, TEXT_TOKENS = 5120, 13824, 40, 512
H100_BF16_DENSE = 989e12
ONE_GPU = ParallelDegree()
BF16_BYTES = 2
PATCH = (1, 2, 2)  # latent frames, height, width per video token
VAE_STRIDE = (4, 16, 16)  # Wan2.2's VAE: 4x in time, 16x in space (A14B uses the 8x VAE: 8x spatial)
SIZES = {"480p": (832, 480), "720p": (1280, 720)}
# (size, GPUs) -> seconds for 81 frames, 40 steps with CFG: the Wan2.2 README's efficiency table, H100
PUBLISHED_H100_S = {
    ("720p", 1): 1041.5,
    ("720p", 4): 288.7,
    ("720p", 8): 155.1,
    ("480p", 1): 326.9,
    ("480p", 4): 91.7,
    ("480p", 8): 51.5,
}


def video_tokens(width: int, height: int, num_frames: int) -> int:
    """Transformer tokens of a clip: latent frames x latent rows x latent columns, after 1x2x2 patches.
    The A14B's VAE compresses 4x in time and 8x in space; patches halve each spatial side again."""
    latent_frames = (num_frames - 1) // 4 + 1
    return latent_frames * (height // 16) * (width // 16)


def attention_flops(
    num_tokens: int, *, dim: int = DIM, num_layers: int = NUM_LAYERS, num_rows: int = 1
) -> float:
    """The self-attention scores and values of wan_forward_flops: 4 N^2 d a layer and row."""
    return 4.0 * num_tokens * num_tokens * dim * num_layers * num_rows


@dataclass(frozen=True)
class CostModel:
    """Seconds of expert forwards and clips on one kind of GPU; see the module docstring."""

    peak_flops: float = H100_BF16_DENSE
    matmul_mfu: float = 0.2989
    attention_mfu: float = 0.7113
    link_bandwidth: float = 216.0e9  # bytes/s a rank's all-to-all sends, effective
    collective_latency_s: float = 142e-6
    serial_s_per_gigapixel: float = 242.6  # VAE decode + text encoding, per 1e9 pixel-frames
    cache_skip: float = 0.0  # share of final-tier steps a step cache skips (MagCache-style)

    def forward_s(self, num_tokens: int, num_rows: int, degree: ParallelDegree = ONE_GPU) -> float:
        """One batched expert forward of `num_rows` rows of `num_tokens` tokens on `degree`'s group."""
        rows = math.ceil(num_rows / degree.cfg)
        total = wan_forward_flops(
            num_tokens,
            dim=DIM,
            ffn_dim=FFN_DIM,
            num_layers=NUM_LAYERS,
            text_tokens=TEXT_TOKENS,
            num_rows=rows,
        )
        attention = attention_flops(num_tokens, num_rows=rows)
        compute = (
            (total - attention) / (self.peak_flops * self.matmul_mfu)
            + attention / (self.peak_flops * self.attention_mfu)
        ) / degree.ulysses
        comm = 0.0
        if degree.ulysses > 1:
            sent = ulysses_bytes_per_forward(num_rows, num_tokens, DIM, NUM_LAYERS, degree, BF16_BYTES)
            comm += sent / self.link_bandwidth + 4 * NUM_LAYERS * rows * self.collective_latency_s
        if degree.cfg > 1:
            comm += self.collective_latency_s
        return compute + comm

    def serial_s(self, width: int, height: int, num_frames: int) -> float:
        """The work of a clip outside the experts: VAE decode and text encoding."""
        return self.serial_s_per_gigapixel * width * height * num_frames / 1e9

    def clip_s(
        self,
        width: int,
        height: int,
        num_frames: int = 81,
        steps: int = 40,
        cfg: bool = True,
        degree: ParallelDegree = ONE_GPU,
    ) -> float:
        """A whole clip alone on one group of GPUs (both experts on the same group, as the official
        scripts run them): every step's guided forward, plus the serial part."""
        tokens = video_tokens(width, height, num_frames)
        return steps * self.forward_s(tokens, 2 if cfg else 1, degree) + self.serial_s(
            width, height, num_frames
        )

    def published_errors(self) -> dict[tuple[str, int], tuple[float, float]]:
        """(size, GPUs) -> (published seconds, this model's seconds) for the six official points."""
        return {
            (size, gpus): (seconds, self.clip_s(*SIZES[size], degree=ParallelDegree(ulysses=gpus)))
            for (size, gpus), seconds in PUBLISHED_H100_S.items()
        }


def worst_error(model: CostModel) -> float:
    return max(abs(predicted - seconds) / seconds for seconds, predicted in model.published_errors().values())


def fit(seed: int = 0, samples: int = 20_000, refinements: int = 20_000) -> CostModel:
    """The parameters that minimise the worst relative error over the six published points: a seeded
    random search over wide ranges, then multiplicative local steps that keep only improvements."""
    rng = np.random.default_rng(seed)

    def model(values: np.ndarray) -> CostModel:
        matmul, attention, bandwidth, latency, serial = values
        return CostModel(
            matmul_mfu=matmul,
            attention_mfu=attention,
            link_bandwidth=bandwidth,
            collective_latency_s=latency,
            serial_s_per_gigapixel=serial,
        )

    low = np.array([0.05, 0.05, 1e10, 1e-6, 0.0])
    high = np.array([1.0, 1.0, 1e12, 1e-2, 100.0])
    best = min(
        (rng.uniform(low, high) for _ in range(samples)), key=lambda values: worst_error(model(values))
    )
    best_error = worst_error(model(best))
    for _ in range(refinements):
        trial = np.clip(best * np.exp(rng.normal(0.0, 0.02, size=best.shape)), low, high)
        error = worst_error(model(trial))
        if error < best_error:
            best, best_error = trial, error
    return model(best)


def with_cache(model: CostModel, skip: float) -> CostModel:
    return replace(model, cache_skip=skip)
