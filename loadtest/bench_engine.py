"""Throughput of the denoise engine against one-request-at-a-time baselines, measured in one process.

    python -m loadtest.bench_engine                      # small preset, 8 requests, 2 buckets, CPU
    python -m loadtest.bench_engine --sizes 160x96,96x160 --rounds 7
    python -m loadtest.bench_engine --threads 1           # one torch thread: steadier on a busy machine

Both experts run (high then low, the full Wan2.2 schedule). Compared on the same requests:
  (a)  engine: a DenoiseEngine per expert, each on its own thread, fed through the asyncio `add` API;
       requests arrive evenly over `--arrival-span` x (requests x the Denoiser's time for one request),
       i.e. at 1/span times the rate one-at-a-time serving can keep up with;
  (a') the same engines with every request arriving at once (the most batching can give);
  (b)  the single-request Denoiser, request by request (high then low);
  (c)  diffusers' WanPipeline called once per request (prompt embeddings given, output_type="latent",
       so no path pays for the text encoder or the VAE).
Throughput is samples x steps per second of wall time: for (a) from the first arrival to the last result,
for (b) and (c) the sum of the back-to-back runs. Rounds interleave the methods (`--rounds`, default 5),
so background load hits them alike; each method's median wall time is shown with its spread (min-max and the
interquartile range), and the ratios a/b and a/c are taken within each round, then summarised the same way
(a ratio of medians hides how far the rounds disagree). Baseline latencies are simulated for the same
arrivals (one first-come-first-served server) from their measured run times.

Every method computes off the main thread (the script runs `main` on a worker thread; the engine has its
own). Read the spread first on a shared machine, beside the printed load average: on this 2-core box with
other agents busy (load average 7-26), the one-at-a-time methods (b) and (c) ran 10-60x slower in some
rounds while the engine's threads slowed 2-3x (a synthetic loop of 64x256 GEMMs + GELU: 11-83 s on the
main thread against 0.9-1.7 s on a fresh thread; 1.2-1.3 s on either with OMP_NUM_THREADS=1). Moving the
baselines off the main thread did not remove it, so the cause is the thread that ran torch first, or
torch's 2 intra-op threads waiting for each other on a descheduled core, not yet pinned down; `--threads 1`
avoids those waits. A ratio from a round whose time collapsed says nothing about the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from pipeline.denoise import DenoiseEngine, Denoiser, DenoiseState, EngineRequest, EngineStats, initial_state
from pipeline.spec import RequestSpec, ResolvedRequest, resolve
from pipeline.text import PromptEmbeds, TextEncoder, pad_embeds
from pipeline.weights import WanComponents, build_preset, wan_pipeline

EXPERTS = ("high", "low")


@dataclass(slots=True)
class Job:
    request_id: str
    resolved: ResolvedRequest
    prompt: PromptEmbeds
    negative: PromptEmbeds


@dataclass(slots=True)
class Result:
    """One timed run of one method over all jobs."""

    seconds: float  # wall time of the whole workload
    latencies: list[float]  # per request: result time - arrival time (baselines: run time, then simulated)
    latents: dict[str, torch.Tensor]  # req_id -> final latents


METHODS = {  # name -> row label
    "engine": "(a) engine, arrivals spread",
    "engine-burst": "(a') engine, all arrive at once",
    "denoiser": "(b) Denoiser, one by one",
    "diffusers": "(c) WanPipeline, one by one",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--sizes", default="256x144,144x256", help="one bucket per WxH, requests alternate")
    parser.add_argument("--duration", type=float, default=0.5, help="seconds of video: 0.5 -> 9 frames")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--arrival-span", type=float, default=0.5, help="x (requests x one request's time)")
    parser.add_argument(
        "--rounds",
        "--repeats",
        type=int,
        default=5,
        help="rounds of all methods (at least 5 for a spread worth reading); medians and spread are shown",
    )
    parser.add_argument("--max-num-tokens", type=int, default=65_536)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"`--rounds` must be at least 1 but is {args.rounds}.")
    return args


def make_jobs(components: WanComponents, args: argparse.Namespace, prefix: str = "") -> list[Job]:
    model = components.model
    encoder = TextEncoder(components.tokenizer, components.text_encoder, max_sequence_length=512)
    sizes = args.sizes.split(",")
    jobs = []
    for index in range(args.requests):
        spec = RequestSpec(
            prompt=f"shot {index}: a dolly move through a rainy neon street",
            negative_prompt="blurry, static",
            resolution=sizes[index % len(sizes)],
            duration=args.duration,
            steps=args.steps,
            seed=1000 + index,
        )
        resolved = resolve(spec, model)
        prompt, negative = encoder.encode([resolved.prompt, resolved.negative_prompt])
        jobs.append(Job(f"{prefix}r{index}", resolved, prompt, negative))
    return jobs


def serial_latencies(durations: list[float], arrivals: list[float]) -> list[float]:
    """Latency of each request on one first-come-first-served server with these run times."""
    latencies, free_at = [], 0.0
    for duration, arrival in zip(durations, arrivals, strict=True):
        free_at = max(free_at, arrival) + duration
        latencies.append(free_at - arrival)
    return latencies


def run_denoiser(components: WanComponents, jobs: list[Job]) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = components.model
    denoisers = {
        expert: Denoiser(module, components.scheduler, expert=expert, boundary_ratio=model.boundary_ratio)
        for expert, module in zip(EXPERTS, (components.transformer, components.transformer_2), strict=True)
    }
    durations, latents = [], {}
    for job in jobs:
        started = time.perf_counter()
        state = initial_state(job.resolved, model)
        for expert in EXPERTS:
            guidance = job.resolved.guidance_high if expert == "high" else job.resolved.guidance_low
            state = denoisers[expert].run(state, job.prompt, job.negative, guidance)
        durations.append(time.perf_counter() - started)
        latents[job.request_id] = state.latents
    return durations, latents


def run_diffusers(components: WanComponents, jobs: list[Job]) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = components.model
    pipe = wan_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    durations, latents = [], {}
    for job in jobs:
        request = job.resolved
        started = time.perf_counter()
        out = pipe(
            prompt_embeds=pad_embeds([job.prompt], model.max_sequence_length),
            negative_prompt_embeds=pad_embeds([job.negative], model.max_sequence_length),
            height=request.height,
            width=request.width,
            num_frames=request.num_frames,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_high,
            guidance_scale_2=request.guidance_low,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="latent",
        ).frames
        durations.append(time.perf_counter() - started)
        latents[job.request_id] = out[0].float()
    return durations, latents


async def run_engine(
    components: WanComponents, jobs: list[Job], arrivals: list[float], args: argparse.Namespace
) -> tuple[float, list[float], dict[str, torch.Tensor], dict[str, EngineStats]]:
    model = components.model
    engines = {
        expert: DenoiseEngine(
            module,
            components.scheduler,
            expert=expert,
            boundary_ratio=model.boundary_ratio,
            max_sequence_length=model.max_sequence_length,
            max_num_tokens=args.max_num_tokens,
            max_batch_size=args.max_batch_size,
        )
        for expert, module in zip(EXPERTS, (components.transformer, components.transformer_2), strict=True)
    }
    for engine in engines.values():
        engine.start()
    start = time.perf_counter()

    async def one(job: Job, arrival: float) -> tuple[float, DenoiseState]:
        await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
        state = initial_state(job.resolved, model)
        for expert in EXPERTS:
            guidance = job.resolved.guidance_high if expert == "high" else job.resolved.guidance_low
            request = EngineRequest(job.request_id, state, job.prompt, job.negative, guidance)
            state = await engines[expert].add(request)
        return time.perf_counter() - start - arrival, state

    try:
        outcomes = await asyncio.gather(
            *(one(job, arrival) for job, arrival in zip(jobs, arrivals, strict=True))
        )
        seconds = time.perf_counter() - start
    finally:
        for engine in engines.values():
            engine.shutdown()
    latents = {job.request_id: state.latents for job, (_, state) in zip(jobs, outcomes, strict=True)}
    stats = {expert: engine.stats() for expert, engine in engines.items()}
    return seconds, [latency for latency, _ in outcomes], latents, stats


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile (the inclusive method: defined for any number of rounds >= 1)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def spread_text(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def iqr_text(values: list[float]) -> str:
    q1, q3 = quartiles(values)
    return f"{q1:.2f}-{q3:.2f}"


def warm_up(components: WanComponents, args: argparse.Namespace) -> None:
    """One short pass of every path so one-time kernel setup is not timed."""
    small = argparse.Namespace(**{**vars(args), "requests": len(args.sizes.split(",")), "steps": 2})
    jobs = make_jobs(components, small, prefix="warm-")
    run_denoiser(components, jobs)
    run_diffusers(components, jobs)
    asyncio.run(run_engine(components, jobs, [0.0] * len(jobs), small))


def service_time(components: WanComponents, jobs: list[Job]) -> float:
    """Seconds the Denoiser needs for one request (best of 3, each bucket): the unit arrivals are paced in."""
    buckets = {job.resolved.latent_shape(components.model): job for job in jobs}
    times = [min(run_denoiser(components, [job])[0][0] for _ in range(3)) for job in buckets.values()]
    return statistics.mean(times)


def spread(span: float, count: int) -> list[float]:
    return [span * index / max(1, count - 1) for index in range(count)]


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    components = build_preset(args.preset)
    jobs = make_jobs(components, args)
    warm_up(components, args)
    runs: dict[str, list[Result]] = {name: [] for name in METHODS}
    arrivals = spread(args.arrival_span * len(jobs) * service_time(components, jobs), len(jobs))
    stats: dict[str, dict[str, EngineStats]] = {}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):  # rounds interleave the methods, so background load hits them alike
        durations, latents = run_denoiser(components, jobs)
        runs["denoiser"].append(Result(sum(durations), durations, latents))
        durations, latents = run_diffusers(components, jobs)
        runs["diffusers"].append(Result(sum(durations), durations, latents))
        for name, at in (("engine", arrivals), ("engine-burst", [0.0] * len(jobs))):
            seconds, latencies, latents, stats[name] = asyncio.run(run_engine(components, jobs, at, args))
            runs[name].append(Result(seconds, latencies, latents))
    for name in (
        "denoiser",
        "diffusers",
    ):  # their latency: one FCFS server, same arrivals, measured run times
        for result in runs[name]:
            result.latencies = serial_latencies(result.latencies, arrivals)
    print_report(args, components, jobs, arrivals, runs, stats, (load_before, os.getloadavg()[0]))


def print_report(
    args: argparse.Namespace,
    components: WanComponents,
    jobs: list[Job],
    arrivals: list[float],
    runs: dict[str, list[Result]],
    stats: dict[str, dict[str, EngineStats]],
    load: tuple[float, float],
) -> None:
    model = components.model
    work = len(jobs) * args.steps  # samples x steps
    buckets = sorted({job.resolved.latent_shape(model) for job in jobs})
    tokens = sorted({job.resolved.num_tokens(model) for job in jobs})
    print(f"command: python -m loadtest.bench_engine {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"preset={args.preset} torch_threads={torch.get_num_threads()} cpus={os.cpu_count()} "
        f"requests={len(jobs)} sizes={args.sizes} frames={jobs[0].resolved.num_frames} steps={args.steps} "
        f"(both experts) rounds={args.rounds} (median and spread shown)"
    )
    print(f"load average (1 min) before the rounds {load[0]:.2f}, after {load[1]:.2f}")
    print(f"buckets (latent C,F,H,W)={buckets}  tokens/sample={tokens} (x2 with CFG)")
    print(
        f"arrivals (a): evenly over {arrivals[-1]:.2f} s = {args.arrival_span} x (requests x the Denoiser's "
        "best time for one request)"
    )
    print(
        f"{'method':<32} {'median wall s':>13} {'min-max':>11} {'IQR':>11} {'samples*steps/s':>15} "
        f"{'p50 s':>6} {'p95 s':>6}  runs (wall s)"
    )
    for name, label in METHODS.items():
        walls = [result.seconds for result in runs[name]]
        latencies = [latency for result in runs[name] for latency in result.latencies]
        print(
            f"{label:<32} {statistics.median(walls):>13.2f} {spread_text(walls):>11} {iqr_text(walls):>11} "
            f"{work / statistics.median(walls):>15.2f} {percentile(latencies, 50):>6.2f} "
            f"{percentile(latencies, 95):>6.2f}  " + " ".join(f"{wall:.2f}" for wall in walls)
        )
    print("throughput ratios, taken within each round (median, min-max, IQR over the rounds):")
    for name in ("engine", "engine-burst"):
        for baseline in ("denoiser", "diffusers"):
            ratios = [
                base.seconds / own.seconds for own, base in zip(runs[name], runs[baseline], strict=True)
            ]
            print(
                f"  {name} / {baseline:<9} {statistics.median(ratios):.2f}x  min-max {spread_text(ratios)}  "
                f"IQR {iqr_text(ratios)}  rounds: " + " ".join(f"{ratio:.2f}" for ratio in ratios)
            )
        for expert, snapshot in stats[name].items():  # the last round's engines
            print(
                f"  {expert} (last round): iterations={snapshot.num_iterations} "
                f"mean batch={snapshot.mean_batch_size:.2f} "
                f"batch sizes={snapshot.batch_size_histogram} mean tokens/iteration="
                f"{snapshot.mean_num_tokens:.0f} it/s={snapshot.iterations_per_second:.2f}"
            )
    engine, denoiser, diffusers = (runs[name][-1].latents for name in ("engine", "denoiser", "diffusers"))
    diff_b = max(float((engine[key] - denoiser[key]).abs().max()) for key in engine)
    diff_c = max(float((engine[key] - diffusers[key]).abs().max()) for key in engine)
    print(f"max abs diff of final latents: engine vs denoiser {diff_b:.1e}, engine vs diffusers {diff_c:.1e}")


if __name__ == "__main__":
    # Every method computes off the main thread, as the engine's own threads do (see the docstring).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench") as pool:
        pool.submit(main).result()
