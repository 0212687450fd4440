"""Quality tiers side by side: per clip, wall time, transformer forwards and rows, against `final`.

    python -m loadtest.bench_tiers --preset small                   # degrees 1, U2, C2
    python -m loadtest.bench_tiers --preset tiny --clips 3 --thresholds 0.003,0.06 --size 256x144
    python -m loadtest.bench_tiers --degrees 1,U2,C2,U2xC2          # four processes for the last

Each tier is one row of the table (`tiers()`): `final` (the official recipe: the model's steps and CFG,
UniPC, no cache), `final` with step caching (pipeline.denoise.stepcache) at each `--thresholds` value
(max_skip and warm-up from DEFAULT_FINAL_CACHE, the final tier's default), and `draft` (the 4-step
distill recipe: Euler, shift 5, no CFG rows, with the preset's built-in distill LoRA in both experts).
Every clip runs alone through a DenoiseEngine per expert (high then low), so the forwards and rows
counted are that clip's own; the curve is the preset's own calibration (the published Wan2.2 ratios only
fit the real weights). PSNR is of each tier's decoded frames against final's decoded frames of the same
clip (same seed and prompt); `inf` means identical frames. On a preset the distill LoRA is seeded random,
not distilled, so the draft's PSNR says how far its take is from final's, not how good a real distilled
draft is; its forward and row counts and its time ratio are what carry over to the real model.
Degrees (`--degrees`, the `degree` column): `1` runs the engines in this process; `U2`, `C2` (`U2xC2`...)
run the same engines over a rank group of spawned processes (pipeline.local.sharded_pipeline: Ulysses
over the video tokens, CFG rows over halves; gloo on CPU), each degree on freshly built components of the
same seed, with the distill LoRA and the step cache on every rank. PSNR is against degree 1's final, and
`max diff` is the largest latent difference from the same tier at degree 1 (sharded equals unsharded).
On a CPU a group's ranks share the cores (each spawned rank takes cpus / ranks torch threads): the
degree column shows what sharding costs or saves here, not what it does on GPUs.
Printed, not asserted: a shared CPU is noisy, so wall times are the median over `--repeats` rounds. Every
degree computes off the main thread (see loadtest/bench_engine.py: on a busy 2-core machine torch ops
from the main thread ran 10-60x slower).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.denoise import DenoiseEngine, EngineRequest, initial_state
from pipeline.denoise.adapters import load_bank
from pipeline.denoise.calibration import WAN22_T2V_A14B_CURVE, calibration_curve
from pipeline.denoise.experts import expert_step_indices
from pipeline.denoise.parallel import ParallelDegree
from pipeline.denoise.state import tier_solvers
from pipeline.denoise.stepcache import MagnitudeCurve, RequestCache
from pipeline.local import sharded_pipeline
from pipeline.lora import BUILTIN, distill_folder
from pipeline.spec import (
    DEFAULT_FINAL_CACHE,
    DISTILL_ADAPTER,
    ModelSpec,
    Quality,
    RequestSpec,
    ResolvedRequest,
    StepCacheSettings,
    resolve,
)
from pipeline.text import PromptEmbeds, TextEncoder
from pipeline.vae import VAEDecoder
from pipeline.weights import WanComponents, build_preset

EXPERTS = ("high", "low")
COUNTED = ("num_forwards", "num_rows", "num_cached_steps", "latents")  # the same in every round


@dataclass(frozen=True, slots=True)
class Tier:
    """One row of the table: how a clip is generated."""

    name: str
    quality: Quality = "final"  # the recipe: steps, solver, CFG and the adapter its experts run with
    cache: StepCacheSettings | None = None  # step caching; None: every step runs


@dataclass(slots=True)
class Clip:
    spec: RequestSpec  # the shot, seed fixed; each tier resolves it with its own recipe
    prompt: PromptEmbeds
    negative: PromptEmbeds

    def resolved(self, tier: Tier, model: ModelSpec) -> ResolvedRequest:
        spec = self.spec.model_copy(update={"quality": tier.quality, "cache": tier.cache})
        return resolve(spec, model)


@dataclass(slots=True)
class Run:
    """One tier on one clip."""

    seconds: float  # wall time of both experts
    num_forwards: int  # transformer calls (both experts)
    num_rows: int  # rows through the blocks (both experts)
    num_cached_steps: int  # steps served from the step cache (both experts)
    latents: torch.Tensor  # after the low expert


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--size", default="160x96")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds of video: 1 -> 17 frames")
    parser.add_argument("--thresholds", default="0.003,0.06", help="one cached final row per threshold")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; wall times are medians")
    parser.add_argument(
        "--degrees", default="1,U2,C2", help="rank groups to run every tier on: 1, U<n>, C<n>, U<n>xC<m>"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    return parser.parse_args()


def parse_degree(text: str) -> ParallelDegree:
    """`1`, `U2`, `C2` or `U2xC2` -> the rank group's degree; ValueError naming the forms otherwise."""
    ulysses, cfg = 1, 1
    for part in text.upper().split("X"):
        if part == "1":
            continue
        if len(part) < 2 or part[0] not in "UC" or not part[1:].isdigit():
            raise ValueError(f"a degree must read 1, U<n>, C<n> or U<n>xC<m> but is {text!r}.")
        if part[0] == "U":
            ulysses = int(part[1:])
        else:
            cfg = int(part[1:])
    return ParallelDegree(ulysses=ulysses, cfg=cfg)


