"""How many GPUs of each kind a studio needs: a discrete-event simulation (simpy) of Previz's stage graph.

    python -m loadtest.capacity --calibrate                      # the cost model vs the published timings
    python -m loadtest.capacity --rate 200 --backlog 500         # one mix on the default replica set
    python -m loadtest.capacity --rate 200 --backlog 500 --recommend --target-p95 60 --plot out/
    python -m loadtest.predict_run run.json                      # predict a studio_load run, compare
    python -m loadtest.capacity --from-probe loadtest/results/h100.json --rate 200   # this GPU's throughputs

What is simulated, per job: the Scheduler's queue (Previz policy: interactive before batch, then the
project with the fewest jobs in flight, then age; or FCFS), at most `max_jobs_in_flight` jobs inside the
pipeline; then text encoding, the high-noise expert, the low-noise expert, VAE decode (+ SR), finish.
Each expert replica is the step-level batching engine: every iteration it takes the requests of one
bucket (the oldest interactive request's, else the oldest request's), at most `max_batch_size` of them
within `max_num_tokens` (CFG doubles a request's rows), and runs one step of each; requests join and
leave at step boundaries. An iteration lasts `CostModel.forward_s` on the replica's U x C GPUs. Tiers:
`final` (40 steps, CFG, 26 high + 14 low; a step cache skips `cache_skip` of them) and `draft` (the
distill recipe: 4 steps, no CFG, 2 + 2). Replica counts, degrees, tiers, the cache skip ratio and the
cost model's throughputs are parameters: what ops would change before buying GPUs.

Layouts (`--layout`, as `experts.layout`): `split` simulates the two expert deployments, each with its
replicas and degree; `colocated` simulates `--high` Denoiser replicas of the high degree, each holding both
experts: a job's high-noise then low-noise steps run on the replica that took it (no hop), and each
iteration runs one expert's bucket (the most urgent request's), so requests at different experts batch in
different iterations. Its GPUs and utilisation are reported as the stage `denoiser`.

Routers (`--router`): `load_aware` (today's product: serve/stages/router.py's bounded-load rendezvous on
each replica's queued token-steps, the same `choose` function, `--load-factor`) or `affinity` (the
router before issue 26: a bucket stays on the replica that has it until Serve's `max_ongoing_requests`).
Lanes follow the product too: `max_jobs_in_flight` with `--interactive-slots` reserved for interactive
shots (serve/scheduling/lanes.py's `Lanes`; default a quarter, as `PrevizArgs.lanes`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import simpy

from loadtest.cost_model import A14B, SIZES, CostModel, from_probe
from pipeline.denoise.parallel import ParallelDegree
from pipeline.priority import Priority
from pipeline.stages import STAGES as TABLE
from pipeline.stages import Layout
from serve.scheduling.lanes import Lanes, default_reserved
from serve.stages.router import DEFAULT_LOAD_FACTOR, choose

Policy = Literal["previz", "fcfs"]
Router = Literal["load_aware", "affinity"]
# stage table row -> the simulator's resource (it models no upscaler)
SIMULATED: dict[str, str] = {
    "encode": "text",
    "denoise_high": "high",
    "denoise_low": "low",
    "decode": "decode",
    "finish": "finish",
}
STAGES = tuple(SIMULATED[row.name] for row in TABLE if row.name in SIMULATED)
GPU_STAGES = tuple(SIMULATED[row.name] for row in TABLE if row.name in SIMULATED and row.accelerator)
COLOCATED = "denoiser"  # the stage name of the colocated layout's replicas (both experts)


@dataclass(frozen=True)
class Tier:
    name: str
    high_steps: int
    low_steps: int
    cfg: bool


TIERS = {
    "final": Tier("final", 26, 14, True),  # today's recipe: 40 steps, boundary 0.875 -> 26 + 14, CFG
    "draft": Tier("draft", 2, 2, False),  # Wan2.2 distill LoRAs: 4 steps, guidance 1 (no CFG rows)
}


@dataclass(frozen=True)
class Shot:
    """One job: who, what class, which tier and size, when it arrives."""

    id: int
    project: str
    klass: Priority
    tier: str
    size: str
    arrival_s: float
    num_frames: int = 81


@dataclass(frozen=True)
class Cluster:
    """The replica set: counts per stage, the experts' degrees, and the engine's bounds. In the colocated
    layout `high_replicas` and `high_degree` are the Denoiser's (both experts per replica); `low_*` unused."""

    layout: Layout = "split"
    high_replicas: int = 2
    low_replicas: int = 2
    high_degree: ParallelDegree = ParallelDegree(ulysses=2, cfg=2)
    low_degree: ParallelDegree = ParallelDegree(cfg=2)
    text_replicas: int = 1
    decode_replicas: int = 2
    finish_replicas: int = 2  # CPU
    max_jobs_in_flight: int = 96
    max_batch_size: int = 4
    max_ongoing_requests: int = 256  # a denoiser replica's Serve bound (serve/stages/denoiser.py)
    router: Router = "load_aware"  # the denoisers' request router (see the module docstring)
    load_factor: float = DEFAULT_LOAD_FACTOR  # the load-aware router's bound (`routing.load_factor`)
    interactive_slots: int | None = None  # lanes: slots reserved for interactive; None: the product's quarter
    max_num_tokens: int = 131_072
    text_s: float = 0.3  # umT5 of one prompt
    finish_s: float = 2.0  # grade, label, mp4, upload of one clip (CPU)

    @property
    def gpu_stages(self) -> tuple[str, ...]:
        """The simulated stages that hold GPUs: the experts' (or the Denoiser's) between text and decode."""
        if self.layout == "split":
            return GPU_STAGES
        return tuple(COLOCATED if stage == "high" else stage for stage in GPU_STAGES if stage != "low")

    @property
    def gpus(self) -> dict[str, float]:
        denoisers = {
            "high": self.high_replicas * self.high_degree.world_size,
            "low": self.low_replicas * self.low_degree.world_size,
        }
        if self.layout == "colocated":
            denoisers = {COLOCATED: self.high_replicas * self.high_degree.world_size}
        return {"text": self.text_replicas * 0.5, **denoisers, "decode": self.decode_replicas * 1.0}

    @property
    def total_gpus(self) -> float:
        return sum(self.gpus.values())

    @property
    def lanes(self) -> Lanes:
        reserved = (
            default_reserved(self.max_jobs_in_flight)
            if self.interactive_slots is None
            else {"interactive": self.interactive_slots}
        )
        return Lanes(self.max_jobs_in_flight, reserved)


