"""The stage deployments: each wraps a `pipeline` stage class unchanged, one Serve deployment per stage so
each scales on its own. Heavy compute runs in worker threads (the engine's, or `asyncio.to_thread`), so a
replica's event loop keeps answering health checks and new calls during minute-long work.

Payloads are CPU numpy; decoded frames (hundreds of MB at 720p) travel as object refs that the next stage
resolves itself, so they never pass through the Scheduler.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve

from pipeline.denoise.engine import DenoiseEngine, EngineRequest, EngineStats
from pipeline.frames import Frames
from pipeline.grade import Grader
from pipeline.local import default_upscaler
from pipeline.safety import ContentBlocked, FrameCheck
from pipeline.text import TextEncoder
from pipeline.upscale import Upscaler, resize_frames
from pipeline.vae import VAEDecoder
from pipeline.video import VideoWriter, poster_frame_jpeg
from pipeline.weights import (
    PRESETS,
    build_preset,
    load_sampling,
    load_text_encoder,
    load_transformer,
    load_vae,
    pick_device,
    place,
    resolve_folder,
)
from serve.config import PrevizArgs
from serve.metrics import CacheReporter, ReplicaReporter, record_artifact_write, record_safety_block
from serve.storage import StoredArtifact, artifact_key, make_store
from serve.transfer import PackedState, pack_embeds, pack_state, unpack_embeds, unpack_state

# Minute-long work: let in-flight calls finish on shutdown, and give slow model loads time.
STAGE_OPTIONS: dict[str, Any] = dict(
    graceful_shutdown_timeout_s=600,
    graceful_shutdown_wait_loop_s=2,
    health_check_period_s=10,
    health_check_timeout_s=60,
)


@dataclass(frozen=True, slots=True)
class DenoiseCall:
    """One job's share of an expert."""

    request_id: str  # job id + attempt: unique per run of a job
    state: PackedState
    prompt: np.ndarray  # (tokens, text_dim) prompt embeddings
    negative_prompt: np.ndarray
    guidance: float
    priority: str  # interactive | batch
    deadline: datetime | None


@dataclass(frozen=True, slots=True)
class FrameBatch:
    """Decoded frames living in the object store."""

    ref: list[
        ray.ObjectRef
    ]  # one ref to the (frames, height, width, 3) uint8 array; a list so Serve keeps it a ref
    fps: int
    seconds: float  # compute time of the stage that made them


def _components(args: PrevizArgs, *parts: str) -> dict[str, Any]:
    """Only the parts a stage needs: real experts are 28.6 GB each, so a VAE replica must not load them."""
    device = pick_device(args.device)
    if args.model in PRESETS:
        preset = place(build_preset(args.model, args.sampling), device)
        return {part: getattr(preset, part) for part in (*parts, "model", "scheduler")}
    folder = resolve_folder(args.model, cache_dir=args.model_cache_dir)
    model, scheduler = load_sampling(folder, model=args.sampling)
    out: dict[str, Any] = {"model": model, "scheduler": scheduler}
    for part in parts:
        if part in ("transformer", "transformer_2"):
            out[part] = load_transformer(folder, part, device)
        elif part == "vae":
            out[part] = load_vae(folder, device)
        elif part == "text_encoder":
            out["tokenizer"], out["text_encoder"] = load_text_encoder(folder, device)
    return out


@serve.deployment(name="TextEncoder", max_ongoing_requests=256, **STAGE_OPTIONS)
class TextEncoderDeployment:
    """Prompt → umT5 embeddings; concurrent calls are batched into one encoder forward."""

    def __init__(self, args: PrevizArgs) -> None:
        parts = _components(args, "text_encoder", "tokenizer")
        self.encoder = TextEncoder(
            parts["tokenizer"],
            parts["text_encoder"],
            max_sequence_length=parts["model"].max_sequence_length,
            cache_size=args.text_cache_size,
        )
        self._cache_metrics = CacheReporter()
        self._metrics = ReplicaReporter().start()  # GPU gauges where there is a GPU

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def encode(self, texts: list[str]) -> list[np.ndarray]:
        embeds = await asyncio.to_thread(self.encoder.encode, texts)
        self._cache_metrics.publish(self.encoder.num_cache_hits, self.encoder.num_cache_misses)
        return [pack_embeds(e) for e in embeds]

    def cache_stats(self) -> dict[str, int]:
        return {"hits": self.encoder.num_cache_hits, "misses": self.encoder.num_cache_misses}


