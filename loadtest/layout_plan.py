"""Which expert layout and degrees a GPU node should run: modelled draft and final latency, clips per hour.

    python -m loadtest.layout_plan              # an 8-GPU H100 node, every layout that fills it
    python -m loadtest.layout_plan --gpus 4
    python -m loadtest.layout_plan --config deploy/gpu-node.yaml   # the deploy file's decoder choices
    python -m loadtest.layout_plan --draft-decoder fast --decode-ranks 4

Every figure is modelled (loadtest/cost_model.py, the fit to the official H100 timings), not measured. Per
layout, for one request alone on its rank group:
  latency   = high-noise steps x one forward on the high group + low-noise steps x one on the low group
              + the serial part (VAE decode and text encoding, cost_model.serial_s: 18 s at 720p)
  clips/h   = 3600 / the busiest stage's seconds a clip, x the groups of that kind on the node: `split`
              pipelines a stream of clips through its two deployments (the slower expert sets the pace),
              `colocated` runs a clip's both experts on one group; the serial part runs beside them (on
              the GPUs the text encoder and VAE share), so it adds to latency, not to the pace.
Tiers (the stage table's recipes): `final` 40 steps, 26 high + 14 low, CFG (2 rows a forward); `cached`
the final tier with its default step cache (DEFAULT_FINAL_CACHE on MagCache's published Wan2.2 curve: the
engine skips 11 of the 26 high-noise and 6 of the 14 low-noise steps, each expert's first step always
runs); `draft` the distill LoRAs' 4 steps, 2 + 2, no CFG rows: a draft has one row, so on a group with a
CFG half the other half idles (the model's forward_s takes ceil(rows / C) rows a half) and a draft gains
only from Ulysses. Decode (each tier's choice, `DecodeChoice`, the config's `decoder`): drafts take the
fast TAEHV decoder when `decoder.draft: fast`, finals always the full VAE, in `decoder.dtype` (auto: bf16
on GPUs), split over `decoder.parallel` ranks (the decoder's GPUs: beside the denoisers', not counted in
the layout's GPUs). The boundary hop of the split layout (a 77 MB state at 720p through the object store)
is not modelled: well under a second, off the path once the checkpoint is written in the background.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import yaml

from loadtest.cost_model import A14B, SIZES, CostModel
from pipeline.denoise.calibration import WAN22_T2V_A14B_CURVE
from pipeline.denoise.parallel import ParallelDegree
from pipeline.denoise.stepcache import MagnitudeCurve, RequestCache
from pipeline.spec import DEFAULT_FINAL_CACHE

LayoutName = Literal["split", "colocated"]
Tier = Literal["draft", "final", "cached"]
FINAL_STEPS, HIGH_FINAL_STEPS = 40, 26  # boundary 0.875 with flow_shift 12: 26 high-noise + 14 low-noise
DRAFT_STEPS = (2, 2)  # the distill recipe's 4 steps, per expert
NUM_FRAMES = 81
TIERS: tuple[Tier, ...] = ("draft", "final", "cached")


@functools.cache
def cached_final_steps() -> tuple[int, int]:
    """(high-noise, low-noise) steps a final with the default cache computes, by the engine's own rule
    (pipeline.denoise.stepcache.RequestCache) on MagCache's Wan2.2 T2V-A14B curve: a cache per expert."""
    ratios = MagnitudeCurve.load(WAN22_T2V_A14B_CURVE).step_ratios(FINAL_STEPS, use_cfg=True)
    computed = []
    for first, end in ((0, HIGH_FINAL_STEPS), (HIGH_FINAL_STEPS, FINAL_STEPS)):
        cache = RequestCache(DEFAULT_FINAL_CACHE, ratios, max_bytes=0)
        for index in range(first, end):
            cache.commit(cache.decide(index))
        computed.append(end - first - cache.num_skipped)
    return computed[0], computed[1]