@dataclass
class Outcome:
    shot: Shot
    admitted_s: float | None = None
    first_step_s: float | None = None
    done_s: float | None = None
    ended: int = 0  # times the job ended: exactly once if the simulation is sound

    @property
    def latency_s(self) -> float:
        assert self.done_s is not None
        return self.done_s - self.shot.arrival_s


@dataclass
class _Request:
    outcome: Outcome
    tokens: int
    rows: int
    steps_left: int
    done: simpy.Event
    bucket: tuple[int, int, str]  # (width, height, expert): a forward runs one expert on one shape


class ExpertReplica:
    """One replica's batching engine (see the module docstring)."""

    def __init__(self, env: simpy.Environment, model: CostModel, cluster: Cluster, degree: ParallelDegree):
        self.env, self.model, self.cluster, self.degree = env, model, cluster, degree
        self.active: list[_Request] = []
        self.wakeup = env.event()
        self.busy_s = 0.0
        self.forwards = 0
        env.process(self._run())

    def submit(self, request: _Request) -> None:
        self.active.append(request)
        if not self.wakeup.triggered:
            self.wakeup.succeed()

    def load(self) -> int:
        """Queued token-steps, as the engine reports them (EngineStats.num_queued_token_steps)."""
        return sum(request.steps_left * request.rows * request.tokens for request in self.active)

    def _batch(self) -> list[_Request]:
        lead = min(
            self.active, key=lambda r: (r.outcome.shot.klass != "interactive", r.outcome.shot.arrival_s)
        )
        same = sorted(
            (r for r in self.active if r.bucket == lead.bucket),
            key=lambda r: (r.outcome.shot.klass != "interactive", r.outcome.shot.arrival_s),
        )
        batch, tokens = [], 0
        for request in same:
            cost = request.tokens * request.rows
            if batch and (
                len(batch) >= self.cluster.max_batch_size or tokens + cost > self.cluster.max_num_tokens
            ):
                break
            batch.append(request)
            tokens += cost
        return batch

    def _run(self) -> Iterator[simpy.Event]:
        while True:
            if not self.active:
                self.wakeup = self.env.event()
                yield self.wakeup
                continue
            batch = self._batch()
            tokens = batch[0].tokens
            seconds = self.model.forward_s(tokens, sum(r.rows for r in batch), self.degree)
            for request in batch:
                if request.outcome.first_step_s is None:
                    request.outcome.first_step_s = self.env.now
            yield self.env.timeout(seconds)
            self.busy_s += seconds
            self.forwards += 1
            for request in batch:
                request.steps_left -= 1
                if request.steps_left == 0:
                    self.active.remove(request)
                    request.done.succeed()