@serve.deployment(max_ongoing_requests=256, **STAGE_OPTIONS)
class DenoiserDeployment:
    """One expert with its step-level batching engine; bound twice (HighNoiseDenoiser, LowNoiseDenoiser)."""

    def __init__(self, args: PrevizArgs, expert: str) -> None:
        part = "transformer" if expert == "high" else "transformer_2"
        parts = _components(args, part)
        model = parts["model"]
        self.engine = DenoiseEngine(
            parts[part],
            parts["scheduler"],
            expert=expert,
            boundary_ratio=model.boundary_ratio,
            max_sequence_length=model.max_sequence_length,
            max_num_tokens=args.engine.max_num_tokens,
            max_batch_size=args.engine.max_batch_size,
        )
        self.engine.start()
        self._metrics = ReplicaReporter(self.engine).start()

    async def denoise(self, call: DenoiseCall, bucket: str) -> AsyncIterator[dict[str, Any]]:
        """Streams {"done", "total"} progress per step, then {"state": PackedState, "seconds"}.

        `bucket` is read by the BucketAffinityRouter so same-shape calls meet on one replica.
        """
        loop = asyncio.get_running_loop()
        progress: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        started = time.perf_counter()
        request = EngineRequest(
            request_id=call.request_id,
            state=unpack_state(call.state),
            prompt=unpack_embeds(call.prompt),
            negative_prompt=unpack_embeds(call.negative_prompt),
            guidance=call.guidance,
            priority=call.priority,
            deadline=_engine_deadline(call.deadline, self.engine.clock),
            on_progress=lambda done, total: loop.call_soon_threadsafe(progress.put_nowait, (done, total)),
        )
        result = self.engine.add(request)
        try:
            while not result.done():
                waiter = asyncio.ensure_future(progress.get())
                await asyncio.wait({waiter, result}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    done, total = waiter.result()
                    yield {"done": done, "total": total}
                else:
                    waiter.cancel()
            state = result.result()
            yield {"state": pack_state(state), "seconds": time.perf_counter() - started}
        finally:
            if not result.done():  # the caller went away (cancel, scheduler restart): free the slot
                self.engine.cancel(call.request_id)

    def stats(self, bucket: str | None = None) -> tuple[str, EngineStats]:
        """(replica id, engine stats). Given a `bucket`, the router sends this to that bucket's replica."""
        return serve.get_replica_context().replica_id.unique_id, self.engine.stats()

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError(f"the {self.engine.expert} engine thread has stopped")

    def __del__(self) -> None:
        reporter = getattr(self, "_metrics", None)
        if reporter is not None:
            reporter.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=5)


def _engine_deadline(deadline: datetime | None, clock) -> float | None:
    if deadline is None:
        return None
    return clock() + (deadline.timestamp() - time.time())


@serve.deployment(name="VAEDecoder", max_ongoing_requests=8, **STAGE_OPTIONS)
class VAEDecoderDeployment:
    def __init__(self, args: PrevizArgs) -> None:
        self.decoder = VAEDecoder(_components(args, "vae")["vae"])
        self._metrics = ReplicaReporter().start()
        self._lock = asyncio.Lock()  # one decode at a time per replica: it is memory-bound

    async def decode(self, latents: np.ndarray, fps: int) -> FrameBatch:
        import torch

        async with self._lock:
            started = time.perf_counter()
            frames = await asyncio.to_thread(self.decoder.decode, torch.from_numpy(latents.copy()), fps=fps)
            return FrameBatch(ref=[ray.put(frames.pixels)], fps=fps, seconds=time.perf_counter() - started)