def tier_steps(tier: Tier) -> tuple[int, int]:
    """(high-noise, low-noise) forwards one request of `tier` runs."""
    if tier == "draft":
        return DRAFT_STEPS
    if tier == "cached":
        return cached_final_steps()
    return HIGH_FINAL_STEPS, FINAL_STEPS - HIGH_FINAL_STEPS


@dataclass(frozen=True)
class DecodeChoice:
    """How the VAEDecoder replicas decode each tier (the config's `decoder` settings)."""

    ranks: int = 1  # decoder.parallel: GPUs one full-VAE decode is split over
    dtype: str = "bfloat16"  # decoder.dtype on a GPU (auto: bfloat16)
    draft: str = "vae"  # decoder.draft: vae | fast (TAEHV); finals always take the full VAE

    def model(self, model: CostModel, tier: Tier) -> CostModel:
        """`model` with the decode term of `tier`'s decoder."""
        if tier == "draft" and self.draft == "fast":
            return replace(model, decode_decoder="fast", decode_ranks=1)
        return replace(model, decode_decoder="vae", decode_ranks=self.ranks, decode_dtype=self.dtype)

    @property
    def label(self) -> str:
        drafts = "the fast TAEHV decoder" if self.draft == "fast" else "the full VAE"
        gpus = f"{self.ranks} GPU{'s' if self.ranks > 1 else ''}"
        return f"decode: drafts by {drafts}, finals by the full VAE in {self.dtype} on {gpus}"

    @classmethod
    def from_config(cls, path: Path) -> DecodeChoice:
        """The decoder settings of a deploy file's app (serve.config's DecoderSettings, its defaults)."""
        (app,) = yaml.safe_load(path.read_text())["applications"]
        settings = app.get("args", {}).get("decoder", {})
        dtype = settings.get("dtype", "auto")
        return cls(
            ranks=int(settings.get("parallel", 1)),
            dtype="bfloat16" if dtype == "auto" else dtype,
            draft=settings.get("draft", "vae"),
        )


NO_CHOICE = DecodeChoice()  # the cost model's own decode term: the full VAE in bf16 on one GPU


@dataclass(frozen=True)
class NodePlan:
    """How a node's denoising GPUs are laid out: `groups` copies of one rank group (colocated: both experts
    on every rank of a `high` group) or of one pair of deployments (split: a `high` and a `low` group)."""

    layout: LayoutName
    high: ParallelDegree
    low: ParallelDegree
    groups: int = 1

    @property
    def gpus(self) -> int:
        per_group = self.high.world_size
        if self.layout == "split":
            per_group += self.low.world_size
        return self.groups * per_group

    @property
    def label(self) -> str:
        if self.layout == "colocated":
            return f"colocated {self.groups} x {degree_text(self.high)}"
        return f"split {self.groups} x ({degree_text(self.high)} + {degree_text(self.low)})"

    def expert_seconds(self, model: CostModel, size: str, tier: Tier) -> tuple[float, float]:
        """(high-noise, low-noise) seconds of one request's forwards on its groups."""
        tokens = A14B.num_video_tokens(*SIZES[size], NUM_FRAMES)
        rows = 1 if tier == "draft" else 2
        high_steps, low_steps = tier_steps(tier)
        low = self.high if self.layout == "colocated" else self.low
        return (
            high_steps * model.forward_s(tokens, rows, self.high),
            low_steps * model.forward_s(tokens, rows, low),
        )

    def latency_s(self, model: CostModel, size: str, tier: Tier, decode: DecodeChoice = NO_CHOICE) -> float:
        """One request alone: both experts' forwards plus the serial part, decoded as `decode` says."""
        serial = decode.model(model, tier).serial_s(*SIZES[size], NUM_FRAMES)
        return sum(self.expert_seconds(model, size, tier)) + serial

    def clips_per_hour(self, model: CostModel, size: str, tier: Tier) -> float:
        """Clips an hour when the node is busy with only this kind of request (see the module docstring)."""
        high, low = self.expert_seconds(model, size, tier)
        pace = high + low if self.layout == "colocated" else max(high, low)
        return self.groups * 3600.0 / pace


