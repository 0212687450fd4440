"""DenoiseEngine: step-level continuous batching of many requests through one expert.

Each iteration is three verbs, as in vLLM v1: `plan = schedule()` picks the requests that share the next
forward (batching.StepScheduler, pure), `output = run(plan)` does ONE guided forward for all of them
(cond + uncond rows, per-sample timesteps and guidance), `update(plan, output)` steps every member's own
UniPC solver and releases the requests whose steps for this expert are done. Requests join, leave and are
cancelled only at these step boundaries, so a newly arrived interactive request runs in the very next
iteration. A request the plan leaves out before its first step is told its place in the queue
(`on_waiting`: a QueuePlace, the requests more urgent than it and their queued work at this replica's
measured rate), so its caller can show a queue position and an ETA, not a stalled stage.

Threads: one engine thread (`start()`) runs iterations and owns every tensor and the planner; other
threads only touch the inbox, the cancel set and the published stats, under `_lock`. Tests drive the
engine with `step()` instead, for deterministic join times. `submit` returns a concurrent Future, `add`
an asyncio future on the caller's loop (resolved through `loop.call_soon_threadsafe`).

`run` hands each plan to a step runner (pipeline.denoise.runner): a LocalRunner on this device by
default, or a sharded replica's GroupRunner (pipeline.denoise.parallel), which runs the same plan on every
rank of its group. The engine is the same at any degree: it stays the single planner on rank 0, every
rank holds the same adapters and its own shard of each caching request's residual, and a failed rank
group (ShardGroupError) propagates out of the iteration instead of being retried request by request. One
runner may hold several experts (a colocated replica's group): each engine names its own in its plans.

A request whose next step this expert does not own is resolved at once with its state unchanged, so a
caller can hand every request to both experts in order. The one-request Denoiser
(pipeline/denoise/denoiser.py) drives this engine on its caller's thread.

Tiers and LoRA: a request names its quality tier (which solver template continues its state: `solvers`)
and its adapter set; a plan only holds requests of one (latent shape, tier, adapter set), and `run`
has every rank switch the expert's AdapterBank to the plan's set before the forward (set_adapters /
disable_lora, never fuse). Each iteration's wall time is kept per (bucket, tier) and per member, so
progress reports can carry a step time measured on this replica (`seconds_per_step`) for an ETA.

Image-to-video (Wan2.2-I2V-A14B): an engine whose expert takes more input channels than it predicts
serves requests that carry a `condition` (pipeline.vae_encode), kept on the device for the request's
life and concatenated to its latents in every row of every forward (forward.GuidedInput). Such an engine
only ever holds conditioned requests (a T2V request is refused at submit, and the other way round), so
I2V requests batch with each other and never with T2V rows.

Step caching (pipeline.denoise.stepcache, MagCache per request): before each plan every caching request
decides whether its next step reuses its residual; the planner gives such a member no tokens, and `run`
sends only the computing members' rows through the blocks (the cheap embedding and head run for all).
The decisions live in the request's `_Live`; the residual tensors in the runner's store on every rank,
released from every rank when the request leaves (finished, cancelled or failed).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

from pipeline.denoise.adapters import AdapterBank, adapter_label
from pipeline.denoise.batching import (
    AdapterSet,
    Bucket,
    RequestStatus,
    ScheduledRequest,
    StepBatch,
    StepScheduler,
)
from pipeline.denoise.blocks import SplitTransformer
from pipeline.denoise.experts import Expert, expert_for
from pipeline.denoise.forward import GuidedInput
from pipeline.denoise.kernels import synchronize
from pipeline.denoise.parallel import ShardGroupError
from pipeline.denoise.runner import Holding, LocalRunner, PlannedRequest, StepPlan, StepRunner
from pipeline.denoise.state import (
    DenoiseState,
    Solver,
    capture_history,
    new_solver,
    restore_solver,
    solver_for,
)
from pipeline.denoise.stepcache import (
    CacheDecision,
    MagnitudeCurve,
    RequestCache,
    new_request_cache,
)
from pipeline.determinism import make_batch_invariant
from pipeline.priority import PRIORITY_RANK, Priority
from pipeline.spec import StepCacheSettings, num_video_tokens
from pipeline.text import PromptEmbeds, pad_embeds

logger = logging.getLogger(__name__)

# (steps done, steps this expert runs for the request) -> None. Called on the engine thread after each
# step (asyncio users hop back with loop.call_soon_threadsafe); if it raises, that request fails.
ProgressCallback = Callable[[int, int], None]
# (its place in this engine's queue) -> None. Called on the engine thread at each step boundary where the
# request, not yet started, is left out of the batch and its place changed; if it raises, that request fails.
WaitingCallback = Callable[["QueuePlace"], None]

DEFAULT_MAX_NUM_TOKENS = 65_536  # one 480p x 81-frame request with CFG (2 x 32,760), or many small drafts
DEFAULT_MAX_BATCH_SIZE = 16
STATS_WINDOW = 256  # iterations the rate and mean figures look back over
STEP_TIME_WINDOW = 8  # iterations of one (bucket, tier) its step-time estimate averages


class EngineError(RuntimeError):
    """The denoise engine did not produce a result for a request."""


class RequestCancelled(EngineError):
    """The request was cancelled; it left the engine at a step boundary."""


class RequestFailed(EngineError):
    """This request failed (non-finite latents, or its forward or solver step raised); others went on.

    A failed rank group (ShardGroupError) is not one request's fault: it fails the whole iteration."""