def tiers(args: argparse.Namespace) -> list[Tier]:
    """The rows: final (no cache), final with caching at each threshold, then draft."""
    cached = [
        Tier(
            f"final + cache {threshold:g}",
            cache=DEFAULT_FINAL_CACHE.model_copy(update={"threshold": threshold}),
        )
        for threshold in map(float, args.thresholds.split(","))
    ]
    return [Tier("final"), *cached, Tier("draft", quality="draft")]


def make_clips(components: WanComponents, args: argparse.Namespace) -> list[Clip]:
    encoder = TextEncoder(components.tokenizer, components.text_encoder, max_sequence_length=512)
    clips = []
    for index in range(args.clips):
        spec = RequestSpec(
            prompt=f"shot {index}: a slow crane up a foggy harbour at dawn",
            resolution=args.size,
            duration=args.duration,
            seed=2000 + index,
        )
        resolved = resolve(spec, components.model)
        prompt, negative = encoder.encode([resolved.prompt, resolved.negative_prompt])
        clips.append(Clip(spec, prompt, negative))
    return clips


def run(
    components: WanComponents,
    curve: MagnitudeCurve,
    engines: dict[str, DenoiseEngine],
    tier: Tier,
    clip: Clip,
) -> Run:
    """One clip through both engines, counting what it alone added to their stats."""
    resolved = clip.resolved(tier, components.model)
    before = {expert: engine.stats() for expert, engine in engines.items()}
    started = time.perf_counter()
    state = initial_state(resolved, components.model)
    for expert in EXPERTS:
        guidance = resolved.guidance_high if expert == "high" else resolved.guidance_low
        request = EngineRequest(
            f"{tier.name}:{resolved.seed}",
            state,
            clip.prompt,
            clip.negative,
            guidance,
            quality=resolved.quality,
            adapters=resolved.adapters(components.model),
            cache=resolved.cache,
        )
        future = engines[expert].submit(request)
        while not future.done():
            engines[expert].step()
        state = future.result()
    seconds = time.perf_counter() - started
    after = {expert: engine.stats() for expert, engine in engines.items()}
    count = lambda name: sum(getattr(after[e], name) - getattr(before[e], name) for e in EXPERTS)  # noqa: E731
    return Run(seconds, count("num_forwards"), count("num_rows"), count("num_cached_steps"), state.latents)


def planned_skips(
    components: WanComponents, curve: MagnitudeCurve, cache: StepCacheSettings, num_steps: int
) -> dict[str, int]:
    """expert -> steps a CFG request skips: the decision depends on the curve and settings only."""
    skips = {}
    for expert in EXPERTS:
        indices = expert_step_indices(
            components.scheduler, num_steps, components.model.boundary_ratio, expert
        )
        state = RequestCache(cache, curve.step_ratios(num_steps, use_cfg=True), max_bytes=0)
        skips[expert] = 0
        for index in indices:
            decision = state.decide(index)
            state.commit(decision)
            skips[expert] += decision.skip
    return skips