def degree_text(degree: ParallelDegree) -> str:
    parts = [f"U{degree.ulysses}"] if degree.ulysses > 1 else []
    parts += [f"C{degree.cfg}"] if degree.cfg > 1 else []
    return "x".join(parts) or "1 GPU"


TODAY_GPU_NODE = NodePlan("split", ParallelDegree(ulysses=5), ParallelDegree(cfg=2))  # before issue 25
DEGREES = (
    ParallelDegree(),
    ParallelDegree(ulysses=2),
    ParallelDegree(cfg=2),
    ParallelDegree(ulysses=4),
    ParallelDegree(ulysses=2, cfg=2),
    ParallelDegree(ulysses=8),
    ParallelDegree(ulysses=4, cfg=2),
)


def candidates(gpus: int) -> list[NodePlan]:
    """Every colocated layout that fills `gpus` with equal groups, the split pairs that use all of them
    (or all but one, the GPU the text encoder and VAE get today), and today's gpu-node split (8 GPUs)."""
    plans = [
        NodePlan("colocated", degree, degree, gpus // degree.world_size)
        for degree in DEGREES
        if gpus % degree.world_size == 0
    ]
    for high in DEGREES:
        for low in DEGREES:
            pair = high.world_size + low.world_size
            if pair <= gpus and gpus - (gpus // pair) * pair <= 1 and high.world_size >= low.world_size:
                plans.append(NodePlan("split", high, low, gpus // pair))
    if gpus == 8:
        plans.append(TODAY_GPU_NODE)
    return plans


def plan_table(model: CostModel, gpus: int = 8, decode: DecodeChoice = NO_CHOICE) -> str:
    """The candidates for a node of `gpus` GPUs, fastest 720p final first."""
    plans = sorted(candidates(gpus), key=lambda plan: plan.latency_s(model, "720p", "final", decode))
    high, low = cached_final_steps()
    lines = [
        f"modelled (loadtest/cost_model.py, fitted to the official H100 timings): a {gpus}-GPU node, "
        "81 frames; seconds for one request alone, clips/h with the node busy on that tier",
        f"final: 40 steps with CFG; cached: the default final cache, {high} + {low} of 26 + 14 steps "
        "computed; draft: 4 steps, no CFG rows (a draft batches: its clips/h is the floor)",
        decode.label,
        f"{'layout':<34} {'GPUs':>4}  "
        + " ".join(f"{size + ' ' + tier:>12}" for size in ("720p", "480p") for tier in TIERS)
        + "  "
        + " ".join(f"{'/h ' + size + ' ' + tier:>15}" for size in ("720p",) for tier in TIERS),
    ]
    for plan in plans:
        latencies = " ".join(
            f"{plan.latency_s(model, size, tier, decode):>12.1f}"
            for size in ("720p", "480p")
            for tier in TIERS
        )
        rates = " ".join(f"{plan.clips_per_hour(model, '720p', tier):>15.1f}" for tier in TIERS)
        marker = "  <- gpu-node.yaml before issue 25 (no drafts served)" if plan == TODAY_GPU_NODE else ""
        lines.append(f"{plan.label:<34} {plan.gpus:>4}  {latencies}  {rates}{marker}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8, help="the node's GPUs")
    parser.add_argument("--config", type=Path, help="take the decoder choices of this deploy file")
    parser.add_argument("--draft-decoder", choices=("vae", "fast"), help="decoder.draft")
    parser.add_argument("--decode-ranks", type=int, help="decoder.parallel: GPUs one decode is split over")
    parser.add_argument("--decode-dtype", choices=("bfloat16", "float32"), help="decoder.dtype")
    args = parser.parse_args(argv)
    decode = DecodeChoice.from_config(args.config) if args.config is not None else NO_CHOICE
    given = {"draft": args.draft_decoder, "ranks": args.decode_ranks, "dtype": args.decode_dtype}
    decode = replace(decode, **{name: value for name, value in given.items() if value is not None})
    print(plan_table(CostModel(), args.gpus, decode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