class EngineShutdown(EngineError):
    """The engine was shut down before the request finished."""


@dataclass(frozen=True, slots=True)
class QueuePlace:
    """What a request waiting for its first step hears (`on_waiting`): counted in the engine, measured on
    this replica, never guessed (None where nothing was measured yet)."""

    num_ahead: int  # live requests more urgent than it (its queue position)
    # their queued token-steps (tokens per forward x steps left) at the replica's recently measured seconds
    # per token: when its first step can come (a forward at these shapes is compute-bound); None: work is
    # ahead but no iteration was measured yet
    seconds_ahead: float | None
    # what one step of its (bucket, tier) costs here (the mean of the last iterations of that pair; before
    # any, its own tokens at the measured seconds per token); None: no iteration measured yet
    seconds_per_step: float | None

    def behind(self, num_ahead: int, seconds_ahead: float | None) -> QueuePlace:
        """This place with more work before it (another engine's, on a colocated replica)."""
        seconds = None
        if seconds_ahead is not None and self.seconds_ahead is not None:
            seconds = self.seconds_ahead + seconds_ahead
        return QueuePlace(self.num_ahead + num_ahead, seconds, self.seconds_per_step)

    @property
    def told(self) -> tuple[int, bool, bool]:
        """What changes a report: the place, and whether each figure is measured (the ETA built from
        them is an absolute time, so a figure that only moves does not need telling again)."""
        return self.num_ahead, self.seconds_ahead is None, self.seconds_per_step is None


@dataclass(slots=True)
class EngineRequest:
    """One request handed to an expert's engine."""

    request_id: str
    state: DenoiseState  # from the previous expert, or initial_state() for the high expert
    prompt: PromptEmbeds
    negative_prompt: PromptEmbeds
    guidance: float  # this expert's CFG scale; <= 1 runs without the negative prompt
    priority: Priority = "batch"
    arrival_time: float | None = None  # engine clock (time.monotonic by default); None: time of submit
    deadline: float | None = None  # engine clock; earlier deadlines run first within a priority class
    quality: str = "final"  # the tier: the solver template (`solvers`) that continues its state
    adapters: AdapterSet = ()  # sorted (name, weight) LoRA adapters; names unknown to the engine: refused
    on_progress: ProgressCallback | None = None
    on_waiting: WaitingCallback | None = None
    cache: StepCacheSettings | None = None  # step caching; None: every step runs
    # I2V: (20, frames, height, width) float32 CPU, mask + keyframe latents (pipeline.vae_encode); T2V: None
    condition: torch.Tensor | None = None