def psnr(frames: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    errors = [float(((a.float() - b.float()) ** 2).mean()) for a, b in zip(frames, reference, strict=True)]
    mse = statistics.fmean(errors)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@contextmanager
def degree_engines(
    components: WanComponents, degree: ParallelDegree, curve: MagnitudeCurve, cache_dir: Path
) -> Iterator[dict[str, DenoiseEngine]]:
    """expert -> its engine at `degree`, with the preset's distill LoRA and `curve` (step caching)."""
    if degree.is_sharded:
        with sharded_pipeline(components, degree, draft_lora=BUILTIN, cache_dir=cache_dir) as pipeline:
            engines = {expert: pipeline.denoisers[expert].engine for expert in EXPERTS}
            for engine in engines.values():
                engine.cache_curve = curve
            yield engines
        return
    model = components.model
    folders = {DISTILL_ADAPTER: distill_folder(BUILTIN, components.source, cache_dir=cache_dir)}
    yield {
        expert: DenoiseEngine(
            module,
            components.scheduler,
            expert=expert,
            boundary_ratio=model.boundary_ratio,
            max_sequence_length=model.max_sequence_length,
            cache_curve=curve,
            solvers=tier_solvers(model, components.scheduler),
            adapters=load_bank(module, expert, folders),
        )
        for expert, module in zip(EXPERTS, (components.transformer, components.transformer_2), strict=True)
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    degrees = {label: parse_degree(label) for label in args.degrees.split(",")}
    components = build_preset(args.preset)
    model = components.model
    curve = calibration_curve(args.preset, model)
    decoder = VAEDecoder(components.vae)
    clips, rows = make_clips(components, args), tiers(args)
    runs: dict[tuple[str, str], list[Run]] = {}  # (degree, tier) -> per clip: first round, median wall
    frames: dict[tuple[str, str], list[torch.Tensor]] = {}  # (degree, tier) -> per clip: decoded uint8
    for label, degree in degrees.items():
        fresh = build_preset(args.preset)  # a group shards its experts in place: each degree its own copy
        with (
            tempfile.TemporaryDirectory() as cache_dir,
            degree_engines(fresh, degree, curve, Path(cache_dir)) as engines,
        ):
            rounds: dict[tuple[str, int], list[Run]] = {}  # (tier, clip) -> its run in each round
            run(fresh, curve, engines, rows[0], clips[0])  # warm-up, not counted
            for _ in range(args.repeats):
                for tier in rows:  # rounds interleave the tiers
                    for index, clip in enumerate(clips):
                        result = run(fresh, curve, engines, tier, clip)
                        rounds.setdefault((tier.name, index), []).append(result)
        for tier in rows:
            for index in range(len(clips)):
                done = rounds[(tier.name, index)]
                median = statistics.median(r.seconds for r in done)
                runs.setdefault((label, tier.name), []).append(
                    Run(median, *[getattr(done[0], f) for f in COUNTED])
                )
                pixels = decoder.decode(done[0].latents, fps=model.fps).pixels
                frames.setdefault((label, tier.name), []).append(torch.from_numpy(pixels))
    print_table(args, model, clips, rows, list(degrees), runs, frames)
    published = MagnitudeCurve.load(WAN22_T2V_A14B_CURVE)
    for tier in rows:
        if tier.cache is not None:
            skips = planned_skips(components, published, tier.cache, model.num_steps)
            print(
                f"{tier.name}: on MagCache's published Wan2.2 T2V-A14B curve a {model.num_steps}-step "
                f"request skips {skips['high']} high-noise + {skips['low']} low-noise steps"
            )


def print_table(
    args: argparse.Namespace,
    model: ModelSpec,
    clips: list[Clip],
    rows: list[Tier],
    degrees: list[str],
    runs: dict[tuple[str, str], list[Run]],
    frames: dict[tuple[str, str], list[torch.Tensor]],
) -> None:
    """One line per clip, degree and tier, ratios against that clip's `final` at degree 1; then the mean
    over the clips."""
    final = clips[0].resolved(rows[0], model)
    draft = clips[0].resolved(Tier("draft", quality="draft"), model)
    print(
        f"preset {args.preset}, {len(clips)} clips of {final.width}x{final.height}, {final.num_frames} "
        f"frames; final {final.steps} steps, CFG {final.guidance_high:g}/{final.guidance_low:g}; draft "
        f"{draft.steps} steps, CFG {draft.guidance_high:g}/{draft.guidance_low:g}; wall time per clip, "
        f"median of {args.repeats} rounds; torch threads {torch.get_num_threads()}"
    )
    print(f"command: python -m loadtest.bench_tiers {' '.join(sys.argv[1:])}".rstrip())
    header = ("clip", "degree", "tier", "steps", "wall s", "x final", "forwards", "x final", "rows")
    header = (*header, "x final", "skipped", "max diff")
    print(
        " | ".join(
            [f"{header[0]:<4}", f"{header[1]:<6}", f"{header[2]:<20}", *(f"{h:>8}" for h in header[3:])]
        )
        + " | PSNR dB"
    )
    base_key = (degrees[0], rows[0].name)
    reference = frames[base_key]
    for label, picked in [*((f"#{i}", [i]) for i in range(len(clips))), ("mean", list(range(len(clips))))]:
        base = [runs[base_key][i] for i in picked]
        base_wall = statistics.fmean(r.seconds for r in base)
        base_forwards = statistics.fmean(r.num_forwards for r in base)
        base_rows = statistics.fmean(r.num_rows for r in base)
        for degree in degrees:
            for tier in rows:
                done = [runs[degree, tier.name][i] for i in picked]
                alone = [runs[degrees[0], tier.name][i] for i in picked]
                wall = statistics.fmean(r.seconds for r in done)
                forwards = statistics.fmean(r.num_forwards for r in done)
                num_rows = statistics.fmean(r.num_rows for r in done)
                steps = clips[0].resolved(tier, model).steps
                db = psnr([frames[degree, tier.name][i] for i in picked], [reference[i] for i in picked])
                diff = max(
                    float((a.latents - b.latents).abs().max()) for a, b in zip(done, alone, strict=True)
                )
                cells = (
                    f"{steps}",
                    f"{wall:.2f}",
                    f"{wall / base_wall:.2f}",
                    f"{forwards:g}",
                    f"{forwards / base_forwards:.2f}",
                    f"{num_rows:g}",
                    f"{num_rows / base_rows:.2f}",
                    f"{statistics.fmean(r.num_cached_steps for r in done):g}",
                    f"{diff:.1e}",
                )
                print(
                    " | ".join(
                        [f"{label:<4}", f"{degree:<6}", f"{tier.name:<20}", *(f"{c:>8}" for c in cells)]
                    )
                    + f" | {db:.1f}"
                )


if __name__ == "__main__":
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench") as pool:  # off the main thread
        pool.submit(main).result()
