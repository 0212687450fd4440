"""Stand-in stage handles for running the real Scheduler without a Ray cluster: each answers like its stage
deployment (the typed payloads of serve.stages.payloads) and records what it was asked."""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from ray.exceptions import OwnerDiedError

from pipeline.denoise.state import initial_noise
from serve.config import PrevizArgs
from serve.jobs import JobRecord, JobStore
from serve.jobs.keyframes import PNG, load_keyframes, png_bytes
from serve.scheduling.scheduler import Scheduler
from serve.stages.denoiser import save_checkpoint
from serve.stages.payloads import (
    ConditionRef,
    DenoiseBoundary,
    DenoiseCall,
    DenoiseDone,
    DenoiseProgress,
    DenoiseWaiting,
    EmbedsRef,
    EncodeImageCall,
    FinishCall,
    FinishedClip,
    FrameBatch,
    InitialNoise,
    StateRef,
)
from serve.stages.transfer import PackedState, pack_state, state_nbytes
from serve.stages.turns import StageWaiting, Turns
from serve.storage import ArtifactStore, JobArtifacts, make_store
from serve.webhooks import open_job_store

# bound of the waits below: only a hang reaches it (the suite shares 2 cores with a live Ray cluster on CI)
WAIT_S = 120.0


def serialized_bytes(value: Any) -> int:
    """Bytes `value` takes on the wire between processes: its pickle plus its out-of-band buffers (numpy
    arrays travel as protocol-5 buffers through Ray's object store)."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return len(data) + sum(buffer.raw().nbytes for buffer in buffers)


@dataclass
class Wire:
    """What crossed between the Scheduler and the stages: stage -> bytes the Scheduler sent / received,
    and every object the Scheduler received (a call's result, each streamed message)."""

    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    received_objects: list[Any] = field(default_factory=list)

    def count(self, ledger: dict[str, int], stage: str, value: Any) -> None:
        ledger[stage] = ledger.get(stage, 0) + serialized_bytes(value)

    def arrived(self, stage: str, value: Any) -> Any:
        self.count(self.received, stage, value)
        self.received_objects.append(value)
        return value


@dataclass(frozen=True, slots=True)
class LocalRef:
    """An object-store ref of the stand-in stages: a number, owned by the stage that put the value."""

    id: int
    owner: str  # the stage whose replica holds the value


@dataclass
class LocalObjects:
    """The stand-in object store: values live with the stage that put them; a value whose owner is in
    `lost_owners` is gone, as when its replica died (OwnerDiedError on fetch)."""

    values: dict[int, Any] = field(default_factory=dict)
    lost_owners: set[str] = field(default_factory=set)

    def put(self, value: Any, owner: str) -> list[Any]:
        ref = LocalRef(len(self.values), owner)
        self.values[ref.id] = value
        return [ref]

    def get(self, ref: list[Any]) -> Any:
        (local,) = ref
        if local.owner in self.lost_owners:
            raise OwnerDiedError(f"{local.id:028x}", None, f"put by the {local.owner} stage")
        return self.values[local.id]


class Response:
    """A DeploymentResponse (awaitable) or DeploymentResponseGenerator (async iterable) of a local call,
    with `cancel()` recording that the Scheduler cancelled it on its replica."""

    def __init__(self, call: Any, name: str, cancelled: list[str], wire: Wire) -> None:
        self._call, self._name, self._cancelled, self._wire = call, name, cancelled, wire

    def __await__(self) -> Any:
        return self._wire.arrived(self._name, (yield from self._call.__await__()))

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> Any:
        return self._wire.arrived(self._name, await self._call.__anext__())

    def cancel(self) -> None:
        self._cancelled.append(self._name)


class Method:
    """`handle.<method>.remote(...)` and `handle.options(stream=True).<method>.remote(...)` of a Serve
    handle, answered by a local function (a coroutine, or an async generator for streams)."""

    def __init__(self, function: Callable[..., Any], name: str, cancelled: list[str], wire: Wire) -> None:
        self.function, self.name, self.cancelled, self.wire = function, name, cancelled, wire

    def remote(self, *args: Any, **kwargs: Any) -> Response:
        self.wire.count(self.wire.sent, self.name, (args, kwargs))
        return Response(self.function(*args, **kwargs), self.name, self.cancelled, self.wire)


@dataclass
class FakeStages:
    """The six stage handles; each records its calls. `fail` maps a stage to an exception it raises."""

    calls: dict[str, list[Any]] = field(default_factory=dict)
    fail: dict[str, BaseException] = field(default_factory=dict)
    fail_once: set[str] = field(default_factory=set)  # stages whose failure is gone after one call
    hold_low: asyncio.Event | None = None  # the low-noise expert waits for this before its first step
    waiting_encode: tuple[StageWaiting, ...] = ()  # places the text encoder's line streams before a forward
    hold_encode: asyncio.Event | None = None  # after those places, the text encoder waits for this
    # the queue places the high expert's engine reports before its first step
    waiting_high: tuple[DenoiseWaiting, ...] = ()
    hold_high: asyncio.Event | None = None  # after those reports, the high expert waits for this
    hold_decode: asyncio.Event | None = None  # the decoder waits for this before it answers
    decode_turns: Turns = field(default_factory=Turns)  # the decoder's line: one decode at a time
    cancelled: list[str] = field(default_factory=list)  # stages whose call the Scheduler cancelled
    seconds_per_step: float | None = None  # the step time the denoisers report with each step (ETA)
    denoise_calls: list[DenoiseCall] = field(default_factory=list)  # every expert's calls, in order
    embeds_shape: tuple[int, ...] = (4, 8)  # (tokens, text_dim) of the embeddings; umT5: (512, 4096)
    solver_order: int = 0  # model outputs the denoisers keep in the state's history; UniPC at order 2: 2
    wire: Wire = field(default_factory=Wire)  # what crossed between the Scheduler and the stages
    objects: LocalObjects = field(default_factory=LocalObjects)  # what the stages put in the object store
    artifacts: ArtifactStore | None = None  # where the high expert stores its checkpoint (set by `start`)
    artifacts_gate: asyncio.Event | None = None  # the high expert's checkpoint write waits for this
    colocated: bool = False  # one Denoiser ("denoiser") for both experts instead of the split pair
    lose_after_boundary: BaseException | None = None  # the Denoiser raises it once, after its checkpoint
    # what the I2V model's stand-ins (`i2v_high`, `i2v_low`, `encode_image`) saw of each condition: shape
    conditions: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)

    def handles(self) -> list[Any]:
        def method(function: Callable[..., Any], name: str) -> Method:
            return Method(function, name, self.cancelled, self.wire)

        if self.colocated:
            denoiser = Handle(denoise=method(self.colocated_denoiser, "denoiser"))
            high, low = denoiser, denoiser
        else:
            high = Handle(denoise=method(self.denoiser("high"), "high"))
            low = Handle(denoise=method(self.denoiser("low"), "low"))
        return [
            Handle(encode=method(self.encode, "encode")),
            high,
            low,
            Handle(decode=method(self.decode, "decode")),
            Handle(upscale=method(self.upscale, "upscale")),
            Handle(finish=method(self.finish, "finish")),
        ]

    def i2v_handles(self) -> dict[str, Handle]:
        """The I2V model's split experts and its VAEEncoder (the Scheduler's `i2v_*` and `image_encoder`)."""

        def method(function: Callable[..., Any], name: str) -> Method:
            return Method(function, name, self.cancelled, self.wire)

        return {
            "i2v_high": Handle(denoise=method(self.denoiser("high", "i2v_high"), "i2v_high")),
            "i2v_low": Handle(denoise=method(self.denoiser("low", "i2v_low"), "i2v_low")),
            "image_encoder": Handle(encode=method(self.encode_image, "encode_image")),
        }

    async def encode_image(self, call: EncodeImageCall) -> ConditionRef:
        """The VAEEncoder: reads the job's stored keyframes; a (20, frames, h, w) condition of them."""
        assert self.artifacts is not None, "start() gives the stages the artifact store"
        first, last = load_keyframes(self.artifacts, call.project, call.job_id)
        self.record("encode_image", (call.job_id, call.num_frames, first.shape, last is not None))
        frames = (call.num_frames - 1) // 4 + 1
        height, width = first.shape[0] // 8, first.shape[1] // 8
        condition = np.full((20, frames, height, width), float(first.mean()), np.float32)
        return ConditionRef(
            ref=self.objects.put(condition, "encode_image"), nbytes=condition.nbytes, seconds=0.01
        )

    def housekeeping(self) -> Handle:
        """The Housekeeping handle: counts the Scheduler's webhook nudges."""

        def wake_webhooks() -> asyncio.Future[None]:  # a nudge nobody awaits: answered at once
            self.calls.setdefault("wake_webhooks", []).append(None)
            answered = asyncio.get_running_loop().create_future()
            answered.set_result(None)
            return answered

        return Handle(wake_webhooks=Method(wake_webhooks, "housekeeping", self.cancelled, self.wire))

    def record(self, stage: str, value: Any) -> None:
        self.calls.setdefault(stage, []).append(value)
        if stage in self.fail:
            error = self.fail.pop(stage) if stage in self.fail_once else self.fail[stage]
            raise error

    async def encode(self, texts: list[str]) -> AsyncIterator[StageWaiting | list[EmbedsRef]]:
        """The TextEncoder: each text's embeddings, after the places `waiting_encode` streams and
        `hold_encode` (a call waiting in its line for a forward)."""
        for text in texts:
            self.record("encode", text)
        for waiting in self.waiting_encode:
            yield waiting
        if self.hold_encode is not None:
            await self.hold_encode.wait()
        arrays = [np.full(self.embeds_shape, float(len(text)), dtype=np.float32) for text in texts]
        yield [EmbedsRef(ref=self.objects.put(embeds, "encode"), nbytes=embeds.nbytes) for embeds in arrays]

    def denoiser(self, expert: str, name: str | None = None) -> Callable[..., AsyncIterator[Any]]:
        """The `expert` deployment's stand-in, its calls recorded under `name` (default: the expert)."""
        name = name or expert

        async def denoise(call: DenoiseCall, bucket: str) -> AsyncIterator[Any]:
            self.denoise_calls.append(call)
            self.record(name, (call.request_id, bucket, call.state.step_index))
            state = self.start_state(call.state)
            self.objects.get(call.prompt.ref), self.objects.get(call.negative_prompt.ref)
            if call.condition is not None:  # fetched from the VAEEncoder's replica, as the real one does
                self.conditions.append((name, self.objects.get(call.condition.ref).shape))
            if expert == "low" and self.hold_low is not None:
                await self.hold_low.wait()
            if expert == "high":
                for waiting in self.waiting_high:
                    yield waiting
                if self.hold_high is not None:
                    await self.hold_high.wait()
            steps = 3 if expert == "high" else state.num_steps - state.step_index
            for done in range(1, steps + 1):
                yield DenoiseProgress(done=done, total=steps, seconds_per_step=self.seconds_per_step)
            done_state = self.stepped(state, expert, steps)
            ref = self.objects.put(done_state, expert)
            done = StateRef(ref=ref, step_index=done_state.step_index, nbytes=state_nbytes(done_state))
            yield DenoiseDone(state=done, seconds=0.01)
            if call.checkpoint_key is not None:
                assert self.artifacts is not None, "start() gives the stages the artifact store"
                if self.artifacts_gate is not None:
                    await self.artifacts_gate.wait()
                yield await save_checkpoint(self.artifacts, call.checkpoint_key, done_state)

        return denoise

    def stepped(self, state: PackedState, expert: str, steps: int) -> PackedState:
        """`state` after `steps` steps of `expert` (+1 from the high-noise expert, +10 from the low-noise)."""
        latents = state.latents + (1.0 if expert == "high" else 10.0)
        history = tuple(latents.copy() for _ in range(self.solver_order))  # as UniPC keeps them
        done_state = replace(state, latents=latents, step_index=state.step_index + steps)
        if history:
            done_state = replace(done_state, model_outputs=history, last_sample=latents.copy())
        return done_state

    async def colocated_denoiser(self, call: DenoiseCall, bucket: str) -> AsyncIterator[Any]:
        """The colocated Denoiser: 3 high-noise steps (from noise only), the boundary with its checkpoint
        written in the background, the low-noise steps, the state; the checkpoint's outcome when it lands."""
        self.denoise_calls.append(call)
        self.record("denoiser", (call.request_id, bucket, call.state.step_index))
        assert call.guidance_low is not None, "a call to the colocated Denoiser carries both CFG scales"
        state = self.start_state(call.state)
        self.objects.get(call.prompt.ref), self.objects.get(call.negative_prompt.ref)
        checkpoint: asyncio.Task[Any] | None = None
        if state.step_index == 0:
            for waiting in self.waiting_high:
                yield waiting
            if self.hold_high is not None:
                await self.hold_high.wait()
            for done in range(1, 4):
                yield DenoiseProgress(done=done, total=3, seconds_per_step=self.seconds_per_step)
            state = self.stepped(state, "high", 3)
            if call.checkpoint_key is not None:
                checkpoint = asyncio.create_task(self.write_checkpoint(call.checkpoint_key, state))
            yield DenoiseBoundary(step_index=state.step_index, seconds=0.01)
        if self.lose_after_boundary is not None:
            if checkpoint is not None:
                yield await checkpoint  # it landed before the replica was lost
            error, self.lose_after_boundary = self.lose_after_boundary, None
            raise error
        if self.hold_low is not None:  # the checkpoint's outcome is streamed as soon as it lands
            hold = asyncio.ensure_future(self.hold_low.wait())
            while not hold.done():
                await asyncio.wait(
                    {hold} | ({checkpoint} if checkpoint else set()), return_when="FIRST_COMPLETED"
                )
                if checkpoint is not None and checkpoint.done():
                    yield checkpoint.result()
                    checkpoint = None
        steps = state.num_steps - state.step_index
        for done in range(1, steps + 1):
            yield DenoiseProgress(done=done, total=steps, seconds_per_step=self.seconds_per_step)
            if checkpoint is not None and checkpoint.done():
                yield checkpoint.result()
                checkpoint = None
        state = self.stepped(state, "low", steps)
        ref = self.objects.put(state, "denoiser")
        yield DenoiseDone(
            state=StateRef(ref=ref, step_index=state.step_index, nbytes=state_nbytes(state)), seconds=0.01
        )
        if checkpoint is not None:
            yield await checkpoint

    async def write_checkpoint(self, key: str, state: PackedState) -> Any:
        assert self.artifacts is not None, "start() gives the stages the artifact store"
        if self.artifacts_gate is not None:
            await self.artifacts_gate.wait()
        return await save_checkpoint(self.artifacts, key, state)

    def start_state(self, state: InitialNoise | StateRef | PackedState) -> PackedState:
        match state:
            case InitialNoise(seed=seed, shape=shape, num_steps=num_steps):
                return pack_state(initial_noise(seed, shape, num_steps))
            case StateRef(ref=ref):
                return self.objects.get(ref)
            case PackedState():
                return state

    async def decode(
        self, state: StateRef, fps: int, quality: str = "final", last_frame_key: str | None = None
    ) -> AsyncIterator[StageWaiting | FrameBatch]:
        """One decode at a time in the real decoder's line (serve.stages.turns), streaming its place."""
        self.record("decode", float(self.objects.get(state.ref).latents.mean()))
        async for waiting in self.decode_turns.wait():
            yield waiting
        try:
            if self.hold_decode is not None:
                await self.hold_decode.wait()
            latents = self.objects.get(state.ref).latents
            # frames that differ per clip (from its latents), so a chained shot's condition can be told apart
            noise = np.random.default_rng(abs(hash(latents.tobytes())) % (1 << 32))
            pixels = noise.integers(0, 120, (9, 64, 96, 3), dtype=np.uint8)
            if last_frame_key is not None:  # as the real decoder stores it (serve.stages.decoder)
                assert self.artifacts is not None, "start() gives the stages the artifact store"
                self.artifacts.put_bytes(last_frame_key, png_bytes(Image.fromarray(pixels[-1])), PNG)
            frames = self.objects.put(pixels, "decode")
        finally:
            # the turn ends with the work, before the result goes out: the Scheduler stops reading at the
            # result, and a generator it no longer reads would hold the line until it is collected
            self.decode_turns.leave()
        yield FrameBatch(ref=frames, fps=fps, seconds=0.01)

    async def upscale(self, frames: FrameBatch, width: int, height: int) -> AsyncIterator[FrameBatch]:
        self.record("upscale", (width, height))
        yield frames

    async def finish(self, frames: FrameBatch, call: FinishCall) -> FinishedClip:
        self.record("finish", call)
        keys = JobArtifacts(call.project, call.job_id)
        return FinishedClip(
            uri=f"file:///{keys.clip(call.attempt)}",
            key=keys.clip(call.attempt),
            size_bytes=1234,
            poster_key=keys.poster(call.attempt),
            num_frames=9,
            width=96,
            height=64,
            seconds=0.01,
        )