@dataclass(slots=True)
class StepOutput:
    """What one forward produced, per member of the plan."""

    noise: dict[str, torch.Tensor] = field(default_factory=dict)  # req_id -> guided noise prediction
    errors: dict[str, Exception] = field(default_factory=dict)  # req_id -> why its forward failed


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot for metrics; rates and means cover the last STATS_WINDOW iterations."""

    expert: str
    num_queued_by_bucket: dict[Bucket, int]  # bucket -> unfinished requests (waiting or running)
    num_waiting: int  # submitted, not yet stepped by this engine
    num_running: int  # stepped at least once, not finished
    num_iterations: int
    num_forwards: int  # transformer calls, one-by-one retries after a failed batch included
    num_rows: int  # rows those calls sent through the blocks (cond + uncond; skipped steps send none)
    num_cached_steps: int  # request steps served from a step cache instead of the blocks
    num_cache_bytes: int  # residuals the live requests' step caches hold now (rank 0's shares on a group)
    max_cache_bytes: int  # their bound: one residual of its rows per live caching request
    num_finished: int
    num_cancelled: int
    num_failed: int
    batch_size_histogram: dict[int, int]  # batch size -> iterations that ran with it (since start)
    mean_batch_size: float
    mean_num_tokens: float  # tokens per iteration, CFG rows included
    max_num_tokens: int  # the token budget, to read mean_num_tokens against
    iterations_per_second: float  # over time spent iterating (idle time excluded)
    num_adapter_switches: int = 0  # adapter-set changes between forwards (each is set_adapters/disable)
    forwards_by_adapters: dict[str, int] = field(default_factory=dict)  # adapter_label -> forwards
    # The load the router and autoscaler read: Σ over unfinished requests of tokens per forward (CFG rows
    # included) x steps left in this expert. A forward at these shapes is compute-bound, so its time grows
    # with its tokens: token-steps compare replicas of one deployment without any measurement.
    num_queued_token_steps: int = 0
    seconds_per_token: float = 0.0  # measured over the recent window (0.0 before the first iteration)

    @property
    def queued_work_seconds(self) -> float:
        """The queued token-steps at the recently measured rate (0.0 until an iteration ran)."""
        return self.num_queued_token_steps * self.seconds_per_token


@dataclass(slots=True)
class _Pending:
    request: EngineRequest
    future: Future
    bucket: Bucket
    arrival_time: float  # the request's, or the engine clock at submit
    timesteps: list[int]  # the timesteps this expert owns, from the state's step index on
    adapters: AdapterSet  # the part of the request's set this expert has weights for


@dataclass(slots=True)
class _Live:
    """Tensors of an admitted request; only the engine thread touches them."""

    request: EngineRequest
    future: Future
    solver: Solver
    latents: torch.Tensor  # on the model's device
    cond: torch.Tensor  # (max_sequence_length, text_dim) on device
    uncond: torch.Tensor | None  # None without CFG
    index: int  # index into the request's full schedule of its next step
    condition: torch.Tensor | None = None  # I2V: its condition on device, the same for every step
    place: QueuePlace | None = None  # the queue place last reported to `on_waiting`; None: none reported
    cache: RequestCache | None = None  # its step cache in this expert; None: every step runs
    decision: CacheDecision | None = None  # the cache's decision for step `index`, made before the plan


class DenoiseEngine:
    """Runs one expert for many requests, one batched forward per iteration."""

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        solver_template: UniPCMultistepScheduler,
        *,
        expert: Expert,
        boundary_ratio: float,
        max_sequence_length: int = 512,
        max_num_tokens: int = DEFAULT_MAX_NUM_TOKENS,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        clock: Callable[[], float] = time.monotonic,
        runner: StepRunner | None = None,
        solvers: Mapping[str, Solver] | None = None,
        adapters: AdapterBank | None = None,
        cache_curve: MagnitudeCurve | None = None,
    ) -> None:
        """`solvers`: quality -> solver template of the other tiers (`final` is `solver_template`);
        `adapters`: the expert's loaded LoRA adapters (None: requests with adapters are refused);
        `runner`: what runs the plans (default: a LocalRunner of `transformer` and `adapters`); given, its
        holding of `expert` must be `transformer`, and its bank is the engine's adapters."""
        self.transformer = make_batch_invariant(transformer)  # a request's rows: same bits in any batch
        if runner is None:
            runner = LocalRunner({expert: Holding(self.transformer, adapters)})
        holding = runner.holding(expert)
        if holding.transformer is not transformer or (adapters is not None and holding.bank is not adapters):
            raise ValueError(
                f"the runner's {expert} expert must hold this engine's `transformer` and `adapters`."
            )
        self.runner: StepRunner = runner  # runs each plan: this device, or every rank of a group
        self.store = holding.store  # this process's residuals of the caching requests (a shard on a group)
        self.split = SplitTransformer(self.transformer)  # sizes of the step caches' residuals
        self.cache_curve = cache_curve  # magnitude ratios the caching requests decide with
        self.solver_template = solver_template
        self.solvers: dict[str, Solver] = {**(solvers or {}), "final": solver_template}
        self.adapters = holding.bank
        self.expert: Expert = expert
        self.boundary_timestep = boundary_ratio * solver_template.config.num_train_timesteps
        self.max_sequence_length = max_sequence_length
        self.clock = clock
        self.scheduler = StepScheduler(expert, max_num_tokens=max_num_tokens, max_batch_size=max_batch_size)
        self.device = next(transformer.parameters()).device
        self._live: dict[str, _Live] = {}  # req_id -> tensors (engine thread only)
        self._schedules: dict[tuple[str, int], list[int]] = {}  # (quality, num_steps) -> timesteps
        self._lock = threading.Condition()  # guards everything below; wakes the engine thread
        self._inbox: dict[str, _Pending] = {}  # req_id -> submitted, admitted at the next boundary
        self._known: set[str] = set()  # ids submitted and not yet resolved
        self._cancel_requested: set[str] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._published_queue: dict[Bucket, int] = {}  # bucket -> admitted unfinished requests
        self._published_running = 0
        self._published_cache = (0, 0)  # (bytes held, their bound) of the live step caches
        self._published_token_steps = 0  # admitted requests' tokens x steps left (EngineStats)
        self._counts: Counter[str] = Counter()  # iterations, forwards, rows, cached steps, outcomes
        self._histogram: Counter[int] = Counter()  # batch size -> iterations
        self._recent: deque[tuple[float, int, int]] = deque(maxlen=STATS_WINDOW)  # (secs, size, tokens)
        self._forwards_by_adapters: Counter[str] = Counter()  # adapter_label -> forwards
        # (bucket, quality) -> wall seconds of its last iterations: the step time progress reports carry
        self._step_seconds: dict[tuple[Bucket, str], deque[float]] = {}
        # req_id -> wall seconds of the last iterations it took part in, its skipped steps included
        self._request_seconds: dict[str, deque[float]] = {}

    # ---- public API -------------------------------------------------------------------------------

    @property
    def num_forwards(self) -> int:
        return self._counts["forwards"]

    def submit(self, request: EngineRequest) -> Future[DenoiseState]:
        """Queue `request` for the next step boundary; the Future resolves to its DenoiseState."""
        self._validate(request)
        future: Future[DenoiseState] = Future()
        future.set_running_or_notify_cancel()  # only `cancel(id)` cancels, at a step boundary
        timesteps = self._owned_timesteps(request.state, request.quality)
        adapters = self._effective_adapters(request)
        if not timesteps:
            future.set_result(request.state)
            return future
        arrival_time = self.clock() if request.arrival_time is None else request.arrival_time
        with self._lock:
            if self._stopping:
                raise EngineShutdown(
                    f"the {self.expert} engine is shut down; request {request.request_id!r} was not accepted."
                )
            if request.request_id in self._known:
                raise ValueError(f"request {request.request_id!r} is already in the {self.expert} engine.")
            self._known.add(request.request_id)
            bucket = tuple(request.state.latents.shape)
            self._inbox[request.request_id] = _Pending(
                request, future, bucket, arrival_time, timesteps, adapters
            )
            self._lock.notify_all()
        return future

    def add(self, request: EngineRequest) -> asyncio.Future[DenoiseState]:
        """`submit` for asyncio callers: await the result; cancelling the awaitable cancels the request."""
        loop = asyncio.get_running_loop()
        awaitable = asyncio.wrap_future(self.submit(request), loop=loop)
        request_id = request.request_id
        awaitable.add_done_callback(lambda done: self.cancel(request_id) if done.cancelled() else None)
        return awaitable

    def cancel(self, request_id: str) -> bool:
        """Mark `request_id`; it leaves at the next step boundary. False when it is not in the engine."""
        with self._lock:
            if request_id not in self._known:
                return False
            self._cancel_requested.add(request_id)
            self._lock.notify_all()
        return True

    def start(self) -> None:
        """Run iterations on an engine thread until `shutdown()`."""
        with self._lock:
            if self._stopping:
                raise EngineShutdown(f"the {self.expert} engine is shut down and cannot start again.")
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._serve_forever, name=f"denoise-{self.expert}", daemon=True
            )
            self._thread.start()

    def is_alive(self) -> bool:
        """Whether the engine thread is running (health checks of the replica read this)."""
        return self._thread is not None and self._thread.is_alive()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop after the current iteration; every unfinished request fails with EngineShutdown."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is None:
            self._fail_unfinished()
        elif self._thread is not threading.current_thread():
            self._thread.join(timeout)  # the thread fails what is unfinished on its way out

    def step(self) -> StepBatch:
        """One iteration on the calling thread (for tests and embedding); returns the plan it ran."""
        if self._thread is not None:
            raise RuntimeError("step() drives an engine without its thread; this one was start()ed.")
        return self._iterate()

    def boundary(self) -> None:
        """Apply cancellations and admit arrivals now, without a forward: a driver that steps several
        engines on one thread (pipeline.denoise.colocated) calls it on the engines it does not step."""
        if self._thread is not None:
            raise RuntimeError("boundary() is for an engine without its thread; this one was start()ed.")
        self._boundary()

    def tell_waiting(self) -> None:
        """Tell each request waiting for its first step its place, at an iteration this engine did not run:
        a driver that steps several engines on one thread (pipeline.denoise.colocated) calls it on the
        engines it did not step, so their waiting requests hear the work before them too."""
        if self._thread is not None:
            raise RuntimeError("tell_waiting() is for an engine without its thread; this one was start()ed.")
        self._report_waiting(StepBatch.make_empty(self.expert))

    def fail_live(self, error: BaseException) -> None:
        """Fail every admitted request after an iteration crashed (a bug, not one request's fault)."""
        for request_id in list(self._live):
            self._fail(request_id, f"the engine iteration crashed: {error!r}", error)

    def stats(self) -> EngineStats:
        with self._lock:
            queued = Counter(self._published_queue)
            queued.update(item.bucket for item in self._inbox.values())
            token_steps = self._published_token_steps + sum(
                self._num_tokens(item.bucket)
                * (2 if item.request.guidance > 1.0 else 1)
                * len(item.timesteps)
                for item in self._inbox.values()
            )
            recent = list(self._recent)
            busy = sum(seconds for seconds, _, _ in recent)
            num_tokens = sum(tokens for _, _, tokens in recent)
            return EngineStats(
                expert=self.expert,
                num_queued_by_bucket=dict(queued),
                num_waiting=sum(queued.values()) - self._published_running,
                num_running=self._published_running,
                num_iterations=self._counts["iterations"],
                num_forwards=self._counts["forwards"],
                num_rows=self._counts["rows"],
                num_cached_steps=self._counts["cached_steps"],
                num_cache_bytes=self._published_cache[0],
                max_cache_bytes=self._published_cache[1],
                num_finished=self._counts["finished"],
                num_cancelled=self._counts["cancelled"],
                num_failed=self._counts["failed"],
                batch_size_histogram=dict(sorted(self._histogram.items())),
                mean_batch_size=sum(size for _, size, _ in recent) / len(recent) if recent else 0.0,
                mean_num_tokens=sum(tokens for _, _, tokens in recent) / len(recent) if recent else 0.0,
                max_num_tokens=self.scheduler.max_num_tokens,
                iterations_per_second=len(recent) / busy if busy > 0 else 0.0,
                num_adapter_switches=self.adapters.num_switches if self.adapters is not None else 0,
                forwards_by_adapters=dict(self._forwards_by_adapters),
                num_queued_token_steps=token_steps,
                seconds_per_token=busy / num_tokens if num_tokens > 0 else 0.0,
            )

    def work_before(self, urgency: tuple) -> tuple[int, float | None]:
        """(live requests more urgent than `urgency`, seconds of their queued token-steps at this replica's
        measured seconds per token: 0.0 when none is ahead, None when some are but nothing was measured).
        Engine thread only (it reads the planner)."""
        num_ahead, token_steps = self.scheduler.work_before(urgency)
        if token_steps == 0:
            return num_ahead, 0.0
        rate = self._seconds_per_token()
        return num_ahead, None if rate is None else token_steps * rate

    def _seconds_per_token(self) -> float | None:
        """Wall seconds per token over the recent iterations (None before one that sent tokens)."""
        with self._lock:
            busy = sum(seconds for seconds, _, _ in self._recent)
            num_tokens = sum(tokens for _, _, tokens in self._recent)
        return busy / num_tokens if num_tokens > 0 else None

    def seconds_per_step(
        self, bucket: Bucket, quality: str = "final", request_id: str | None = None
    ) -> float | None:
        """What one more step of a request costs on this replica now: the mean wall seconds of the last
        iterations `request_id` took part in (a caching request's skipped steps counted as it ran them:
        cheap alone, a whole batch's forward inside one), else of the last iterations of this (bucket,
        tier); None before the first."""
        with self._lock:
            recent = self._request_seconds.get(request_id) if request_id is not None else None
            recent = recent or self._step_seconds.get((tuple(bucket), quality))
            return sum(recent) / len(recent) if recent else None

    # ---- the three verbs -----------------------------------------------------------------------------

    def schedule(self) -> StepBatch:
        return self.scheduler.schedule()

    @torch.inference_mode()
    def run(self, plan: StepBatch) -> StepOutput:
        """ONE forward for the whole plan; if it raises, members are retried alone to find the culprit."""
        inputs = [self._guided_input(request_id) for request_id in plan.request_ids]
        label = adapter_label(plan.adapters)
        try:
            return self._forward_members(plan, plan.request_ids, inputs, label)
        except ShardGroupError:
            raise  # the rank group is broken, not one request: retrying would wait out more timeouts
        except Exception as error:
            if len(inputs) == 1:
                return StepOutput(errors={plan.request_ids[0]: error})
            logger.warning(
                "%s engine: batched forward of %d failed (%r); retrying one by one",
                self.expert,
                len(inputs),
                error,
            )
        output = StepOutput()
        for request_id, item in zip(plan.request_ids, inputs, strict=True):
            try:
                alone = self._forward_members(plan, [request_id], [item], label)
                output.noise.update(alone.noise)
            except ShardGroupError:
                raise
            except Exception as error:
                output.errors[request_id] = error
        return output

    @torch.inference_mode()
    def update(self, plan: StepBatch, output: StepOutput) -> None:
        """Step each member's solver; release the finished, fail the broken, report progress."""
        for request_id in plan.request_ids:
            if request_id in output.errors:
                error = output.errors[request_id]
                self._fail(request_id, f"its forward raised {type(error).__name__}: {error}", error)
                continue
            try:
                self._advance(request_id, output.noise[request_id])
            except Exception as error:
                self._fail(request_id, f"{type(error).__name__}: {error}", error)

    # ---- iteration internals -----------------------------------------------------------------------

    def _iterate(self) -> StepBatch:
        self._boundary()
        self._decide_skips()
        plan = self.schedule()
        self._report_waiting(plan)
        if plan.is_empty:
            return plan
        started = time.perf_counter()
        output = self.run(plan)
        synchronize(self.device)  # CUDA returns once kernels are queued: the step time must include them
        seconds = time.perf_counter() - started
        with self._lock:  # before update(): its progress reports read the step time this included
            window = self._step_seconds.setdefault(
                (plan.bucket, plan.quality), deque(maxlen=STEP_TIME_WINDOW)
            )
            window.append(seconds)
            for request_id in plan.request_ids:
                own = self._request_seconds.setdefault(request_id, deque(maxlen=STEP_TIME_WINDOW))
                own.append(seconds)
        self.update(plan, output)
        with self._lock:
            self._counts["iterations"] += 1
            self._histogram[plan.num_requests] += 1
            self._recent.append((time.perf_counter() - started, plan.num_requests, plan.num_tokens))
        self._publish()
        return plan

    def _serve_forever(self) -> None:
        while self._wait_for_work():
            try:
                self._iterate()
            except Exception as error:  # a bug, not one request's fault: fail what is live, keep serving
                logger.exception("%s engine iteration crashed", self.expert)
                self.fail_live(error)
        self._fail_unfinished()

    def _fail_unfinished(self) -> None:
        """After shutdown: fail what is still queued or live (on the thread that owns `_live`)."""
        with self._lock:
            pending, self._inbox = list(self._inbox.values()), {}
        for item in pending:
            request_id = item.request.request_id
            self._resolve(request_id, item.future, self._shutdown_error(request_id), "failed")
        for request_id in list(self._live):
            self._finish(request_id, RequestStatus.FAILED, self._shutdown_error(request_id))
        self._publish()

    def _wait_for_work(self) -> bool:
        with self._lock:
            while not (self._stopping or self._inbox or self._cancel_requested or self._live):
                self._lock.wait()
            return not self._stopping

    def _boundary(self) -> None:
        """Apply cancellations and admit new requests, between two forwards."""
        with self._lock:
            cancelled, self._cancel_requested = self._cancel_requested, set()
            dropped = [self._inbox.pop(request_id) for request_id in cancelled if request_id in self._inbox]
            arrived, self._inbox = list(self._inbox.values()), {}
        for item in dropped:
            request_id = item.request.request_id
            self._resolve(request_id, item.future, self._cancelled_error(request_id), "cancelled")
        for request_id in cancelled & self._live.keys():
            self._finish(request_id, RequestStatus.CANCELLED, self._cancelled_error(request_id))
        for item in arrived:
            try:
                self._admit(item)
            except Exception as error:
                request_id = item.request.request_id
                failure = RequestFailed(f"request {request_id!r} could not be admitted: {error!r}")
                self._resolve(request_id, item.future, failure, "failed")
        self._publish()

    def _admit(self, item: _Pending) -> None:
        request = item.request
        use_cfg = request.guidance > 1.0
        cond, uncond = pad_embeds([request.prompt, request.negative_prompt], self.max_sequence_length).to(
            self.device
        )
        live = _Live(
            request=request,
            future=item.future,
            solver=restore_solver(solver_for(self.solvers, request.quality), request.state, self.device),
            latents=request.state.latents.to(self.device),
            cond=cond,
            uncond=uncond if use_cfg else None,
            index=request.state.step_index,
            condition=None if request.condition is None else request.condition.to(self.device),
        )
        if request.cache is not None:
            live.cache = new_request_cache(
                request.cache,
                self.cache_curve,
                self.split,
                self._guided_input_of(live),
                request.state.num_steps,
            )
        self.scheduler.add(
            ScheduledRequest(
                request_id=request.request_id,
                bucket=item.bucket,
                priority=request.priority,
                arrival_time=item.arrival_time,
                deadline=request.deadline,
                num_tokens=self._num_tokens(item.bucket) * (2 if use_cfg else 1),
                guidance=request.guidance,
                timesteps=item.timesteps,
                num_steps_total=len(item.timesteps),
                quality=request.quality,
                adapters=item.adapters,
            )
        )
        self._live[request.request_id] = live  # only once the planner took it, so a failure leaks nothing

    def _decide_skips(self) -> None:
        """Each caching request's decision for its next step, told to the planner (it costs no tokens)."""
        for request_id, live in self._live.items():
            if live.cache is not None:
                live.decision = live.cache.decide(live.index)
                self.scheduler.requests[request_id].skips_next = live.decision.skip

    def _report_waiting(self, plan: StepBatch) -> None:
        """Tell each request left waiting before its first step its place in the queue (with the work
        before it and its own step time), when the place changed or a figure became measured."""
        for request_id, num_ahead in self.scheduler.num_ahead(plan).items():
            live = self._live[request_id]
            if live.request.on_waiting is None:
                continue
            place = self._place(request_id, num_ahead)
            if live.place is not None and live.place.told == place.told:
                continue
            live.place = place
            try:
                live.request.on_waiting(place)
            except Exception as error:
                self._fail(request_id, f"{type(error).__name__}: {error}", error)

    def _place(self, request_id: str, num_ahead: int) -> QueuePlace:
        """The queue place of waiting `request_id`: the work of the `num_ahead` requests more urgent than
        it (StepScheduler.num_ahead's order, so the same ones) and its own step time, as measured here."""
        scheduled = self.scheduler.requests[request_id]
        _, seconds_ahead = self.work_before(scheduled.urgency)
        seconds_per_step = self.seconds_per_step(scheduled.bucket, scheduled.quality)
        if seconds_per_step is None and (rate := self._seconds_per_token()) is not None:
            seconds_per_step = scheduled.num_tokens * rate
        return QueuePlace(num_ahead, seconds_ahead, seconds_per_step)

    def _guided_input(self, request_id: str) -> GuidedInput:
        return self._guided_input_of(self._live[request_id])

    def _guided_input_of(self, live: _Live) -> GuidedInput:
        return GuidedInput(
            latents=live.latents,
            timestep=live.solver.timesteps[live.index],
            cond=live.cond,
            uncond=live.uncond,
            guidance=live.request.guidance,
            condition=live.condition,
        )

    def _forward_members(
        self, plan: StepBatch, request_ids: list[str], inputs: list[GuidedInput], label: str
    ) -> StepOutput:
        """One forward for these members of `plan` through the runner; `label` names the adapter set it
        runs with (forwards per adapter set)."""
        members = []
        for request_id, item in zip(request_ids, inputs, strict=True):
            live = self._live[request_id]
            reuse = live.cache is not None and live.decision is not None and live.decision.skip
            keep = live.cache is not None and not reuse
            members.append(PlannedRequest(request_id, item.uncond is not None, reuse=reuse, keep=keep))
        step = StepPlan(expert=self.expert, adapters=plan.adapters, members=tuple(members))
        with self._lock:
            self._counts["forwards"] += step.num_computed_rows > 0
            self._counts["rows"] += step.num_computed_rows
            self._forwards_by_adapters[label] += step.num_computed_rows > 0
        return StepOutput(noise=dict(zip(request_ids, self.runner.run(step, inputs), strict=True)))

    def _advance(self, request_id: str, noise: torch.Tensor) -> None:
        live = self._live[request_id]
        t = live.solver.timesteps[live.index]
        latents = live.solver.step(noise[None], t, live.latents[None], return_dict=False)[0][0]
        if not bool(torch.isfinite(latents).all()):
            raise FloatingPointError(f"latents are not finite after the step at t={int(t)}")
        if live.cache is not None:
            live.cache.commit(live.decision)
            if live.decision.skip:
                with self._lock:
                    self._counts["cached_steps"] += 1
        live.latents = latents
        live.index += 1
        done = self.scheduler.advance(request_id)
        if live.request.on_progress is not None:
            planned = self.scheduler.requests[request_id]
            live.request.on_progress(planned.num_steps_done, planned.num_steps_total)
        if done:
            state = DenoiseState(
                latents=latents.cpu(),
                num_steps=live.request.state.num_steps,
                history=capture_history(live.solver),
            )
            self._finish(request_id, RequestStatus.FINISHED, state)

    def _fail(self, request_id: str, why: str, cause: BaseException) -> None:
        error = RequestFailed(f"request {request_id!r} failed in the {self.expert} engine: {why}")
        error.__cause__ = cause
        traceback.clear_frames(cause.__traceback__)  # finished frames would hold its tensors while it lives
        logger.warning("%s", error)
        self._finish(request_id, RequestStatus.FAILED, error)

    def _finish(self, request_id: str, status: RequestStatus, outcome: DenoiseState | BaseException) -> None:
        """Drop the request's tensors and planner entry, then resolve its future."""
        live = self._live.pop(request_id)
        if live.cache is not None:  # every rank drops its residual shares now, whatever happens next
            live.cache = None
            self.runner.release([request_id], self.expert)
        if request_id in self.scheduler:
            self.scheduler.remove(request_id).status = status
        self._resolve(request_id, live.future, outcome, status.name.lower())

    def _resolve(
        self, request_id: str, future: Future, outcome: DenoiseState | BaseException, count: str = "finished"
    ) -> None:
        with self._lock:
            self._known.discard(request_id)
            self._request_seconds.pop(request_id, None)
            self._counts[count] += 1
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def _publish(self) -> None:
        queue = self.scheduler.num_requests_by_bucket()
        running = sum(request.status == RequestStatus.RUNNING for request in self.scheduler.requests.values())
        caches = [live.cache for live in self._live.values() if live.cache is not None]
        held, bound = self.store.nbytes, sum(cache.max_bytes for cache in caches)
        if held > bound:  # one residual per caching request, dropped with it: anything more is a leak
            raise RuntimeError(f"the {self.expert} engine's step caches hold {held} bytes, over {bound}.")
        token_steps = sum(
            request.num_tokens * len(request.timesteps) for request in self.scheduler.requests.values()
        )
        with self._lock:
            self._published_queue, self._published_running = queue, running
            self._published_cache = (held, bound)
            self._published_token_steps = token_steps

    # ---- helpers ---------------------------------------------------------------------------------------

    def _shutdown_error(self, request_id: str) -> EngineShutdown:
        return EngineShutdown(f"the {self.expert} engine shut down before request {request_id!r} finished.")

    def _cancelled_error(self, request_id: str) -> RequestCancelled:
        return RequestCancelled(f"request {request_id!r} was cancelled in the {self.expert} engine.")

    def _num_tokens(self, bucket: Bucket) -> int:
        """Transformer tokens of one sample of this latent shape (before CFG doubling)."""
        return num_video_tokens(bucket, self.transformer.config.patch_size)

    def _owned_timesteps(self, state: DenoiseState, quality: str) -> list[int]:
        """The contiguous run of this expert's timesteps from where `state` stands."""
        schedule = self._schedules.get((quality, state.num_steps))
        if schedule is None:
            template = solver_for(self.solvers, quality)
            solver = new_solver(template, state.num_steps, torch.device("cpu"))
            schedule = self._schedules[quality, state.num_steps] = [int(t) for t in solver.timesteps]
        upcoming = schedule[state.step_index :]
        owned = lambda t: expert_for(t, self.boundary_timestep) == self.expert  # noqa: E731
        return list(itertools.takewhile(owned, upcoming))

    def _validate(self, request: EngineRequest) -> None:
        """Reject malformed requests at submit, naming the field, before they can join a batch."""
        config, name = self.transformer.config, f"request {request.request_id!r}"
        shape = tuple(request.state.latents.shape)
        pt, ph, pw = config.patch_size
        if (
            len(shape) != 4
            or shape[0] != config.out_channels
            or shape[1] % pt
            or shape[2] % ph
            or shape[3] % pw
        ):
            raise ValueError(
                f"{name}: `state.latents` must be (channels={config.out_channels}, frames, height, width), "
                f"frames/height/width divisible by the patch size {tuple(config.patch_size)}, but is {shape}."
            )
        self._validate_condition(request, name, shape)
        for field_name, prompt in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
            rows, dim = prompt.embeds.shape if prompt.embeds.ndim == 2 else (-1, -1)
            if dim != config.text_dim or not 0 < rows <= self.max_sequence_length:
                raise ValueError(
                    f"{name}: `{field_name}` embeddings must be (1..{self.max_sequence_length}, "
                    f"{config.text_dim}) but are {tuple(prompt.embeds.shape)}."
                )
        if request.quality not in self.solvers:
            raise ValueError(
                f"{name}: `quality` must be one of {', '.join(sorted(self.solvers))} but is "
                f"{request.quality!r}."
            )
        if request.adapters != tuple(sorted(request.adapters)):
            raise ValueError(f"{name}: `adapters` must be sorted by name but are {request.adapters!r}.")
        if request.cache is not None and self.cache_curve is None:
            raise ValueError(
                f"{name}: `cache` needs the expert's magnitude curve, and this engine was built without "
                "`cache_curve`."
            )
        if request.priority not in PRIORITY_RANK:
            raise ValueError(
                f"{name}: `priority` must be 'interactive' or 'batch' but is {request.priority!r}."
            )

    def _validate_condition(self, request: EngineRequest, name: str, shape: tuple[int, ...]) -> None:
        """An I2V expert (more input than output channels) needs each request's condition, shaped like its
        latents with the extra channels; a T2V expert takes none."""
        config = self.transformer.config
        extra = config.in_channels - config.out_channels
        condition = request.condition
        if extra == 0:
            if condition is not None:
                raise ValueError(
                    f"{name}: the {self.expert} expert is text-to-video and takes no `condition` (keyframes "
                    "need the image-to-video model)."
                )
            return
        expected = (extra, *shape[1:])
        if condition is None:
            raise ValueError(
                f"{name}: the {self.expert} expert is image-to-video and needs a `condition` {expected} "
                "(the keyframes' latents and mask: pipeline.vae_encode)."
            )
        if tuple(condition.shape) != expected:
            raise ValueError(
                f"{name}: `condition` must be {expected} for latents {shape} but is {tuple(condition.shape)}."
            )

    def _effective_adapters(self, request: EngineRequest) -> AdapterSet:
        """The request's adapters this expert has weights for; ValueError naming an unknown one."""
        if not request.adapters:
            return ()
        if self.adapters is None:
            names = ", ".join(name for name, _ in request.adapters)
            raise ValueError(
                f"request {request.request_id!r}: the {self.expert} engine has no LoRA adapters loaded "
                f"but the request needs {names}."
            )
        return self.adapters.effective(request.adapters)
