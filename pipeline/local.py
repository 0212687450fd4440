"""One-process run of the whole chain: TextEncoder → high Denoiser → low Denoiser → VAEDecoder →
Upscaler → Grader → VideoWriter. The same stage classes run inside Serve replicas unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.denoise import Denoiser, initial_state
from pipeline.denoise.denoiser import expert_step_indices
from pipeline.frames import Frames
from pipeline.grade import Grader
from pipeline.spec import RequestSpec, ResolvedRequest, resolve
from pipeline.text import TextEncoder
from pipeline.upscale import Upscaler, resize_frames, upscale_target_size
from pipeline.vae import VAEDecoder
from pipeline.video import DRAFT_LABEL, VideoWriter
from pipeline.weights import PRESETS, WanComponents

STAGES = ("encode", "denoise_high", "denoise_low", "decode", "upscale", "grade", "encode_video")

# (stage, units done, units total) -> None; units are steps, latent frames or frames per stage.
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True, slots=True)
class FinishOptions:
    """What happens to the clip after decoding."""

    upscale: str = "none"  # none | 720p | 1080p
    look: str = "none"  # none | film
    label: str | None = DRAFT_LABEL  # burned-in text; None leaves frames unmarked (metadata still marks)


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

    def __init__(self, components: WanComponents, *, upscaler: Upscaler | None = None) -> None:
        self.components = components
        model = components.model
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
            )
            for expert, transformer in (("high", components.transformer), ("low", components.transformer_2))
        }
        self.vae_decoder = VAEDecoder(components.vae)
        self.upscaler = upscaler if upscaler is not None else default_upscaler(components.source)

    def generate(
        self,
        request: RequestSpec,
        output: Path,
        *,
        finish: FinishOptions | None = None,
        progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        finish = finish or FinishOptions()
        grader = Grader(finish.look)
        target_size = upscale_target_size(finish.upscale, *request.size)
        writer = VideoWriter(label=finish.label)
        model = self.components.model
        resolved = resolve(request, model)
        timings: dict[str, float] = {}
        report = progress or (lambda _stage, _done, _total: None)

        def stage_progress(stage: str) -> Callable[[int, int], None]:
            return lambda done, total: report(stage, done, total)

        with _timed(timings, "encode"):
            prompt, negative = self.text_encoder.encode([resolved.prompt, resolved.negative_prompt])
            report("encode", 1, 1)
        state = initial_state(resolved, model, channels=self.components.transformer.config.in_channels)
        for expert, guidance in (("high", resolved.guidance_high), ("low", resolved.guidance_low)):
            stage = f"denoise_{expert}"
            with _timed(timings, stage):
                state = self.denoisers[expert].run(
                    state, prompt, negative, guidance, on_step=stage_progress(stage)
                )
        with _timed(timings, "decode"):
            frames = self.vae_decoder.decode(
                state.latents, fps=resolved.fps, progress=stage_progress("decode")
            )
        with _timed(timings, "upscale"):
            frames = self._upscale(frames, target_size, stage_progress("upscale"))
        with _timed(timings, "grade"):
            frames = grader.grade(frames, seed=resolved.seed)
        with _timed(timings, "encode_video"):
            path = writer.write(frames, output, metadata=_clip_metadata(resolved, self.components.source))
            report("encode_video", 1, 1)
        return GenerationResult(
            path=path,
            request=resolved,
            width=frames.width,
            height=frames.height,
            num_frames=frames.num_frames,
            stage_seconds=timings,
        )

    def steps_per_expert(self, request: RequestSpec) -> dict[str, int]:
        """How many of the request's steps each expert runs (for progress bars)."""
        steps = resolve(request, self.components.model).steps
        boundary = self.components.model.boundary_ratio
        return {
            expert: len(expert_step_indices(self.components.scheduler, steps, boundary, expert))
            for expert in ("high", "low")
        }

    def _upscale(
        self, frames: Frames, target_size: tuple[int, int], progress: Callable[[int, int], None]
    ) -> Frames:
        width, height = target_size
        if self.upscaler is None:
            return resize_frames(frames, width, height)
        return self.upscaler.upscale(frames, width, height, progress=progress)


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
    }


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = time.perf_counter() - start