class Simulation:
    """One run: a workload on a cluster under a policy; `run()` returns the Report."""

    def __init__(
        self,
        shots: list[Shot],
        cluster: Cluster,
        model: CostModel,
        policy: Policy = "previz",
        tiers: Mapping[str, Tier] = TIERS,
    ):
        self.shots, self.cluster, self.model, self.policy, self.tiers = shots, cluster, model, policy, tiers
        self.env = simpy.Environment()
        self.outcomes = {shot.id: Outcome(shot) for shot in shots}
        self.queue: list[Shot] = []
        self.in_flight: dict[str, int] = defaultdict(int)  # project -> jobs in flight
        self.lanes = cluster.lanes if policy == "previz" else Lanes(cluster.max_jobs_in_flight, {})
        self.in_lane: dict[str, int] = defaultdict(int)  # priority -> jobs in flight
        self.affinity: dict[bool, int] = {True: 0, False: 0}  # load-aware router: kept -> calls
        self.admit_event = self.env.event()
        self.high = [
            ExpertReplica(self.env, model, cluster, cluster.high_degree) for _ in range(cluster.high_replicas)
        ]
        self.low = [
            ExpertReplica(self.env, model, cluster, cluster.low_degree) for _ in range(cluster.low_replicas)
        ]
        if cluster.layout == "colocated":  # one set of replicas holds both experts
            self.low = self.high
        self.text = simpy.Resource(self.env, cluster.text_replicas)
        self.decode = simpy.Resource(self.env, cluster.decode_replicas)
        self.finish = simpy.Resource(self.env, cluster.finish_replicas)
        self.busy_s: dict[str, float] = defaultdict(float)
        self.queue_samples: list[tuple[float, int]] = []

    # -- the Scheduler -----------------------------------------------------------------------------

    def _order(self, shot: Shot) -> tuple[Any, ...]:
        if self.policy == "fcfs":
            return (shot.arrival_s, shot.id)
        return (shot.klass != "interactive", self.in_flight[shot.project], shot.arrival_s, shot.id)

    def _arrivals(self) -> Iterator[simpy.Event]:
        for shot in sorted(self.shots, key=lambda s: (s.arrival_s, s.id)):
            if shot.arrival_s > self.env.now:
                yield self.env.timeout(shot.arrival_s - self.env.now)
            self.queue.append(shot)
            self._nudge()

    def _nudge(self) -> None:
        if not self.admit_event.triggered:
            self.admit_event.succeed()

    def _scheduler(self) -> Iterator[simpy.Event]:
        while True:
            while self.queue:
                free = self.lanes.free_slots(self.in_lane)
                eligible = [shot for shot in self.queue if free[shot.klass] > 0]
                if not eligible:
                    break
                shot = min(eligible, key=self._order)
                self.queue.remove(shot)
                self.in_lane[shot.klass] += 1
                self.in_flight[shot.project] += 1
                self.outcomes[shot.id].admitted_s = self.env.now
                self.env.process(self._job(shot))
            self.admit_event = self.env.event()
            yield self.admit_event

    def _sampler(self, every_s: float) -> Iterator[simpy.Event]:
        while True:
            self.queue_samples.append((self.env.now, len(self.queue)))
            yield self.env.timeout(every_s)

    # -- a job through the stages ------------------------------------------------------------------

    def _serve(self, resource: simpy.Resource, stage: str, seconds: float) -> Iterator[simpy.Event]:
        with resource.request() as slot:
            yield slot
            yield self.env.timeout(seconds)
            self.busy_s[stage] += seconds

    def _place(self, replicas: list[ExpertReplica], request: _Request, work: float) -> ExpertReplica:
        if self.cluster.router == "affinity":
            return self._place_by_affinity(replicas, request)
        loads = {str(index): float(replica.load()) for index, replica in enumerate(replicas)}
        width, height, expert = request.bucket
        bucket = f"{width}x{height}" if self.cluster.layout == "colocated" else f"{width}x{height}:{expert}"
        choice = choose(bucket, loads, work, self.cluster.load_factor)
        self.affinity[choice.kept_affinity] += 1
        return replicas[int(choice.tiers[0][0])]

    def _place_by_affinity(self, replicas: list[ExpertReplica], request: _Request) -> ExpertReplica:
        """The router before issue 26: a bucket's calls go to the replica that has it (else the least
        loaded), spilling to the others only once it holds `max_ongoing_requests` calls (Serve's bound)."""
        same_bucket = [
            replica for replica in replicas if any(r.bucket == request.bucket for r in replica.active)
        ]
        replica = min(same_bucket or replicas, key=ExpertReplica.load)
        if len(replica.active) >= self.cluster.max_ongoing_requests and len(replicas) > 1:
            replica = min((other for other in replicas if other is not replica), key=ExpertReplica.load)
        return replica

    def _job(self, shot: Shot) -> Iterator[simpy.Event]:
        outcome = self.outcomes[shot.id]
        tier = self.tiers[shot.tier]
        width, height = dimensions(shot.size)
        tokens = A14B.num_video_tokens(width, height, shot.num_frames)
        rows = 2 if tier.cfg else 1
        skip = self.model.cache_skip if shot.tier == "final" else 0.0
        yield from self._serve(self.text, "text", self.cluster.text_s)
        replica = None
        high_steps, low_steps = (max(1, round(n * (1.0 - skip))) for n in (tier.high_steps, tier.low_steps))
        for expert, replicas, steps in (("high", self.high, high_steps), ("low", self.low, low_steps)):
            request = _Request(outcome, tokens, rows, steps, self.env.event(), (width, height, expert))
            if replica is None or self.cluster.layout == "split":  # colocated: the low steps stay put
                call_steps = steps if self.cluster.layout == "split" else high_steps + low_steps
                replica = self._place(replicas, request, float(tokens * rows * call_steps))
            replica.submit(request)
            yield request.done
        yield from self._serve(self.decode, "decode", self.model.serial_s(width, height, shot.num_frames))
        yield from self._serve(self.finish, "finish", self.cluster.finish_s)
        outcome.done_s = self.env.now
        outcome.ended += 1
        self.in_lane[shot.klass] -= 1
        self.in_flight[shot.project] -= 1
        self._nudge()

    def run(self, sample_every_s: float = 10.0) -> Report:
        self.env.process(self._arrivals())
        self.env.process(self._scheduler())
        self.env.process(self._sampler(sample_every_s))
        horizon = max(shot.arrival_s for shot in self.shots)
        while any(outcome.done_s is None for outcome in self.outcomes.values()):
            horizon += 600.0
            self.env.run(until=horizon)
        end = max(outcome.done_s for outcome in self.outcomes.values() if outcome.done_s is not None)
        if self.cluster.layout == "colocated":
            self.busy_s[COLOCATED] = sum(replica.busy_s for replica in self.high)
        else:
            self.busy_s["high"] = sum(replica.busy_s for replica in self.high)
            self.busy_s["low"] = sum(replica.busy_s for replica in self.low)
        return Report.of(self, end)


