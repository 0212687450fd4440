"""Where a stage call waits, counted where it waits: a replica that runs one call at a time (the decoder,
the upscaler: memory-bound work) keeps its calls in a line, and a call streams its place in that line
(`StageWaiting`) while it waits, then its result. The Scheduler stores the place with the job, so the page
says "waiting for the decoder · 3 ahead" instead of a stage that looks stalled at its last progress.

Written by hand: asyncio.Lock is first-come-first-served but does not say how many are ahead of a waiter.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StageWaiting:
    """Streamed by a one-at-a-time stage call before its result: how many calls are ahead of it in the
    replica's line (the one running included); 0 once its turn came (sent only after a wait)."""

    num_ahead: int


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
                if ahead != last:
                    last = ahead
                    yield StageWaiting(ahead)
                moved = self._moved
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
