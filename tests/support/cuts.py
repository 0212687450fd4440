"""Run a local API's queued cut jobs in this process: the Scheduler's CutRunner and the real Finisher
class, with the Finisher's DeploymentHandle replaced by a call of its method in this event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from serve.scheduling.cuts import CutRunner
from serve.stages.finisher import FinisherStage
from tests.support.api_app import LocalApi


class Stream:
    """What `handle.options(stream=True).render_cut.remote(call)` returns: an async iterator with cancel().
    cancel() stops the replica's generator as Serve does: the pending next event is cancelled, or when the
    caller is not waiting on one, the generator is closed (GeneratorExit at its yield)."""

    def __init__(self, events: AsyncGenerator[Any, None]) -> None:
        self._events = events
        self._task: asyncio.Task[Any] | None = None
        self._closing: asyncio.Task[None] | None = None

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        self._task = asyncio.ensure_future(anext(self._events))
        return await self._task

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        elif self._closing is None:
            self._closing = asyncio.ensure_future(self._events.aclose())

    async def settle(self) -> None:
        """Wait until the generator's own clean-up after a cancel has ended (a replica's, in Serve)."""
        pending = [task for task in (self._task, self._closing) if task is not None]
        await asyncio.gather(*pending, return_exceptions=True)


class InProcessFinisher:
    """Stands in for the Finisher's DeploymentHandle (only what CutRunner calls)."""

    def __init__(self, stage: FinisherStage) -> None:
        self.stage = stage
        self.render_cut = self
        self.streams: list[Stream] = []

    def options(self, **_options: Any) -> InProcessFinisher:
        return self

    def remote(self, call: Any) -> Stream:
        stream = Stream(self.stage.render_cut(call))
        self.streams.append(stream)
        return stream

    async def settle(self) -> None:
        """Wait until every stream's clean-up has ended, as a test must before it looks at the store."""
        for stream in self.streams:
            await stream.settle()


def cut_runner(api: LocalApi) -> CutRunner:
    finisher = InProcessFinisher(FinisherStage(api.state.args))
    return CutRunner(
        api.store,
        api.state.artifacts,
        finisher,
        "test-scheduler",
        max_in_flight=1,
        max_attempts=3,  # type: ignore[arg-type]
    )


def run_cuts(api: LocalApi) -> None:
    """Render every queued cut to its end, as the Scheduler would."""

    async def run() -> None:
        runner = cut_runner(api)
        await runner.start()
        while runner.in_flight:
            await runner.settle()
            await runner.start()

    with ThreadPoolExecutor(1) as thread:  # its own event loop, also beside a running one (Playwright's)
        thread.submit(lambda: asyncio.run(run())).result()


@contextmanager
def rendering_cuts(api: LocalApi, poll_s: float = 0.05) -> Iterator[None]:
    """Inside: a thread renders each cut queued (a Scheduler's part for a client that waits on a cut)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            run_cuts(api)
            stop.wait(poll_s)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
