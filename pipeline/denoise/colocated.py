"""ColocatedEngine: both experts of Wan2.2 in one engine thread, a request taken once and run through its
high-noise steps, then its low-noise steps, with no hop between deployments.

It drives two DenoiseEngines (one per expert, each with its own transformer, adapter bank and step
caches; never `start()`ed) on ONE thread. Each iteration runs ONE of them: the expert whose most urgent
admitted request is the most urgent of all (priority class, then deadline, then arrival: the
StepScheduler's ordering, pipeline.denoise.batching), so requests at different experts batch in different
iterations and the most urgent request anywhere always takes the next forward. Every request keeps its
priority, deadline and arrival time across the boundary, so the order is one order over all requests:
none waits behind later arrivals of its own class at the other expert (starvation-free as far as the
priority classes themselves are). On a tie the low-noise expert runs: its requests are nearer the end.

At the boundary (the high-noise engine resolves a request's state after its last high-noise step) the
state goes in memory to the low-noise engine, on the engine thread, and `on_boundary` hands it out (the
replica writes the expert-boundary checkpoint from it in the background); the low-noise steps start at
the next iteration. The state handed out is never written by the engines afterwards (each step makes new
tensors). A request whose state is already past the boundary (resumed from a checkpoint) starts at its
low-noise steps.

Progress is reported per expert, `on_progress(expert, done, total)`, as the split pair reports it, so the
Scheduler's stage bands (denoise_high, denoise_low) and the ETA read the same in both layouts.

Sharded, both engines run their forwards through one rank group that holds both experts on every rank:
each engine's `forward` names its expert, and the plan it sends carries it (serve.stages.shard_worker).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from pipeline.denoise.batching import AdapterSet, StepBatch
from pipeline.denoise.engine import (
    DenoiseEngine,
    EngineRequest,
    EngineShutdown,
    EngineStats,
    QueuePlace,
    RequestCancelled,
)
from pipeline.denoise.experts import Expert
from pipeline.denoise.state import DenoiseState
from pipeline.priority import PRIORITY_RANK, Priority
from pipeline.spec import StepCacheSettings
from pipeline.text import PromptEmbeds

logger = logging.getLogger(__name__)

EXPERTS: tuple[Expert, Expert] = ("high", "low")
IDLE_WAIT_S = 0.005  # an iteration that found nothing to plan waits this long (or for a wake-up)
# (expert, its steps done, the steps it runs for the request) -> None, on the engine thread after each step
ExpertProgressCallback = Callable[[Expert, int, int], None]
# (its place: the requests more urgent than it at both experts and their work) -> None, on the engine thread
WaitingCallback = Callable[[QueuePlace], None]
# (the state after the last high-noise step) -> None, on the engine thread as the request crosses the
# boundary; it must return quickly (the low-noise steps wait for it) and must not write the state.
BoundaryCallback = Callable[[DenoiseState], None]


@dataclass(slots=True)
class ColocatedRequest:
    """One request for both experts: the split pair's two EngineRequests in one."""

    request_id: str
    state: DenoiseState  # initial noise, or a state resumed from the expert-boundary checkpoint
    prompt: PromptEmbeds
    negative_prompt: PromptEmbeds
    guidance_high: float  # the high-noise expert's CFG scale; <= 1 runs without the negative prompt
    guidance_low: float  # the low-noise expert's
    priority: Priority = "batch"
    arrival_time: float | None = None  # engine clock; None: time of submit (kept across the boundary)
    deadline: float | None = None  # engine clock
    quality: str = "final"
    adapters: AdapterSet = ()
    cache: StepCacheSettings | None = None
    on_progress: ExpertProgressCallback | None = None
    on_waiting: WaitingCallback | None = None
    on_boundary: BoundaryCallback | None = None  # not called for a request that starts past the boundary
    condition: torch.Tensor | None = None  # I2V: its condition (pipeline.vae_encode), both experts'


