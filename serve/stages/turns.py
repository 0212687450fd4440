"""Where a stage call waits, counted where it waits: a replica that runs one call at a time (the decoder,
the upscaler: memory-bound work) keeps its calls in a line (`Turns`), one that batches calls into one
forward at a time (the text encoder) in a `BatchLine`, and a call streams its place in that line
(`StageWaiting`) while it waits, then its result. The Scheduler stores the place with the job, so the page
says "waiting for the decoder · 3 ahead" instead of a stage that looks stalled at its last progress.

Written by hand: asyncio.Lock is first-come-first-served but does not say how many are ahead of a waiter.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StageWaiting:
    """Streamed by a one-at-a-time stage call before its result: how many calls are ahead of it in the
    replica's line (the one running included); 0 once its turn came (sent only after a wait). A batching
    replica (BatchLine) adds `seconds_left`: the forwards until the call's result (the running one, those
    the calls ahead fill, its own) at its measured forward time; None before it measured one."""

    num_ahead: int
    seconds_left: float | None = None


class Turns:
    """A first-come-first-served line of calls, one holding the turn at a time. Single event loop only
    (a replica's); a caller that is cancelled while waiting leaves the line."""

    def __init__(self) -> None:
        self._line: list[object] = []  # tokens in arrival order; the first one holds the turn
        self._moved = asyncio.Event()  # set (and replaced) whenever someone leaves the line

    def __len__(self) -> int:
        return len(self._line)

    async def wait(self) -> AsyncIterator[StageWaiting]:
        """Join the line: yields the place each time it changes while waiting (nothing when the line was
        empty), `StageWaiting(0)` when a wait ended, and ends holding the turn, which the caller gives
        back with `leave()` (a generator, not a context manager, so a stage call can stream the places):

            async for waiting in turns.wait():
                yield waiting  # to the Scheduler
            try:
                ...  # the work
            finally:
                turns.leave()
        """
        token = object()
        self._line.append(token)
        last = 0
        try:
            while (ahead := self._line.index(token)) > 0:
                # taken before the yield: a leave while the caller handles the place sets this one (taken
                # after it, the replacement would never be set when that was the last leave)
                moved = self._moved
                if ahead != last:
                    last = ahead
                    yield StageWaiting(ahead)
                await moved.wait()
        except BaseException:
            self._remove(token)
            raise
        if last:
            yield StageWaiting(0)

    def leave(self) -> None:
        """The call holding the turn is done: the next one in line gets it."""
        if self._line:
            self._remove(self._line[0])

    def _remove(self, token: object) -> None:
        if token in self._line:
            self._line.remove(token)
        self._moved.set()
        self._moved = asyncio.Event()


class BatchLine:
    """The calls of a replica that batches them into one forward at a time (the text encoder: Serve's
    `@serve.batch`, up to 32 prompts a forward): a call waits while the forward before it runs, or while
    earlier calls fill the next one. A call joins the line (`join`), the batched function marks the calls
    whose texts its forward took (`started`), and the call leaves when its result is in (`leave`); while it
    waits, `wait` streams its place: the calls before it still in the line, those in the running forward
    included, and the seconds until its result: the forwards that takes (`calls_per_forward` calls fill
    one) at the mean of the recent forwards the batched function measured (`forward_took`). Single event
    loop only (a replica's).

    Written by hand: `@serve.batch` keeps its queue private and says nothing of a caller's place in it."""

    def __init__(self, calls_per_forward: int = 1) -> None:
        self.calls_per_forward = max(1, calls_per_forward)
        self._line: list[object] = []  # calls in arrival order, until their results are in
        self._started: set[object] = set()  # calls whose texts a forward took
        self._moved = asyncio.Event()  # set (and replaced) whenever a call started or left
        self._forward_s: deque[float] = deque(maxlen=16)  # the recent forwards' seconds

    def __len__(self) -> int:
        return len(self._line)

    def join(self) -> object:
        """A new call at the end of the line: its token, for the batched items and `wait`."""
        token = object()
        self._line.append(token)
        return token

    def started(self, tokens: Iterable[object]) -> None:
        """A forward took the texts of these calls (called by the batched function)."""
        self._started.update(tokens)
        self._notify()

    def forward_took(self, seconds: float) -> None:
        """A forward took `seconds` (measured by the batched function)."""
        self._forward_s.append(seconds)

    def seconds_left(self, token: object) -> float | None:
        """Seconds until waiting call `token`'s result: the running forward (if a call ahead is in it),
        then the forwards that the calls ahead not yet taken and it fill; None before any forward."""
        if not self._forward_s:
            return None
        ahead = self._line[: self._line.index(token)]
        running = any(call in self._started for call in ahead)
        waiting = sum(call not in self._started for call in ahead)
        forwards = running + math.ceil((waiting + 1) / self.calls_per_forward)
        return forwards * sum(self._forward_s) / len(self._forward_s)

    def leave(self, token: object) -> None:
        """The call's result is in, or it was cancelled: the calls behind it move up."""
        if token in self._line:
            self._line.remove(token)
        self._started.discard(token)
        self._notify()

    async def wait(self, token: object, work: asyncio.Future[object]) -> AsyncIterator[StageWaiting]:
        """The place of call `token` each time it changes while `work` (its batched items) waits for a
        forward (nothing when a forward took it at once), then `StageWaiting(0)` when one took it."""
        last = 0
        while not work.done() and token not in self._started:
            ahead = self._line.index(token)
            moved_event = self._moved  # before the yield, as in Turns.wait: no move is missed
            if ahead != last:
                last = ahead
                yield StageWaiting(ahead, self.seconds_left(token))
            moved = asyncio.ensure_future(moved_event.wait())
            try:
                await asyncio.wait({moved, work}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                moved.cancel()
        if last:
            yield StageWaiting(0)

    def _notify(self) -> None:
        self._moved.set()
        self._moved = asyncio.Event()
