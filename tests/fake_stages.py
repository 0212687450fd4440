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

from serve.config import PrevizArgs
from serve.jobs import JobRecord, JobStore
from serve.scheduling.scheduler import Scheduler
from serve.stages.payloads import (
    DenoiseCall,
    DenoiseDone,
    DenoiseProgress,
    DenoiseWaiting,
    FinishCall,
    FinishedClip,
    FrameBatch,
)
from serve.storage import JobArtifacts
from serve.webhooks import open_job_store


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
    waiting_high: tuple[int, ...] = ()  # queue places the high expert's engine reports before its first step
    hold_high: asyncio.Event | None = None  # after those reports, the high expert waits for this
    hold_decode: asyncio.Event | None = None  # the decoder waits for this before it answers
    cancelled: list[str] = field(default_factory=list)  # stages whose call the Scheduler cancelled
    seconds_per_step: float | None = None  # the step time the denoisers report with each step (ETA)
    denoise_calls: list[DenoiseCall] = field(default_factory=list)  # every expert's calls, in order
    embeds_shape: tuple[int, ...] = (4, 8)  # (tokens, text_dim) of the embeddings; umT5: (512, 4096)
    solver_order: int = 0  # model outputs the denoisers keep in the state's history; UniPC at order 2: 2
    wire: Wire = field(default_factory=Wire)  # what crossed between the Scheduler and the stages

    def handles(self) -> list[Any]:
        def method(function: Callable[..., Any], name: str) -> Method:
            return Method(function, name, self.cancelled, self.wire)

        return [
            Handle(encode=method(self.encode, "encode")),
            Handle(denoise=method(self.denoiser("high"), "high")),
            Handle(denoise=method(self.denoiser("low"), "low")),
            Handle(decode=method(self.decode, "decode")),
            Handle(upscale=method(self.upscale, "upscale")),
            Handle(finish=method(self.finish, "finish")),
        ]

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

    async def encode(self, text: str) -> np.ndarray:
        self.record("encode", text)
        return np.full(self.embeds_shape, float(len(text)), dtype=np.float32)

    def denoiser(self, expert: str) -> Callable[..., AsyncIterator[Any]]:
        async def denoise(call: DenoiseCall, bucket: str) -> AsyncIterator[Any]:
            self.denoise_calls.append(call)
            self.record(expert, (call.request_id, bucket, call.state.step_index))
            if expert == "low" and self.hold_low is not None:
                await self.hold_low.wait()
            if expert == "high":
                for num_ahead in self.waiting_high:
                    yield DenoiseWaiting(num_ahead=num_ahead)
                if self.hold_high is not None:
                    await self.hold_high.wait()
            state = call.state
            steps = 3 if expert == "high" else state.num_steps - state.step_index
            for done in range(1, steps + 1):
                yield DenoiseProgress(done=done, total=steps, seconds_per_step=self.seconds_per_step)
            latents = state.latents + (1.0 if expert == "high" else 10.0)
            history = tuple(latents.copy() for _ in range(self.solver_order))  # as UniPC keeps them
            done_state = replace(state, latents=latents, step_index=state.step_index + steps)
            if history:
                done_state = replace(done_state, model_outputs=history, last_sample=latents.copy())
            yield DenoiseDone(state=done_state, seconds=0.01)

        return denoise

    async def decode(self, latents: np.ndarray, fps: int) -> FrameBatch:
        self.record("decode", float(latents.mean()))
        if self.hold_decode is not None:
            await self.hold_decode.wait()
        return FrameBatch(ref=[np.zeros((9, 64, 96, 3), np.uint8)], fps=fps, seconds=0.01)

    async def upscale(self, frames: FrameBatch, width: int, height: int) -> FrameBatch:
        self.record("upscale", (width, height))
        return frames

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
    store: JobStore, job_id: str, done: Callable[[JobRecord], bool], timeout_s: float = 20
) -> JobRecord:
    deadline = time.monotonic() + timeout_s
    while True:
        job = store.get(job_id)
        if done(job):
            return job
        assert time.monotonic() < deadline, f"timed out; job is {job.status.name}"
        await asyncio.sleep(0.02)


def run(scenario: Callable[[], Any]) -> None:
    asyncio.run(scenario())


def start(args: PrevizArgs, stages: FakeStages) -> Scheduler:
    return Scheduler.func_or_class(args, args.sampling, stages.housekeeping(), *stages.handles())


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