class ColocatedEngine:
    """Runs a high-noise and a low-noise DenoiseEngine on one thread; DenoiseEngine's surface (submit, add,
    cancel, start, shutdown, is_alive, step), with `stats` per expert and `seconds_per_step` of one."""

    def __init__(self, high: DenoiseEngine, low: DenoiseEngine) -> None:
        if (high.expert, low.expert) != EXPERTS:
            raise ValueError(
                f"`high` and `low` must be the high- and low-noise engines but run {high.expert!r} and "
                f"{low.expert!r}."
            )
        if high.clock is not low.clock:
            raise ValueError("`high` and `low` must share one clock (arrival times cross the boundary).")
        self.engines: dict[Expert, DenoiseEngine] = {"high": high, "low": low}
        self.clock = high.clock
        self._lock = threading.Condition()  # guards what follows; wakes the engine thread
        self._where: dict[str, Expert] = {}  # req_id -> the engine holding it now
        self._cancelled: set[str] = set()  # cancelled while crossing the boundary (in neither engine)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.num_boundary_handovers = 0  # requests handed from the high- to the low-noise engine

    # ---- public API (DenoiseEngine's) --------------------------------------------------------------

    def submit(self, request: ColocatedRequest) -> Future[DenoiseState]:
        """Queue `request` at the expert its state is at; the Future resolves to the state after its last
        low-noise step. Malformed requests raise ValueError here, naming the field."""
        outer: Future[DenoiseState] = Future()
        outer.set_running_or_notify_cancel()  # only `cancel(id)` cancels, at a step boundary
        arrival_time = self.clock() if request.arrival_time is None else request.arrival_time
        with self._lock:
            if self._stopping:
                raise EngineShutdown(
                    f"the colocated engine is shut down; {request.request_id!r} was refused."
                )
            if request.request_id in self._where:
                raise ValueError(f"request {request.request_id!r} is already in the colocated engine.")
            self._where[request.request_id] = "high"
        try:
            inner = self.engines["high"].submit(self._part(request, "high", request.state, arrival_time))
        except BaseException:
            with self._lock:
                self._where.pop(request.request_id, None)
            raise
        with self._lock:
            self._lock.notify_all()
        inner.add_done_callback(lambda done: self._after_high(request, arrival_time, done, outer))
        return outer

    def add(self, request: ColocatedRequest) -> asyncio.Future[DenoiseState]:
        """`submit` for asyncio callers: await the result; cancelling the awaitable cancels the request."""
        loop = asyncio.get_running_loop()
        awaitable = asyncio.wrap_future(self.submit(request), loop=loop)
        request_id = request.request_id
        awaitable.add_done_callback(lambda done: self.cancel(request_id) if done.cancelled() else None)
        return awaitable

    def cancel(self, request_id: str) -> bool:
        """Mark `request_id`; it leaves at the next step boundary of the engine holding it. False when
        it is not in the colocated engine."""
        with self._lock:
            expert = self._where.get(request_id)
            if expert is None:
                return False
            self._cancelled.add(request_id)  # read at the handover, where it is in neither engine
            self._lock.notify_all()
        self.engines[expert].cancel(request_id)
        return True

    def start(self) -> None:
        """Run iterations on the engine thread until `shutdown()`."""
        with self._lock:
            if self._stopping:
                raise EngineShutdown("the colocated engine is shut down and cannot start again.")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._serve_forever, name="denoise-colocated", daemon=True)
            self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop after the current iteration; every unfinished request fails with EngineShutdown."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is None:
            self._shut_engines()
        elif self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def step(self) -> StepBatch:
        """One iteration on the calling thread (tests): the plan it ran, whose `expert` says which one."""
        if self._thread is not None:
            raise RuntimeError("step() drives an engine without its thread; this one was start()ed.")
        return self._iterate()

    def stats(self) -> dict[Expert, EngineStats]:
        """expert -> its engine's stats (metrics report each under its expert label)."""
        return {expert: engine.stats() for expert, engine in self.engines.items()}

    def seconds_per_step(
        self, expert: Expert, bucket: tuple[int, ...], quality: str = "final", request_id: str | None = None
    ) -> float | None:
        """What one more step of `expert` costs on this replica now (DenoiseEngine.seconds_per_step)."""
        return self.engines[expert].seconds_per_step(bucket, quality, request_id)

    # ---- the iteration ------------------------------------------------------------------------------

    def _iterate(self) -> StepBatch:
        for engine in self.engines.values():
            engine.boundary()  # cancels and arrivals (handovers included) into the planners
        expert = self._next_expert()
        if expert is None:
            return StepBatch.make_empty("high")
        plan = self.engines[expert].step()
        for other in EXPERTS:
            if other != expert:
                self.engines[other].tell_waiting()  # its waiting requests waited for this iteration too
        return plan

    def _next_expert(self) -> Expert | None:
        """The expert holding the most urgent admitted request (the low-noise one on a tie)."""
        candidates = [
            (min(request.urgency[:4] for request in requests), order, expert)  # seq is per engine: left out
            for order, expert in enumerate(("low", "high"))
            if (requests := self.engines[expert].scheduler.requests.values())
        ]
        return min(candidates)[2] if candidates else None

    def _serve_forever(self) -> None:
        while self._wait_for_work():
            try:
                if self._iterate().is_empty:  # a request between submit and its engine's inbox
                    with self._lock:
                        self._lock.wait(IDLE_WAIT_S)
            except Exception as error:  # a bug, not one request's fault: fail what is live, keep serving
                logger.exception("colocated engine iteration crashed")
                for engine in self.engines.values():
                    engine.fail_live(error)
        self._shut_engines()

    def _wait_for_work(self) -> bool:
        with self._lock:
            while not (self._stopping or self._where):
                self._lock.wait()
            return not self._stopping

    def _shut_engines(self) -> None:
        """Fail what is unfinished, on the thread that owns the engines' tensors (high first: its
        failures end their requests before any could cross)."""
        for expert in EXPERTS:
            self.engines[expert].shutdown()

    # ---- the boundary -------------------------------------------------------------------------------

    def _after_high(
        self, request: ColocatedRequest, arrival_time: float, done: Future, outer: Future[DenoiseState]
    ) -> None:
        """The high-noise part ended (on the engine thread, or the submitter's when it had no high-noise
        steps): hand the state to the low-noise engine, or end the request with the failure."""
        request_id = request.request_id
        error = done.exception()
        if error is not None:
            self._resolve(request_id, outer, error)
            return
        state: DenoiseState = done.result()
        crossed = state.step_index > request.state.step_index  # ran high-noise steps here
        with self._lock:
            if request_id in self._cancelled:
                cancelled = RequestCancelled(f"request {request_id!r} was cancelled in the colocated engine.")
                stopping = False
            else:
                cancelled, stopping = None, self._stopping
                self._where[request_id] = "low"
        if cancelled is not None:
            self._resolve(request_id, outer, cancelled)
            return
        if stopping:
            self._resolve(
                request_id,
                outer,
                EngineShutdown(f"the colocated engine shut down before {request_id!r} finished."),
            )
            return
        if crossed and request.on_boundary is not None:
            try:
                request.on_boundary(state)
            except Exception as boundary_error:  # the checkpoint is best effort: the request goes on
                logger.warning("request %r: on_boundary raised %r", request_id, boundary_error)
        try:
            inner = self.engines["low"].submit(self._part(request, "low", state, arrival_time))
        except BaseException as submit_error:
            self._resolve(request_id, outer, submit_error)
            return
        with self._lock:
            self.num_boundary_handovers += crossed
            self._lock.notify_all()
        inner.add_done_callback(lambda low: self._after_low(request_id, low, outer))

    def _after_low(self, request_id: str, done: Future, outer: Future[DenoiseState]) -> None:
        error = done.exception()
        self._resolve(request_id, outer, error if error is not None else done.result())

    def _resolve(self, request_id: str, outer: Future, outcome: DenoiseState | BaseException) -> None:
        with self._lock:
            self._where.pop(request_id, None)
            self._cancelled.discard(request_id)
        if isinstance(outcome, BaseException):
            outer.set_exception(outcome)
        else:
            outer.set_result(outcome)

    def _part(
        self, request: ColocatedRequest, expert: Expert, state: DenoiseState, arrival: float
    ) -> EngineRequest:
        """The request's share of one expert: its guidance and callbacks, the same urgency."""
        on_progress = on_waiting = None
        if request.on_progress is not None:
            report = request.on_progress
            on_progress = lambda done, total: report(expert, done, total)  # noqa: E731
        if request.on_waiting is not None:  # the other expert's more urgent requests run first too
            tell, other = request.on_waiting, self.engines["low" if expert == "high" else "high"]
            deadline = request.deadline
            urgency = (PRIORITY_RANK[request.priority], deadline is None, deadline or 0.0, arrival)
            on_waiting = lambda place: tell(place.behind(*other.work_before(urgency)))  # noqa: E731
        return EngineRequest(
            request_id=request.request_id,
            state=state,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            guidance=request.guidance_high if expert == "high" else request.guidance_low,
            priority=request.priority,
            arrival_time=arrival,
            deadline=request.deadline,
            quality=request.quality,
            adapters=request.adapters,
            on_progress=on_progress,
            on_waiting=on_waiting,
            cache=request.cache,
            condition=request.condition,
        )