class Handle:
    def __init__(self, **methods: Method) -> None:
        self._methods = methods

    def __getattr__(self, name: str) -> Method:
        return self._methods[name]

    def options(self, **_options: Any) -> Handle:
        return self


def scheduler_args(tmp_path: Path, **overrides: Any) -> PrevizArgs:
    """A fast-polling Scheduler config on a SQLite file and a local artifact folder under `tmp_path`."""
    fields: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path / 'jobs.db'}",
        "storage": {"kind": "local", "local_root": str(tmp_path / "artifacts")},
        "poll_interval_s": 0.02,
        "finish_retry_base_s": 0.0,
    }
    return PrevizArgs(**{**fields, **overrides})


async def wait_for(
    store: JobStore, job_id: str, done: Callable[[JobRecord], bool], timeout_s: float = WAIT_S
) -> JobRecord:
    deadline = time.monotonic() + timeout_s
    while True:
        job = store.get(job_id)
        if done(job):
            return job
        assert time.monotonic() < deadline, f"timed out; job is {job.status.name}"
        await asyncio.sleep(0.02)


async def wait_for_any(
    store: JobStore, job_ids: tuple[str, ...], done: Callable[[JobRecord], bool], timeout_s: float = WAIT_S
) -> JobRecord:
    """The first of `job_ids` (polled in turn) for which `done` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        for job_id in job_ids:
            job = store.get(job_id)
            if done(job):
                return job
        statuses = ", ".join(store.get(job_id).status.name for job_id in job_ids)
        assert time.monotonic() < deadline, f"timed out; jobs are {statuses}"
        await asyncio.sleep(0.02)


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll `condition` (on what the stand-in stages recorded, say) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def run(scenario: Callable[[], Any]) -> None:
    asyncio.run(scenario())


def start(args: PrevizArgs, stages: FakeStages) -> Scheduler:
    stages.artifacts = make_store(args.storage)
    i2v = stages.i2v_handles() if args.i2v is not None else {}
    return Scheduler(args, args.sampling, stages.housekeeping(), *stages.handles(), **i2v)


def stop(scheduler: Scheduler) -> None:
    scheduler._loop_task.cancel()


def empty_store(args: PrevizArgs) -> JobStore:
    """The job store of `args`, its tables created."""
    store = open_job_store(args.database_url)
    store.create_schema()
    return store


def run_until_finished(args: PrevizArgs, stages: FakeStages, store: JobStore, job_id: str) -> JobRecord:
    """Run a Scheduler on `stages` until the job is finished; the job as it ended."""

    async def scenario() -> JobRecord:
        scheduler = start(args, stages)
        try:
            return await wait_for(store, job_id, lambda job: job.is_finished)
        finally:
            stop(scheduler)

    return asyncio.run(scenario())
