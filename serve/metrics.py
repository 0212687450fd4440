"""Every Previz metric, declared in one place: Ray's metrics pipeline (`ray.util.metrics`) carries them to
each node's metrics agent, which Prometheus scrapes (targets from Ray's service discovery file).

Names carry their unit (`_seconds`, `_bytes`, `_total`, `_ratio`). Ray 2.60 exports a user metric
`previz_x` as `ray_previz_x` (see EXPORTED_PREFIX); dashboards and alert rules use the exported names.

Metric objects are per process and made on first use (`metrics()`), so importing this module in a
driver without Ray costs nothing. Recording helpers take plain values and never raise into the caller's
hot path: a metrics bug must not fail a job.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

from pipeline.priority import PRIORITIES
from serve.jobs.request import Bucket

logger = logging.getLogger("ray.serve")

EXPORTED_PREFIX = "ray_"  # Ray 2.60 prefixes user metrics on export: previz_x -> ray_previz_x
# Seconds; up to 30 minutes (a 720p job on one GPU takes ~17 min of denoising alone).
LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1200, 1800]
BATCH_SIZE_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
REPORT_INTERVAL_S = 2.0  # replica-side sampling of engine and GPU state
# Only recorded where a GPU exists: absent from a CPU-only cluster's Prometheus, by design.
RUNNING_STATUS_NAMES = ("encoding", "denoising_high", "denoising_low", "decoding", "upscaling", "finishing")
GPU_ONLY_METRICS = ("previz_gpu_utilization_ratio", "previz_gpu_memory_used_bytes")
# Counters that exist only after their first event (a webhook sent, a prompt or clip refused).
FIRST_EVENT_METRICS = (
    "previz_cuts_finished_total",  # none before a cut run ended
    "previz_cut_render_seconds",
    "previz_webhook_deliveries_total",
    "previz_safety_blocks_total",
    "previz_engine_adapter_switches_total",  # none before two adapter sets met in one engine
    "previz_routing_decisions_total",  # none before a bucketed call met two denoiser replicas
)


@dataclass(frozen=True, slots=True)
class PrevizMetrics:
    # ---- jobs (Scheduler, Housekeeping) ----
    # These, the cuts, the lanes and the webhook deliveries carry `application`, the Serve app they come from.
    jobs: Gauge  # jobs not yet finished, by status and project (refreshed from the job store)
    jobs_stored: Gauge  # all jobs in the store by status, finished ones included
    jobs_finished_total: Counter  # terminal transitions seen by this scheduler
    queue_jobs: Gauge  # queued jobs per priority and bucket
    queue_oldest_age_seconds: Gauge  # age of the oldest queued job per priority and bucket
    job_stalled_seconds: Gauge  # per running status: longest time any job in it has gone without progress
    queue_wait_seconds: Histogram  # created -> first claimed
    job_seconds: Histogram  # created -> succeeded (what a director waits)
    stage_seconds: Histogram  # per-stage compute time, from the timings the scheduler records
    job_compute_seconds_total: Counter  # summed stage seconds per project: usage and fair share
    scheduler_passes_total: Counter  # scheduling passes by outcome; errors are mostly job-store (disk) errors
    # ---- cuts (Scheduler, Housekeeping) ----
    cuts: Gauge  # cut jobs queued | running (refreshed from the job store)
    cuts_finished_total: Counter  # cut runs that ended, by outcome and project
    cut_render_seconds: Histogram  # one recorded cut's render on its Finisher replica
    # ---- stages (deployments) ----
    denoise_iterations_total: Counter
    denoise_batch_size: Histogram  # requests per engine iteration
    denoise_tokens_per_iteration: Gauge  # mean over the engine's recent window, CFG rows included
    denoise_iterations_per_second: Gauge
    engine_occupancy_ratio: Gauge  # mean tokens per iteration / token budget
    engine_requests: Gauge  # waiting | running requests in one engine
    engine_queue_requests: Gauge  # unfinished requests per bucket in one engine
    engine_requests_finished_total: Counter  # by outcome: finished | cancelled | failed
    engine_adapter_switches_total: Counter  # LoRA adapter-set changes between forwards
    engine_forwards_total: Counter  # transformer forwards by adapter set (`base`, `distill+noir@0.8`)
    denoise_rows_total: Counter  # rows through the transformer blocks (cached steps send none)
    denoise_cached_steps_total: Counter  # request steps served from a step cache
    step_cache_bytes: Gauge  # held | bound: the live requests' step-cache residuals and their bound
    engine_queued_work: Gauge  # unit token_steps | seconds: the load the router and autoscaler read
    routing_decisions_total: Counter  # denoiser calls by affinity kept | given_up, application, deployment
    # ---- lanes (Scheduler) ----
    lane_jobs: Gauge  # per lane: state in_flight | reserved | free (admission waits: queue_wait_seconds)
    text_embedding_cache_hits_total: Counter
    text_embedding_cache_misses_total: Counter
    artifact_bytes_written_total: Counter
    artifact_store_operations_total: Counter  # by outcome ok | error: disk or S3 trouble shows here
    webhook_deliveries_total: Counter  # per attempt, by outcome delivered | failed (retried) | gave_up
    safety_blocks_total: Counter  # content refused, by stage (prompt | frames) and policy category
    decode_plans_total: (
        Counter  # decodes by how they ran: mode full | tiled, dtype, decoder vae | fast, ranks
    )
    decode_seconds: Histogram  # one decode's wall time, latents in, uint8 frames on the host out
    decode_memory_bytes: Gauge  # the last decode's kind=estimate (planned peak) and kind=budget (free/bound)
    gpu_utilization_ratio: Gauge  # per replica, only where a GPU exists
    gpu_memory_used_bytes: Gauge


def serve_application() -> str:
    """The Serve application of the calling replica ("none" outside one, as in a test's Scheduler): the
    `application` label of the metrics the Scheduler and Housekeeping publish."""
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:
        return "none"


@functools.cache
def metrics() -> PrevizMetrics:
    """This process's metric objects (Ray registers them with the local metrics agent on first record)."""
    replica = ("deployment", "replica")
    # The Scheduler's and Housekeeping's metrics (one of each per Serve app) carry the app they run in, named
    # as in Ray Serve's own metrics, so two apps on one Ray cluster count apart.
    app = ("application",)
    in_app = {"application": serve_application()}
    return PrevizMetrics(
        jobs=Gauge(
            "previz_jobs", "Unfinished jobs by status and project.", tag_keys=("status", "project", *app)
        ).set_default_tags(in_app),
        jobs_stored=Gauge(
            "previz_jobs_stored", "All jobs in the job store by status.", tag_keys=("status", *app)
        ).set_default_tags(in_app),
        jobs_finished_total=Counter(
            "previz_jobs_finished_total",
            "Jobs that reached a terminal status.",
            tag_keys=("status", "project", "priority", "resolution", *app),
        ).set_default_tags(in_app),
        queue_jobs=Gauge(
            "previz_queue_jobs", "Queued jobs.", tag_keys=("priority", "bucket", *app)
        ).set_default_tags(in_app),
        queue_oldest_age_seconds=Gauge(
            "previz_queue_oldest_age_seconds",
            "Age of the oldest queued job.",
            tag_keys=("priority", "bucket", *app),
        ).set_default_tags(in_app),
        job_stalled_seconds=Gauge(
            "previz_job_stalled_seconds",
            "Longest time a running job in this status has gone without a progress update.",
            tag_keys=("status", *app),
        ).set_default_tags(in_app),
        queue_wait_seconds=Histogram(
            "previz_queue_wait_seconds",
            "Seconds from job creation to its first claim by the scheduler.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("priority", "resolution", "project", *app),
        ).set_default_tags(in_app),
        job_seconds=Histogram(
            "previz_job_seconds",
            "Seconds from job creation to success (queue wait included).",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("priority", "resolution", *app),
        ).set_default_tags(in_app),
        stage_seconds=Histogram(
            "previz_stage_seconds",
            "Compute seconds of one pipeline stage for one job.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("stage", "resolution", *app),
        ).set_default_tags(in_app),
        job_compute_seconds_total=Counter(
            "previz_job_compute_seconds_total",
            "Stage seconds spent on succeeded jobs, per project.",
            tag_keys=("project", *app),
        ).set_default_tags(in_app),
        scheduler_passes_total=Counter(
            "previz_scheduler_passes_total", "Scheduling passes by outcome.", tag_keys=("outcome", *app)
        ).set_default_tags(in_app),
        cuts=Gauge(
            "previz_cuts", "Cut jobs queued or running (status).", tag_keys=("status", *app)
        ).set_default_tags(in_app),
        cuts_finished_total=Counter(
            "previz_cuts_finished_total",
            "Cut runs the Scheduler ended, by outcome: succeeded | failed | cancelled | requeued (its "
            "Finisher replica was lost) | superseded (a newer run or a restart owns the cut).",
            tag_keys=("outcome", "project", *app),
        ).set_default_tags(in_app),
        cut_render_seconds=Histogram(
            "previz_cut_render_seconds",
            "Seconds a Finisher replica took to render a cut that became its board's cut.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=app,
        ).set_default_tags(in_app),
        denoise_iterations_total=Counter(
            "previz_denoise_iterations_total", "Denoiser engine iterations.", tag_keys=("expert", *replica)
        ),
        denoise_batch_size=Histogram(
            "previz_denoise_batch_size",
            "Requests per denoiser engine iteration.",
            boundaries=BATCH_SIZE_BUCKETS,
            tag_keys=("expert", *replica),
        ),
        denoise_tokens_per_iteration=Gauge(
            "previz_denoise_tokens_per_iteration",
            "Mean tokens per engine iteration over the recent window (CFG rows included).",
            tag_keys=("expert", *replica),
        ),
        denoise_iterations_per_second=Gauge(
            "previz_denoise_iterations_per_second",
            "Engine iterations per second of busy time.",
            tag_keys=("expert", *replica),
        ),
        engine_occupancy_ratio=Gauge(
            "previz_engine_occupancy_ratio",
            "Mean tokens per iteration over the engine's token budget.",
            tag_keys=("expert", *replica),
        ),
        engine_requests=Gauge(
            "previz_engine_requests", "Requests inside one engine.", tag_keys=("expert", "state", *replica)
        ),
        engine_queue_requests=Gauge(
            "previz_engine_queue_requests",
            "Unfinished requests per bucket inside one engine.",
            tag_keys=("expert", "bucket", *replica),
        ),
        engine_queued_work=Gauge(
            "previz_engine_queued_work",
            "Queued work in one engine: unit=token_steps (tokens x steps left) or seconds (at its rate).",
            tag_keys=("expert", "unit", *replica),
        ),
        routing_decisions_total=Counter(
            "previz_routing_decisions_total",
            "Denoiser calls routed: affinity=kept (the bucket's replica) or given_up (over the load bound), "
            "by the Serve application and deployment they were routed to.",
            tag_keys=("affinity", "application", "deployment"),
        ),
        lane_jobs=Gauge(
            "previz_lane_jobs",
            "Lanes (priority classes): state=in_flight jobs, reserved slots, free slots it can take.",
            tag_keys=("lane", "state", *app),
        ).set_default_tags(in_app),
        engine_requests_finished_total=Counter(
            "previz_engine_requests_finished_total",
            "Requests an engine released, by outcome.",
            tag_keys=("expert", "outcome", *replica),
        ),
        engine_adapter_switches_total=Counter(
            "previz_engine_adapter_switches_total",
            "LoRA adapter-set changes between an engine's forwards (set_adapters or disable_lora).",
            tag_keys=("expert", *replica),
        ),
        engine_forwards_total=Counter(
            "previz_engine_forwards_total",
            "Transformer forwards of an engine, by the LoRA adapter set they ran with.",
            tag_keys=("expert", "adapters", *replica),
        ),
        denoise_rows_total=Counter(
            "previz_denoise_rows_total",
            "Rows (cond + uncond) the engine sent through the transformer blocks.",
            tag_keys=("expert", *replica),
        ),
        denoise_cached_steps_total=Counter(
            "previz_denoise_cached_steps_total",
            "Request steps served from a step cache instead of the transformer blocks.",
            tag_keys=("expert", *replica),
        ),
        step_cache_bytes=Gauge(
            "previz_step_cache_bytes",
            "Bytes of step-cache residuals the engine's live requests hold (state=held) and their bound "
            "(state=bound, one residual per caching request).",
            tag_keys=("expert", "state", *replica),
        ),
        text_embedding_cache_hits_total=Counter(
            "previz_text_embedding_cache_hits_total",
            "Prompts served from the embedding cache.",
            tag_keys=replica,
        ),
        text_embedding_cache_misses_total=Counter(
            "previz_text_embedding_cache_misses_total",
            "Prompts run through the text encoder.",
            tag_keys=replica,
        ),
        artifact_bytes_written_total=Counter(
            "previz_artifact_bytes_written_total",
            "Bytes stored in the artifact store.",
            tag_keys=("backend", "kind"),
        ),
        artifact_store_operations_total=Counter(
            "previz_artifact_store_operations_total",
            "Artifact store writes by outcome.",
            tag_keys=("backend", "outcome"),
        ),
        webhook_deliveries_total=Counter(
            "previz_webhook_deliveries_total", "Webhook deliveries by outcome.", tag_keys=("outcome", *app)
        ).set_default_tags(in_app),
        safety_blocks_total=Counter(
            "previz_safety_blocks_total",
            "Prompts (stage=prompt) and finished clips (stage=frames) refused by the content policy.",
            tag_keys=("stage", "category"),
        ),
        decode_plans_total=Counter(
            "previz_decode_plans_total",
            "VAE decodes by how they ran: full frames or spatial tiles (memory bound), dtype and decoder.",
            tag_keys=("mode", "dtype", "decoder", "ranks", *replica),
        ),
        decode_seconds=Histogram(
            "previz_decode_seconds",
            "Seconds of one VAE decode (latents in, uint8 frames on the host out) by decoder, mode, ranks.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("decoder", "mode", "ranks", *replica),
        ),
        decode_memory_bytes=Gauge(
            "previz_decode_memory_bytes",
            "The last decode's planned peak device memory (kind=estimate) and what it had (kind=budget).",
            tag_keys=("kind", *replica),
        ),
        gpu_utilization_ratio=Gauge(
            "previz_gpu_utilization_ratio",
            "GPU utilisation (0-1) seen by a replica.",
            tag_keys=("device", *replica),
        ),
        gpu_memory_used_bytes=Gauge(
            "previz_gpu_memory_used_bytes",
            "GPU memory reserved by a replica's process.",
            tag_keys=("device", *replica),
        ),
    )


def _safely(record: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(record)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            record(*args, **kwargs)
        except Exception:
            logger.warning("recording metrics in %s failed", record.__name__, exc_info=True)

    return wrapper


def resolution_of(bucket: str) -> str:
    """ "832x480x81" -> "832x480": the dashboards' latency-by-resolution label (bounded cardinality)."""
    try:
        return Bucket.parse(bucket).size
    except ValueError:
        return bucket


# ---- Scheduler side ----------------------------------------------------------------------------------


@_safely
def record_job_claimed(job: Any, now: datetime | None = None) -> None:
    """A job left the queue; its wait counts once, on the first attempt."""
    if job.attempt != 1:
        return
    now = now or datetime.now(UTC)
    tags = {"priority": str(job.priority), "resolution": resolution_of(job.bucket), "project": job.project}
    metrics().queue_wait_seconds.observe(max((now - job.created_at).total_seconds(), 0.0), tags=tags)


@_safely
def record_job_finished(job: Any, status: str, timings: dict[str, float] | None = None) -> None:
    """A terminal transition this scheduler made: counts it; on success, end-to-end and per-stage latency."""
    m = metrics()
    resolution = resolution_of(job.bucket)
    tags = {"status": status, "project": job.project, "priority": str(job.priority), "resolution": resolution}
    m.jobs_finished_total.inc(1, tags=tags)
    if status != "succeeded":
        return
    seconds = (datetime.now(UTC) - job.created_at).total_seconds()
    m.job_seconds.observe(max(seconds, 0.0), tags={"priority": str(job.priority), "resolution": resolution})
    for stage, stage_seconds in (timings or {}).items():
        m.stage_seconds.observe(stage_seconds, tags={"stage": stage, "resolution": resolution})
    compute = sum((timings or {}).values())
    if compute > 0:
        m.job_compute_seconds_total.inc(compute, tags={"project": job.project})


@_safely
def record_routing_decision(kept: bool, application: str, deployment: str) -> None:
    """One denoiser call routed by the bounded-load router of a handle to `application`'s `deployment`."""
    tags = {"affinity": "kept" if kept else "given_up", "application": application, "deployment": deployment}
    metrics().routing_decisions_total.inc(tags=tags)


@_safely
def record_lanes(in_flight: dict[str, int], reserved: dict[str, int], free: dict[str, int]) -> None:
    """Per lane (every priority, so an idle lane reads 0): jobs in flight, reserved slots, free slots."""
    for lane in PRIORITIES:
        for state, values in (("in_flight", in_flight), ("reserved", reserved), ("free", free)):
            metrics().lane_jobs.set(values.get(lane, 0), tags={"lane": lane, "state": state})


def record_scheduler_pass(ok: bool) -> None:
    metrics().scheduler_passes_total.inc(1, tags={"outcome": "ok" if ok else "error"})


CUT_OUTCOMES = ("succeeded", "failed", "cancelled", "requeued", "superseded")
CUT_STATUSES = ("queued", "running")


@_safely
def record_cut_finished(project: str, outcome: str, render_seconds: float | None = None) -> None:
    """A cut run ended (`outcome`, one of CUT_OUTCOMES); a cut that succeeded also records its render."""
    if outcome not in CUT_OUTCOMES:
        raise ValueError(f"`outcome` must be one of {CUT_OUTCOMES} but is {outcome!r}.")
    m = metrics()
    m.cuts_finished_total.inc(1, tags={"outcome": outcome, "project": project})
    if render_seconds is not None:
        m.cut_render_seconds.observe(max(render_seconds, 0.0))


class StaleZeroingGauge:
    """Sets a gauge for the tag sets seen now and back to 0 for those seen before but gone since (Ray keeps
    a gauge's last value per tag set forever). `baseline` tag sets are always published (0 when absent),
    so a panel shows 0 instead of "no data" on an idle cluster."""

    def __init__(
        self, gauge: Callable[[], Gauge], baseline: Iterable[tuple[tuple[str, str], ...]] = ()
    ) -> None:
        self._gauge = gauge
        self._seen: set[tuple[tuple[str, str], ...]] = set(baseline)

    def publish(self, values: dict[tuple[tuple[str, str], ...], float]) -> None:
        gauge = self._gauge()
        for key in self._seen - values.keys():
            gauge.set(0, tags=dict(key))
        for key, value in values.items():
            gauge.set(value, tags=dict(key))
        self._seen |= values.keys()


class QueueReporter:
    """Turns job-store snapshots into the jobs and queue gauges (the Scheduler calls it periodically)."""

    def __init__(self) -> None:
        # a baseline, so previz_jobs exists from the first refresh: tiny jobs can start and finish between two
        # refreshes and never be seen unfinished (the Studio overview's "Running now" then read "no data")
        self._jobs = StaleZeroingGauge(lambda: metrics().jobs, [(("status", "queued"), ("project", "none"))])
        self._stored = StaleZeroingGauge(lambda: metrics().jobs_stored)
        idle_queues = [(("priority", priority), ("bucket", "none")) for priority in PRIORITIES]
        self._depth = StaleZeroingGauge(lambda: metrics().queue_jobs, idle_queues)
        self._oldest = StaleZeroingGauge(lambda: metrics().queue_oldest_age_seconds, idle_queues)
        running = [(("status", status),) for status in RUNNING_STATUS_NAMES]
        self._stalled = StaleZeroingGauge(lambda: metrics().job_stalled_seconds, running)
        self._cuts = StaleZeroingGauge(
            lambda: metrics().cuts, [(("status", status),) for status in CUT_STATUSES]
        )

    @_safely
    def publish_cuts(self, counts: dict[str, int]) -> None:
        """`counts`: cut status -> cut jobs, of the unfinished ones (JobStore.count_unfinished_cuts())."""
        self._cuts.publish({(("status", status),): counts.get(status, 0) for status in CUT_STATUSES})

    @_safely
    def publish(self, counts: dict[Any, int], unfinished: Iterable[Any], now: datetime | None = None) -> None:
        """`counts`: status -> jobs (JobStore.count_by_status()); `unfinished`: records of queued and
        running jobs (status, project, priority, bucket, created_at)."""
        now = now or datetime.now(UTC)
        self._stored.publish({(("status", _status_name(status)),): count for status, count in counts.items()})
        by_status: dict[tuple, float] = {}
        depth: dict[tuple, float] = {}
        oldest: dict[tuple, float] = {}
        stalled: dict[tuple, float] = {}
        for job in unfinished:
            status = _status_name(job.status)
            key = (("status", status), ("project", job.project))
            by_status[key] = by_status.get(key, 0) + 1
            if status != "queued":
                since_update = max((now - job.updated_at).total_seconds(), 0.0)
                stalled[(("status", status),)] = max(stalled.get((("status", status),), 0.0), since_update)
            else:
                queue_key = (("priority", str(job.priority)), ("bucket", job.bucket))
                depth[queue_key] = depth.get(queue_key, 0) + 1
                age = max((now - job.created_at).total_seconds(), 0.0)
                oldest[queue_key] = max(oldest.get(queue_key, 0.0), age)
        self._jobs.publish(by_status)
        self._depth.publish(depth)
        self._oldest.publish(oldest)
        self._stalled.publish(stalled)


def _status_name(status: Any) -> str:
    return getattr(status, "name", str(status)).lower()


# ---- stage replicas ----------------------------------------------------------------------------------


def replica_tags() -> dict[str, str]:
    """{"deployment", "replica"} of the calling Serve replica (placeholders outside one)."""
    try:
        from ray import serve

        context = serve.get_replica_context()
        return {"deployment": context.deployment, "replica": context.replica_id.unique_id}
    except Exception:
        return {"deployment": "none", "replica": "none"}


class CacheReporter:
    """Counts text-embedding cache hits and misses from the encoder's running totals."""

    def __init__(self) -> None:
        self._tags = replica_tags()
        self._hits = 0
        self._misses = 0

    @_safely
    def publish(self, num_hits: int, num_misses: int) -> None:
        m = metrics()
        if num_hits > self._hits:
            m.text_embedding_cache_hits_total.inc(num_hits - self._hits, tags=self._tags)
        if num_misses > self._misses:
            m.text_embedding_cache_misses_total.inc(num_misses - self._misses, tags=self._tags)
        self._hits, self._misses = num_hits, num_misses


@_safely
def record_artifact_write(backend: str, kind: str, size_bytes: int | None, ok: bool) -> None:
    m = metrics()
    m.artifact_store_operations_total.inc(1, tags={"backend": backend, "outcome": "ok" if ok else "error"})
    if ok and size_bytes:
        m.artifact_bytes_written_total.inc(size_bytes, tags={"backend": backend, "kind": kind})


@_safely
def record_webhook_delivery(outcome: str) -> None:
    """One webhook attempt: `outcome` is delivered (2xx), failed (to be retried) or gave_up (the last one)."""
    metrics().webhook_deliveries_total.inc(1, tags={"outcome": outcome})


@_safely
def record_decode(
    mode: str,
    dtype: str,
    decoder: str,
    ranks: int,
    seconds: float,
    estimate_bytes: int | None,
    budget_bytes: int | None,
) -> None:
    """One decode in a VAEDecoder replica: how it ran (pipeline.vae_memory.DecodePlan; `ranks` 1, or the
    rank group it was split over), how long it took, and its memory (None: not planned, as for the fast
    decoder, whose memory is small)."""
    m, tags = metrics(), replica_tags()
    m.decode_plans_total.inc(
        1, tags={"mode": mode, "dtype": dtype, "decoder": decoder, "ranks": str(ranks), **tags}
    )
    m.decode_seconds.observe(seconds, tags={"decoder": decoder, "mode": mode, "ranks": str(ranks), **tags})
    if estimate_bytes is not None:
        m.decode_memory_bytes.set(estimate_bytes, tags={"kind": "estimate", **tags})
    if budget_bytes is not None:
        m.decode_memory_bytes.set(budget_bytes, tags={"kind": "budget", **tags})


@_safely
def record_safety_block(stage: str, category: str) -> None:
    """`stage` is prompt (the Ingress refused a request) | frames (the Finisher refused a clip) | keyframe
    (the Ingress refused a keyframe image, or the Scheduler a chained shot's frame)."""
    metrics().safety_blocks_total.inc(1, tags={"stage": stage, "category": category})


class ReplicaReporter:
    """A daemon thread in a stage replica: every REPORT_INTERVAL_S it turns the engine's stats (if the
    replica has an engine) and the GPU's state (if it has a GPU) into metrics. On CPU without an engine it
    does nothing and starts no thread."""

    def __init__(self, engine: Any = None, interval_s: float = REPORT_INTERVAL_S) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._tags = replica_tags()
        self._has_gpu = _cuda_available()
        self._stop = threading.Event()
        self._last_iterations = 0
        self._last_histogram: dict[int, int] = {}
        self._last_outcomes = {"finished": 0, "cancelled": 0, "failed": 0}
        self._last_switches = 0
        self._last_forwards: dict[str, int] = {}  # adapter set -> forwards reported
        self._last_counts = {"rows": 0, "cached_steps": 0}  # EngineStats.num_<name> last reported
        self._queue: StaleZeroingGauge | None = None  # made on the first report (needs the expert)
        self._thread: threading.Thread | None = None

    def start(self) -> ReplicaReporter:
        if self._engine is not None or self._has_gpu:
            self._thread = threading.Thread(target=self._run, name="previz-metrics", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.report()

    def report(self) -> None:
        if self._engine is not None:
            self._report_engine(self._engine.stats())
        if self._has_gpu:
            self._report_gpu()

    @_safely
    def _report_engine(self, stats: Any) -> None:
        m = metrics()
        tags = {"expert": stats.expert, **self._tags}
        if stats.num_iterations > self._last_iterations:
            m.denoise_iterations_total.inc(stats.num_iterations - self._last_iterations, tags=tags)
            self._last_iterations = stats.num_iterations
        for size, count in stats.batch_size_histogram.items():
            for _ in range(count - self._last_histogram.get(size, 0)):
                m.denoise_batch_size.observe(size, tags=tags)
        self._last_histogram = dict(stats.batch_size_histogram)
        for outcome in self._last_outcomes:
            total = getattr(stats, f"num_{outcome}")
            if total > self._last_outcomes[outcome]:
                m.engine_requests_finished_total.inc(
                    total - self._last_outcomes[outcome], tags={**tags, "outcome": outcome}
                )
                self._last_outcomes[outcome] = total
        if stats.num_adapter_switches > self._last_switches:
            m.engine_adapter_switches_total.inc(stats.num_adapter_switches - self._last_switches, tags=tags)
            self._last_switches = stats.num_adapter_switches
        for adapters, total in stats.forwards_by_adapters.items():
            if total > self._last_forwards.get(adapters, 0):
                new = total - self._last_forwards.get(adapters, 0)
                m.engine_forwards_total.inc(new, tags={**tags, "adapters": adapters})
                self._last_forwards[adapters] = total
        for name, counter in (("rows", m.denoise_rows_total), ("cached_steps", m.denoise_cached_steps_total)):
            total = getattr(stats, f"num_{name}")
            if total > self._last_counts[name]:
                counter.inc(total - self._last_counts[name], tags=tags)
                self._last_counts[name] = total
        m.step_cache_bytes.set(stats.num_cache_bytes, tags={**tags, "state": "held"})
        m.step_cache_bytes.set(stats.max_cache_bytes, tags={**tags, "state": "bound"})
        m.engine_queued_work.set(stats.num_queued_token_steps, tags={**tags, "unit": "token_steps"})
        m.engine_queued_work.set(stats.queued_work_seconds, tags={**tags, "unit": "seconds"})
        m.denoise_tokens_per_iteration.set(stats.mean_num_tokens, tags=tags)
        m.denoise_iterations_per_second.set(stats.iterations_per_second, tags=tags)
        occupancy = stats.mean_num_tokens / stats.max_num_tokens if stats.max_num_tokens else 0.0
        m.engine_occupancy_ratio.set(occupancy, tags=tags)
        m.engine_requests.set(stats.num_waiting, tags={**tags, "state": "waiting"})
        m.engine_requests.set(stats.num_running, tags={**tags, "state": "running"})
        if self._queue is None:
            idle = tuple(sorted({**tags, "bucket": "none"}.items()))
            self._queue = StaleZeroingGauge(lambda: metrics().engine_queue_requests, [idle])
        self._queue.publish(
            {
                tuple(sorted({**tags, "bucket": "x".join(map(str, _bucket_dims(bucket)))}.items())): count
                for bucket, count in stats.num_queued_by_bucket.items()
            }
        )

    @_safely
    def _report_gpu(self) -> None:
        import torch

        m = metrics()
        for index in range(torch.cuda.device_count()):
            tags = {"device": str(index), **self._tags}
            m.gpu_memory_used_bytes.set(torch.cuda.memory_reserved(index), tags=tags)
            with contextlib.suppress(Exception):  # torch.cuda.utilization needs pynvml / amdsmi
                m.gpu_utilization_ratio.set(torch.cuda.utilization(index) / 100.0, tags=tags)


def _bucket_dims(bucket: Any) -> tuple:
    return tuple(bucket) if isinstance(bucket, tuple | list) else (bucket,)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def exported_name(name: str) -> str:
    """The name Prometheus sees for a metric declared here."""
    return f"{EXPORTED_PREFIX}{name}"