@serve.deployment(name="Upscaler", max_ongoing_requests=8, **STAGE_OPTIONS)
class UpscalerDeployment:
    def __init__(self, args: PrevizArgs) -> None:
        device = pick_device(args.device)
        if args.sr_weights is not None:
            self.upscaler: Upscaler | None = Upscaler.from_file(args.sr_weights, device=device)
        else:
            self.upscaler = default_upscaler(args.model)
            if self.upscaler is not None:
                self.upscaler.descriptor.to(device)
        self._lock = asyncio.Lock()
        self._metrics = ReplicaReporter().start()

    async def upscale(self, frames: FrameBatch, width: int, height: int) -> FrameBatch:
        pixels = await frames.ref[0]
        source = Frames(pixels=pixels, fps=frames.fps)
        async with self._lock:
            started = time.perf_counter()
            if self.upscaler is None:
                result = await asyncio.to_thread(resize_frames, source, width, height)
            else:
                result = await asyncio.to_thread(self.upscaler.upscale, source, width, height)
            seconds = time.perf_counter() - started
        if result is source:
            return FrameBatch(ref=frames.ref, fps=frames.fps, seconds=seconds)
        return FrameBatch(ref=[ray.put(result.pixels)], fps=frames.fps, seconds=seconds)


@dataclass(frozen=True, slots=True)
class FinishCall:
    """How to finish one clip and where it goes."""

    project: str
    job_id: str
    attempt: int
    seed: int
    look: str
    label: str | None
    metadata: dict[str, str]


@dataclass(frozen=True, slots=True)
class FinishedClip:
    uri: str
    key: str
    size_bytes: int
    poster_key: str
    num_frames: int
    width: int
    height: int
    seconds: float


@serve.deployment(name="Finisher", max_ongoing_requests=8, **STAGE_OPTIONS)
class FinisherDeployment:
    """Grade, check the frames against the content policy, mark as an AI-generated draft, encode the mp4
    and store it with a poster frame. A blocked clip raises ContentBlocked and nothing is stored."""

    def __init__(self, args: PrevizArgs) -> None:
        self.store = make_store(args.storage)
        self._backend = args.storage.kind
        self.frame_check = FrameCheck.from_settings(args.safety)

    async def finish(self, frames: FrameBatch, call: FinishCall) -> FinishedClip:
        pixels = await frames.ref[0]
        return await asyncio.to_thread(self._finish, Frames(pixels=pixels, fps=frames.fps), call)

    def _finish(self, frames: Frames, call: FinishCall) -> FinishedClip:
        started = time.perf_counter()
        graded = Grader(call.look).grade(frames, seed=call.seed)
        verdict = self.frame_check.check(graded.pixels) if self.frame_check is not None else None
        if verdict is not None:
            record_safety_block("frames", verdict.category)
            raise ContentBlocked.of(verdict)
        with tempfile.TemporaryDirectory(prefix="previz-finish-") as scratch:
            clip = VideoWriter(label=call.label).write(
                graded, Path(scratch) / "clip.mp4", metadata=call.metadata
            )
            poster = Path(scratch) / "poster.jpg"
            poster.write_bytes(poster_frame_jpeg(clip))
            # The attempt is in the key: a stale run of the same job never overwrites the winning clip.
            key = artifact_key(call.project, call.job_id, f"clip-a{call.attempt}.mp4")
            poster_key = artifact_key(call.project, call.job_id, f"poster-a{call.attempt}.jpg")
            stored = self._put(key, clip, "video/mp4", kind="clip")
            self._put(poster_key, poster, "image/jpeg", kind="poster")
        return FinishedClip(
            uri=stored.uri,
            key=key,
            size_bytes=stored.size_bytes,
            poster_key=poster_key,
            num_frames=graded.num_frames,
            width=graded.width,
            height=graded.height,
            seconds=time.perf_counter() - started,
        )

    def _put(self, key: str, path: Path, content_type: str, *, kind: str) -> StoredArtifact:
        try:
            stored = self.store.put_file(key, path, content_type)
        except Exception:
            record_artifact_write(self._backend, kind, None, ok=False)
            raise
        record_artifact_write(self._backend, kind, stored.size_bytes, ok=True)
        return stored