@dataclass
class Report:
    policy: str
    makespan_s: float
    latency_s: dict[str, dict[str, float]]  # "interactive/draft" -> p50, p95, p99, n
    utilisation: dict[str, float]  # GPU stage -> busy GPU-seconds / provisioned GPU-seconds
    gpu_busy_s: dict[str, float]
    gpu_hours_per_1000_shots: float  # provisioned GPUs x makespan, per 1,000 shots
    busy_gpu_hours_per_1000_shots: float  # the GPU work itself
    queue: list[tuple[float, int]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list, repr=False)

    @staticmethod
    def of(sim: Simulation, end: float) -> Report:
        groups: dict[str, list[float]] = defaultdict(list)
        for outcome in sim.outcomes.values():
            groups[f"{outcome.shot.klass}/{outcome.shot.tier}"].append(outcome.latency_s)
        latency = {name: summary(values) for name, values in sorted(groups.items())}
        per_gpu = {
            "text": sim.cluster.gpus["text"] / max(sim.cluster.text_replicas, 1),
            "high": sim.cluster.high_degree.world_size,
            "low": sim.cluster.low_degree.world_size,
            COLOCATED: sim.cluster.high_degree.world_size,
            "decode": 1.0,
        }
        stages = sim.cluster.gpu_stages
        busy = {stage: sim.busy_s[stage] * per_gpu[stage] for stage in stages}
        provisioned = {stage: sim.cluster.gpus[stage] * end for stage in stages}
        shots = len(sim.shots)
        return Report(
            policy=sim.policy,
            makespan_s=end,
            latency_s=latency,
            utilisation={stage: busy[stage] / provisioned[stage] for stage in stages if provisioned[stage]},
            gpu_busy_s=busy,
            gpu_hours_per_1000_shots=sim.cluster.total_gpus * end / 3600 / shots * 1000,
            busy_gpu_hours_per_1000_shots=sum(busy.values()) / 3600 / shots * 1000,
            queue=sim.queue_samples,
            outcomes=list(sim.outcomes.values()),
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "n": float(len(values)),
    }


