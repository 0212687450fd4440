"""One-process run of the whole chain: TextEncoder → (VAEEncoder, for an I2V model's keyframes) → high
Denoiser → low Denoiser → VAEDecoder → Upscaler → Finisher (conform, grade, frame check, label, encode).
The same stage classes run inside Serve replicas unchanged, so a clip made here equals the cluster's for
the same shot, seed and finish.

`sharded_pipeline` runs the same chain with both experts sharded over U x C processes on this machine
(gloo on CPU, NCCL with one GPU per rank): this process is rank 0 and runs every stage; the spawned
ranks hold only the experts, each with the same adapters (the draft tier's distill LoRA), and serve their
share of each step, cached steps included (pipeline.denoise.parallel).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.multiprocessing as mp

from pipeline.denoise import Denoiser, DenoiseState, initial_state
from pipeline.denoise.adapters import AdapterBank, load_bank
from pipeline.denoise.calibration import calibration_curve
from pipeline.denoise.experts import expert_step_indices
from pipeline.denoise.parallel import (
    DEFAULT_TIMEOUT_S,
    GroupRunner,
    ParallelDegree,
    ShardGroup,
    shape_problem,
    worker_loop,
)
from pipeline.denoise.runner import Holding, StepRunner
from pipeline.denoise.state import tier_solvers
from pipeline.determinism import make_batch_invariant
from pipeline.finish import ClipFinish, Finisher
from pipeline.frames import Frames
from pipeline.interpolate import Interpolator
from pipeline.lora import BUILTIN, distill_folder
from pipeline.lut import Lut
from pipeline.safety import FrameCheck
from pipeline.spec import DISTILL_ADAPTER, RequestSpec, ResolvedRequest, resolve
from pipeline.stages import job_plan
from pipeline.taehv import FastDecoder
from pipeline.text import TextEncoder
from pipeline.upscale import Upscaler, resize_frames, upscale_target_size
from pipeline.vae import VAEDecoder
from pipeline.vae_encode import Keyframes, VAEEncoder
from pipeline.video import DRAFT_LABEL
from pipeline.weights import DEFAULT_CACHE_DIR, PRESETS, WanComponents, load_components

# the progress steps of a one-process run, from the stage table (finishing reports its finer steps)
STAGES = tuple(step for row in job_plan() for step in row.steps)
I2V_STAGES = tuple(step for row in job_plan(has=frozenset({"keyframes"})) for step in row.steps)

# (stage, units done, units total) -> None; units are steps, latent frames or frames per stage.
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True, slots=True)
class FinishOptions:
    """What happens to the clip after decoding."""

    upscale: str = "none"  # none | 720p | 1080p
    look: str = "none"  # none | film, or the name of `lut`'s look
    label: str | None = DRAFT_LABEL  # burned-in text; None leaves frames unmarked (metadata still marks)
    fps: int | None = None  # delivered rate (16, 24, 25): conformed after upscaling; None keeps the model's
    lut: Lut | None = None  # a .cube look (pipeline.finish.lut_from_cube); `look` is then its name


@dataclass(slots=True)
class GenerationResult:
    """What a finished clip is and what it cost."""

    path: Path
    request: ResolvedRequest  # with the seed actually used
    width: int  # of the written mp4 (after upscaling)
    height: int
    num_frames: int
    stage_seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds


class LocalPipeline:
    """All stages of one model in this process."""

    def __init__(
        self,
        components: WanComponents,
        *,
        upscaler: Upscaler | None = None,
        runner: StepRunner | None = None,
        degree: ParallelDegree | None = None,
        draft_lora: str | None = None,
        cache_dir: Path = DEFAULT_CACHE_DIR,
        frame_check: FrameCheck | None = None,
        interpolator: Interpolator | None = None,
        draft_decoder: FastDecoder | None = None,
    ) -> None:
        """`runner` runs both experts' steps instead of this device, e.g. a GroupRunner over a group of
        `degree` holding both (`sharded_pipeline` builds it, with the adapters of `draft_lora` loaded on
        every rank); its holdings' banks are the experts' adapters. `draft_lora`: the distill LoRA of the
        `draft` tier (folder, s3://, or `builtin`, the presets' default); None for a real model: no draft.
        `frame_check` and `interpolator` are the Finisher's (pipeline.finish), as a cluster configures
        them (`safety.frame_check`, `interpolation_weights`). `draft_decoder`: the `draft` tier's fast
        decoder (pipeline.taehv, as a cluster's `decoder.draft: fast`); None: drafts decode with the VAE,
        and finals always do."""
        self.components = components
        self.degree = degree or ParallelDegree()
        model = components.model
        self.draft_lora = default_draft_lora(components.source, draft_lora)
        self.solvers = tier_solvers(model, components.scheduler)
        experts = (("high", components.transformer), ("low", components.transformer_2))
        banks: dict[str, AdapterBank | None] = (
            {expert: runner.holding(expert).bank for expert, _ in experts}
            if runner is not None
            else expert_banks(components, self.draft_lora, cache_dir)
        )
        self.text_encoder = TextEncoder(
            components.tokenizer, components.text_encoder, max_sequence_length=model.max_sequence_length
        )
        self.denoisers = {
            expert: Denoiser(
                transformer,
                components.scheduler,
                expert=expert,
                boundary_ratio=model.boundary_ratio,
                max_sequence_length=model.max_sequence_length,
                runner=runner,
                solvers=self.solvers,
                adapters=banks[expert],
            )
            for expert, transformer in (("high", components.transformer), ("low", components.transformer_2))
        }
        self.vae_decoder = VAEDecoder(components.vae)
        self.vae_encoder = VAEEncoder(components.vae) if components.task == "i2v" else None
        self.draft_decoder = draft_decoder
        self.upscaler = upscaler if upscaler is not None else default_upscaler(components.source)
        self.finisher = Finisher(frame_check, interpolator)

    def generate(
        self,
        request: RequestSpec,
        output: Path,
        *,
        finish: FinishOptions | None = None,
        progress: ProgressCallback | None = None,
        keyframes: Keyframes | None = None,
    ) -> GenerationResult:
        """Make one clip; an I2V model needs `keyframes` (at the request's size), a T2V model takes none."""
        self._check(request, keyframes)
        finish = finish or FinishOptions()
        target_size = upscale_target_size(finish.upscale, *request.size)
        model = self.components.model
        resolved = resolve(request, model)
        how = ClipFinish(  # refuses a bad look or rate before any stage runs
            seed=resolved.seed,
            look=finish.look,
            lut=finish.lut,
            fps=finish.fps,
            label=finish.label,
            metadata=_clip_metadata(resolved, self.components.source),
        )
        timings: dict[str, float] = {}
        report = progress or (lambda _stage, _done, _total: None)

        def stage_progress(stage: str) -> Callable[[int, int], None]:
            return lambda done, total: report(stage, done, total)

        state = self._denoise(resolved, keyframes, timings, report)
        with _timed(timings, "decode"):
            fast = self.draft_decoder if resolved.quality == "draft" else None
            frames = (fast or self.vae_decoder).decode(
                state.latents, fps=resolved.fps, progress=stage_progress("decode")
            )
        with _timed(timings, "upscale"):
            frames = self._upscale(frames, target_size, stage_progress("upscale"))
        finished = self.finisher.finish(frames, how, output, progress=report)  # ContentBlocked: nothing
        timings.update(finished.part_seconds)
        return GenerationResult(
            path=finished.clip,
            request=resolved,
            width=finished.width,
            height=finished.height,
            num_frames=finished.num_frames,
            stage_seconds=timings,
        )

    def latents(self, request: RequestSpec, keyframes: Keyframes | None = None) -> torch.Tensor:
        """The request's denoised latents (channels, frames, height, width), float32 on CPU: what
        `generate` decodes (the equality tests compare these)."""
        self._check(request, keyframes)
        resolved = resolve(request, self.components.model)
        return self._denoise(resolved, keyframes, {}, lambda _stage, _done, _total: None).latents.cpu()

    def _check(self, request: RequestSpec, keyframes: Keyframes | None) -> None:
        problem = self.shape_problem(request) or self.keyframes_problem(request, keyframes)
        if problem is not None:
            raise ValueError(problem)
        if request.quality == "draft" and self.draft_lora is None:
            raise ValueError(
                "`quality` draft needs the distill LoRA (`draft_lora`: a folder or s3:// prefix); use "
                "`quality` final."
            )

    def _denoise(
        self,
        resolved: ResolvedRequest,
        keyframes: Keyframes | None,
        timings: dict[str, float],
        report: ProgressCallback,
    ) -> DenoiseState:
        """Encode the prompts (and an I2V request's keyframes), then both experts' steps."""
        model = self.components.model

        def stage_progress(stage: str) -> Callable[[int, int], None]:
            return lambda done, total: report(stage, done, total)

        with _timed(timings, "encode"):
            prompt, negative = self.text_encoder.encode([resolved.prompt, resolved.negative_prompt])
            report("encode", 1, 1)
        condition = None
        if keyframes is not None and self.vae_encoder is not None:
            with _timed(timings, "encode_image"):
                condition = self.vae_encoder.encode(keyframes, resolved.num_frames)
                report("encode_image", 1, 1)
        state = initial_state(resolved, model, channels=self.components.transformer.config.out_channels)
        if resolved.cache is not None:  # calibrated on first use only: a preset measures its own curve
            curve = calibration_curve(self.components.source, model, self.components.task)
            for denoiser in self.denoisers.values():
                denoiser.cache_curve = curve
        for expert, guidance in (("high", resolved.guidance_high), ("low", resolved.guidance_low)):
            stage = f"denoise_{expert}"
            with _timed(timings, stage):
                state = self.denoisers[expert].run(
                    state,
                    prompt,
                    negative,
                    guidance,
                    on_step=stage_progress(stage),
                    quality=resolved.quality,
                    adapters=resolved.adapters(model),
                    cache=resolved.cache,
                    condition=condition,
                )
        return state

    def shape_problem(self, request: RequestSpec) -> str | None:
        """Why this pipeline's parallel degree cannot run the request's size, or None."""
        return request_shape_problem(self.components, request, self.degree)

    def keyframes_problem(self, request: RequestSpec, keyframes: Keyframes | None) -> str | None:
        """Why `keyframes` do not fit this model and request (I2V needs them at its size), or None."""
        if self.vae_encoder is None:
            if keyframes is not None:
                return "keyframes need the image-to-video model (a `-i2v` preset or a Wan2.2 I2V folder)."
            return None
        if keyframes is None:
            return "the image-to-video model needs `keyframes` (at least the first frame)."
        height, width = keyframes.first.shape[:2]
        if (width, height) != request.size:
            return (
                f"keyframes are {width}x{height} but the clip is {request.width}x{request.height}: resize "
                "and crop them to the clip's size first."
            )
        return None

    def steps_per_expert(self, request: RequestSpec) -> dict[str, int]:
        """How many of the request's steps each expert runs (for progress bars)."""
        resolved = resolve(request, self.components.model)
        boundary = self.components.model.boundary_ratio
        solver = self.solvers[resolved.quality]
        return {
            expert: len(expert_step_indices(solver, resolved.steps, boundary, expert))
            for expert in ("high", "low")
        }

    def _upscale(
        self, frames: Frames, target_size: tuple[int, int], progress: Callable[[int, int], None]
    ) -> Frames:
        width, height = target_size
        if self.upscaler is None:
            return resize_frames(frames, width, height)
        return self.upscaler.upscale(frames, width, height, progress=progress)


def default_draft_lora(source: str, draft_lora: str | None) -> str | None:
    """The draft tier's distill LoRA: the one given, else `builtin` for a preset, else none."""
    if draft_lora is None and source in PRESETS:
        return BUILTIN
    return draft_lora


def expert_banks(
    components: WanComponents, draft_lora: str | None, cache_dir: Path = DEFAULT_CACHE_DIR
) -> dict[str, AdapterBank | None]:
    """expert -> its adapters (the draft tier's distill LoRA), or None without one; loaded into
    `components`' experts. Every rank of a sharded run calls this before sharding them."""
    if draft_lora is None:
        return {"high": None, "low": None}
    folders = {DISTILL_ADAPTER: distill_folder(draft_lora, components.source, cache_dir=cache_dir)}
    return {
        "high": load_bank(components.transformer, "high", folders),
        "low": load_bank(components.transformer_2, "low", folders),
    }


def request_shape_problem(
    components: WanComponents, request: RequestSpec, degree: ParallelDegree
) -> str | None:
    """Why `degree` cannot run the request's size on these experts (tokens or heads), or None."""
    resolved = resolve(request, components.model)
    return shape_problem(
        resolved.width,
        resolved.height,
        resolved.num_frames,
        degree,
        model=components.model,
        num_heads=components.transformer.config.num_attention_heads,
    )


@contextmanager
def sharded_pipeline(
    components: WanComponents,
    degree: ParallelDegree,
    *,
    upscaler: Upscaler | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    draft_lora: str | None = None,
    frame_check: FrameCheck | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    draft_decoder: FastDecoder | None = None,
) -> Iterator[LocalPipeline]:
    """A LocalPipeline whose experts run over `degree.world_size` processes on this machine.

    This process is rank 0 (it already holds `components`); ranks 1.. are spawned, load the two experts
    from `components.source` onto their own device (cuda:rank on GPUs, else cpu) with the same adapters
    (the draft tier's distill LoRA, loaded before sharding), and serve steps until the context exits. A
    worker that fails makes the next forward raise ShardGroupError. `draft_decoder`: LocalPipeline's (rank
    0 decodes)."""
    if not degree.is_sharded:
        yield LocalPipeline(
            components,
            upscaler=upscaler,
            draft_lora=draft_lora,
            frame_check=frame_check,
            draft_decoder=draft_decoder,
        )
        return
    device = next(components.transformer.parameters()).device
    if device.type == "cuda" and torch.cuda.device_count() < degree.world_size:
        raise ValueError(
            f"{degree.world_size} ranks need as many GPUs but this machine has {torch.cuda.device_count()}."
        )
    world_size, port = degree.world_size, _free_port()
    draft_lora = default_draft_lora(components.source, draft_lora)
    banks = expert_banks(components, draft_lora, cache_dir)  # before any worker reads the LoRA files
    context = mp.get_context("spawn")
    workers = [
        context.Process(
            target=_local_worker,
            args=(rank, degree, port, components.source, device.type, timeout_s, draft_lora, cache_dir),
            name=f"previz-rank{rank}",
            daemon=True,
        )
        for rank in range(1, world_size)
    ]
    for worker in workers:
        worker.start()
    group = None
    try:
        group = ShardGroup.init(
            0,
            world_size,
            "127.0.0.1",
            port,
            ulysses=degree.ulysses,
            cfg=degree.cfg,
            timeout_s=timeout_s,
            device=device,
        )
        holdings = {
            expert: Holding(group.shard(transformer), banks[expert])
            for expert, transformer in (("high", components.transformer), ("low", components.transformer_2))
        }
        group.start_keepalive()
        yield LocalPipeline(
            components,
            upscaler=upscaler,
            runner=GroupRunner(group, holdings),
            degree=degree,
            draft_lora=draft_lora,
            cache_dir=cache_dir,
            frame_check=frame_check,
            draft_decoder=draft_decoder,
        )
    finally:
        if group is not None:
            group.close()  # tells the workers to stop
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()


def _local_worker(
    rank: int,
    degree: ParallelDegree,
    port: int,
    source: str,
    device_type: str,
    timeout_s: float,
    draft_lora: str | None,
    cache_dir: Path,
) -> None:
    """A spawned rank of `sharded_pipeline`: the two experts with rank 0's adapters, serving steps until
    rank 0 says stop."""
    device = f"cuda:{rank}" if device_type == "cuda" else "cpu"
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // degree.world_size))
    group = ShardGroup.init(
        rank,
        degree.world_size,
        "127.0.0.1",
        port,
        ulysses=degree.ulysses,
        cfg=degree.cfg,
        timeout_s=timeout_s,
        device=device,
    )
    try:
        components = load_components(source, device=device, parts=("transformer", "transformer_2"))
        banks = expert_banks(components, draft_lora, cache_dir)  # before `shard`: hooks go on the wrappers
        holdings = {
            "high": Holding(make_batch_invariant(group.shard(components.transformer)), banks["high"]),
            "low": Holding(make_batch_invariant(group.shard(components.transformer_2)), banks["low"]),
        }
        worker_loop(group, holdings)
    finally:
        group.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_upscaler(source: str) -> Upscaler | None:
    """Presets get their seeded compact SR net; real weights need an SR weights file (else plain resize)."""
    if source in PRESETS:
        preset = PRESETS[source]
        return Upscaler.compact_random(seed=preset.seed, **preset.upscaler)
    return None


def _clip_metadata(request: ResolvedRequest, source: str) -> dict[str, str]:
    return {
        "title": request.prompt[:200],
        "previz_model": source,
        "previz_seed": str(request.seed),
        "previz_steps": str(request.steps),
        "previz_quality": request.quality,
    }


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = time.perf_counter() - start