def studio_mix(
    *,
    seed: int,
    rate_per_hour: float,
    hours: float,
    backlog: int = 0,
    projects: int = 8,
    interactive_share: float = 0.7,
    draft_share_interactive: float = 1.0,
    sizes: tuple[str, ...] = ("480p",),
) -> list[Shot]:
    """A batch backlog of `backlog` final-tier shots at t=0 (an overnight storyboard of project p0),
    plus Poisson arrivals at `rate_per_hour` over `hours` from `projects` projects: interactive
    (draft unless the mix says otherwise) or batch (final)."""
    rng = random.Random(seed)
    shots = [Shot(i, "p0", "batch", "final", rng.choice(sizes), 0.0) for i in range(backlog)]
    t, end = 0.0, hours * 3600
    while True:
        t += rng.expovariate(rate_per_hour / 3600)
        if t > end:
            return shots
        klass: Priority = "interactive" if rng.random() < interactive_share else "batch"
        tier = "draft" if klass == "interactive" and rng.random() < draft_share_interactive else "final"
        shots.append(Shot(len(shots), f"p{rng.randrange(projects)}", klass, tier, rng.choice(sizes), t))


def simulate(
    shots: list[Shot],
    cluster: Cluster,
    model: CostModel,
    policy: Policy = "previz",
    tiers: Mapping[str, Tier] = TIERS,
) -> Report:
    return Simulation(shots, cluster, model, policy, tiers).run()


def dimensions(size: str) -> tuple[int, int]:
    """(width, height) of a preset (`480p`, `720p`) or of `WxH`."""
    if size in SIZES:
        return SIZES[size]
    width, height = size.lower().split("x")
    return int(width), int(height)


def recommend(
    shots: list[Shot], model: CostModel, target_p95_s: float, base: Cluster, max_replicas: int = 16
) -> tuple[Cluster, Report] | None:
    """The cheapest replica mix (fewest GPUs) whose p95 interactive latency meets the target and whose
    batch shots all finish. Searches expert replica counts (at the base's degrees; colocated: Denoiser
    replicas) and decode replicas."""
    candidates = []
    lows = range(1, max_replicas + 1) if base.layout == "split" else (base.low_replicas,)
    for high in range(1, max_replicas + 1):
        for low in lows:
            for decode in (1, 2, 4, 8):
                cluster = replace(base, high_replicas=high, low_replicas=low, decode_replicas=decode)
                candidates.append(cluster)
    for cluster in sorted(candidates, key=lambda c: (c.total_gpus, c.high_replicas + c.low_replicas)):
        report = simulate(shots, cluster, model)
        interactive = [values for name, values in report.latency_s.items() if name.startswith("interactive")]
        if interactive and all(values["p95"] <= target_p95_s for values in interactive):
            return cluster, report
    return None


# One 8-GPU node as the scale-out table lays it out: 3 + 3 single-GPU expert replicas, one decoder, the text
# encoder on half a GPU (7.5 GPUs used).
NODE = Cluster(
    high_replicas=3,
    low_replicas=3,
    high_degree=ParallelDegree(),
    low_degree=ParallelDegree(),
    decode_replicas=1,
    max_jobs_in_flight=24,  # deploy/gpu-node.yaml
)


def one_size_load(num_shots: int, size: str, tier: str) -> list[Shot]:
    """`num_shots` shots of one size and tier queued at t=0 (a storyboard's worth): drafts interactive,
    finals batch, spread over 4 projects."""
    klass: Priority = "interactive" if tier == "draft" else "batch"
    return [Shot(i, f"p{i % 4}", klass, tier, size, 0.0) for i in range(num_shots)]


def shots_per_hour(shots: list[Shot], cluster: Cluster, model: CostModel) -> float:
    report = simulate(shots, cluster, model)
    return len(shots) / report.makespan_s * 3600


def scale_out_rows(
    model: CostModel, sizes: tuple[str, ...] = ("480p", "720p"), num_shots: int = 96
) -> list[dict[str, Any]]:
    """Per (size, tier, router): shots per hour on one node (NODE) and with its expert replicas doubled
    (decode and slots doubled with them, as a second node would bring)."""
    rows = []
    for size in sizes:
        for tier in ("draft", "final"):
            shots = one_size_load(num_shots, size, tier)
            for router in ("affinity", "load_aware"):
                one = replace(NODE, router=router)
                two = replace(
                    one,
                    high_replicas=2 * one.high_replicas,
                    low_replicas=2 * one.low_replicas,
                    decode_replicas=2 * one.decode_replicas,
                    max_jobs_in_flight=2 * one.max_jobs_in_flight,
                )
                per_node, doubled = shots_per_hour(shots, one, model), shots_per_hour(shots, two, model)
                rows.append(
                    {
                        "size": size,
                        "tier": tier,
                        "router": router,
                        "shots_per_hour_per_node": per_node,
                        "shots_per_hour_doubled": doubled,
                        "speedup": doubled / per_node,
                    }
                )
    return rows


def scale_out_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"one 8-GPU node = {NODE.high_replicas} + {NODE.low_replicas} expert replicas x 1 GPU, "
        f"{NODE.decode_replicas} decoder, text on 0.5 GPU; one-size loads queued at t=0",
        "size  tier   router       shots/h/node  shots/h x2 replicas  speedup",
    ]
    for row in rows:
        lines.append(
            f"{row['size']:5} {row['tier']:6} {row['router']:11}  {row['shots_per_hour_per_node']:12.1f}  "
            f"{row['shots_per_hour_doubled']:19.1f}  {row['speedup']:6.2f}x"
        )
    return "\n".join(lines)


def calibration_table(model: CostModel) -> str:
    lines = ["size   GPUs   published s   model s    error"]
    for (size, gpus), (published, predicted) in model.published_errors().items():
        lines.append(
            f"{size:5}  {gpus:4}   {published:11.1f}   {predicted:7.1f}   "
            f"{100 * (predicted - published) / published:+5.1f} %"
        )
    return "\n".join(lines)


def report_table(report: Report) -> str:
    lines = [f"policy {report.policy}: makespan {report.makespan_s / 3600:.2f} h"]
    lines.append("class               n      p50 s     p95 s     p99 s")
    for name, values in report.latency_s.items():
        lines.append(
            f"{name:16} {int(values['n']):5}  {values['p50']:8.1f}  {values['p95']:8.1f}  "
            f"{values['p99']:8.1f}"
        )
    lines.append(
        "GPU utilisation: "
        + ", ".join(f"{stage} {100 * value:.0f} %" for stage, value in report.utilisation.items())
    )
    lines.append(
        f"GPU-hours per 1,000 shots: {report.gpu_hours_per_1000_shots:.1f} provisioned, "
        f"{report.busy_gpu_hours_per_1000_shots:.1f} busy"
    )
    return "\n".join(lines)


def plot(report: Report, out: Path) -> list[Path]:
    """PNG charts: latency CDF per class, queue length over time, utilisation per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    groups: dict[str, list[float]] = defaultdict(list)
    for outcome in report.outcomes:
        groups[f"{outcome.shot.klass}/{outcome.shot.tier}"].append(outcome.latency_s)
    figure, axes = plt.subplots()
    for name, values in sorted(groups.items()):
        ordered = sorted(values)
        axes.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=name, where="post")
    axes.set(xlabel="latency (s)", ylabel="share of shots", xscale="log", title="Latency CDF per class")
    axes.legend()
    paths.append(_save(figure, out / "latency_cdf.png"))
    figure, axes = plt.subplots()
    axes.plot([t / 3600 for t, _ in report.queue], [n for _, n in report.queue])
    axes.set(xlabel="time (h)", ylabel="queued jobs", title="Scheduler queue length")
    paths.append(_save(figure, out / "queue_length.png"))
    figure, axes = plt.subplots()
    stages = list(report.utilisation)
    axes.bar(stages, [100 * report.utilisation[stage] for stage in stages])
    axes.set(ylabel="busy %", ylim=(0, 100), title="GPU utilisation per stage")
    paths.append(_save(figure, out / "utilisation.png"))
    return paths


def _save(figure: Any, path: Path) -> Path:
    figure.savefig(path, dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--calibrate", action="store_true", help="print the cost model vs the published points"
    )
    parser.add_argument("--rate", type=float, default=200.0, help="arriving shots per hour")
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--backlog", type=int, default=500, help="final-tier batch shots queued at t=0")
    parser.add_argument("--projects", type=int, default=8)
    parser.add_argument("--interactive-share", type=float, default=0.7)
    parser.add_argument("--size", choices=sorted(SIZES), default="480p")
    parser.add_argument("--cache-skip", type=float, default=0.0, help="share of final-tier steps skipped")
    parser.add_argument("--high", type=int, default=Cluster.high_replicas)
    parser.add_argument("--low", type=int, default=Cluster.low_replicas)
    parser.add_argument(
        "--layout",
        choices=("split", "colocated"),
        default="split",
        help="colocated: --high Denoiser replicas at the high degree, both experts each",
    )
    parser.add_argument("--high-ulysses", type=int, default=2)
    parser.add_argument("--high-cfg", type=int, default=2)
    parser.add_argument("--low-ulysses", type=int, default=1)
    parser.add_argument("--low-cfg", type=int, default=2)
    parser.add_argument("--decode", type=int, default=Cluster.decode_replicas)
    parser.add_argument(
        "--max-ongoing",
        type=int,
        default=Cluster.max_ongoing_requests,
        help="calls a denoiser replica takes before bucket affinity spills to the next",
    )
    parser.add_argument(
        "--router",
        choices=("load_aware", "affinity"),
        default="load_aware",
        help="the denoisers' router: load_aware (bounded-load rendezvous) or affinity (before issue 26)",
    )
    parser.add_argument("--load-factor", type=float, default=DEFAULT_LOAD_FACTOR, help="load_aware's bound")
    parser.add_argument(
        "--interactive-slots", type=int, help="lanes: slots reserved for interactive (default: a quarter)"
    )
    parser.add_argument(
        "--scale-out",
        action="store_true",
        help="shots/h per 8-GPU node and with replicas doubled, per router, for one-size loads",
    )
    parser.add_argument("--matmul-mfu", type=float, default=CostModel.matmul_mfu)
    parser.add_argument("--attention-mfu", type=float, default=CostModel.attention_mfu)
    parser.add_argument("--policy", choices=("previz", "fcfs", "both"), default="both")
    parser.add_argument(
        "--recommend", action="store_true", help="the cheapest replica mix meeting --target-p95"
    )
    parser.add_argument("--target-p95", type=float, default=60.0, help="interactive p95 target (s)")
    parser.add_argument("--plot", type=Path, help="write PNG charts into this folder")
    parser.add_argument("--json", type=Path, help="write the report(s) here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--from-probe", type=Path, help="a loadtest.gpu_probe JSON: throughputs refitted to that GPU"
    )
    args = parser.parse_args(argv)
    model = CostModel(
        cache_skip=args.cache_skip, matmul_mfu=args.matmul_mfu, attention_mfu=args.attention_mfu
    )
    if args.from_probe is not None:  # this hardware's measured throughputs instead of the published fit
        model = from_probe(json.loads(args.from_probe.read_text()), model)
    if args.calibrate:
        print(calibration_table(model))
        return
    if args.scale_out:
        print(scale_out_table(scale_out_rows(model)))
        return
    cluster = Cluster(
        layout=args.layout,
        high_replicas=args.high,
        low_replicas=args.low,
        high_degree=ParallelDegree(ulysses=args.high_ulysses, cfg=args.high_cfg),
        low_degree=ParallelDegree(ulysses=args.low_ulysses, cfg=args.low_cfg),
        decode_replicas=args.decode,
        max_ongoing_requests=args.max_ongoing,
        router=args.router,
        load_factor=args.load_factor,
        interactive_slots=args.interactive_slots,
    )
    shots = studio_mix(
        seed=args.seed,
        rate_per_hour=args.rate,
        hours=args.hours,
        backlog=args.backlog,
        projects=args.projects,
        interactive_share=args.interactive_share,
        sizes=(args.size,),
    )
    reports = {}
    for policy in ("previz", "fcfs") if args.policy == "both" else (args.policy,):
        reports[policy] = simulate(shots, cluster, model, policy)  # type: ignore[arg-type]
        print(f"{cluster.total_gpus:g} GPUs ({cluster.gpus}); {len(shots)} shots")
        print(report_table(reports[policy]))
    if args.recommend:
        found = recommend(shots, model, args.target_p95, cluster)
        if found is None:
            print(f"no mix up to 16 + 16 expert replicas meets p95 <= {args.target_p95:g} s")
        else:
            best, report = found
            experts = (
                f"high {best.high_replicas} x {best.high_degree.world_size}, "
                f"low {best.low_replicas} x {best.low_degree.world_size}"
                if best.layout == "split"
                else f"denoiser {best.high_replicas} x {best.high_degree.world_size}"
            )
            print(
                f"recommended: {best.total_gpus:g} GPUs = {experts}, decode {best.decode_replicas}, "
                f"text {best.gpus['text']:g}"
            )
            print(report_table(report))
            reports["recommended"] = report
    if args.plot is not None:
        for path in plot(reports.get("recommended") or next(iter(reports.values())), args.plot):
            print(f"wrote {path}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    name: {k: v for k, v in asdict(r).items() if k != "outcomes"}
                    for name, r in reports.items()
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
