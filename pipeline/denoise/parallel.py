"""Sharded expert forwards: one guided forward over a group of U x C processes (Ulysses x CFG parallel).

Layout: rank = cfg_rank * U + ulysses_rank on a (cfg, ring=1, ulysses) device mesh. Rank 0 is the
planner: the engine on rank 0 runs each iteration through a `GroupRunner` (pipeline.denoise.runner's
StepRunner). It broadcasts the iteration's step plan (a one-int header with the op, then the plan and the
rows' shapes as one pickled object, `dist.broadcast_object_list`: a plan is a few hundred bytes of ids
and flags of any length, which a fixed int header cannot carry) and then the rows' three tensors, and
every rank runs the same step function (`runner.run_share`) on its share:
- CFG parallel (written here; diffusers 0.42 has none): each row of the plan goes to one cfg half. A
  caching request's rows are sticky (cond on half 0, uncond on half 1; an unguided one on the half with
  fewer sticky rows), because their residuals live on the half that computed them; the other rows fill
  the half with fewer computed rows. The ulysses-rank-0 member of each half all-gathers the halves'
  predictions (padded to the larger half) over its cfg group, so rank 0 holds every row's prediction
  before guidance.
- Ulysses (diffusers' own context-parallel plan for Wan via `enable_parallelism`): inside a half,
  the video tokens are split at `blocks.0` and at the RoPE output, self-attention does an all-to-all
  (each rank then holds all tokens and H/U heads), and `proj_out` gathers the tokens again, so every
  rank of the half ends with the full prediction of its rows; each rank keeps its token shard of the
  caching rows' residuals.
- Adapters: every rank holds the same AdapterBank per expert, loaded BEFORE `shard` (the context-parallel
  hooks are registered by module name, so peft's wrappers must be in place first) and switched to the
  plan's set before each forward.
- Residuals leave with their request: `GroupRunner.release` broadcasts a RELEASE at once (a residual is
  hundreds of MB per rank; waiting for the next forward could keep it for minutes on an idle replica).
Ranks > 0 run `worker_loop`, which serves rank 0's commands until it sends STOP.

Written here because diffusers lacks it: CFG parallel; the device on CPU (its `_resolve_parallel_config`
divides by `torch.accelerator.device_count()`, 0 without an accelerator, so `shard` resolves the config
itself for that one model instead of patching torch); timeouts on the mesh's subgroups (backend
options, and the flattened ring x ulysses mesh is created here first so diffusers reuses it).

Shape rules: a bucket's video tokens must divide by U (diffusers' equal split; an uneven one needs
`ulysses_anything`, NCCL only), and so must the model's heads (`shape_problem`, `allowed_sizes`).

Timeouts: every collective gives up after `timeout_s` (on NCCL its watchdog then tears the process
down). An idle worker waits in the header broadcast, so rank 0 pings the group every timeout_s / 4
while idle (`start_keepalive`); a worker whose rank 0 died or hung leaves `worker_loop` with
ShardGroupError within timeout_s, and rank 0's next forward raises when a worker died. The caller (a
Serve replica) turns either into an unhealthy replica (`is_healthy`).

How a replica with a rank group uses this (one process per rank, one group per process; a Ray actor
per rank > 0, MASTER_ADDR = rank 0's node IP, a free port on it; every rank calls `init` at once):
    group = ShardGroup.init(rank, U * C, master_addr, master_port, ulysses=U, cfg=C, timeout_s=300)
    transformer = load_components(source, parts=("transformer",)).transformer
    bank = load_bank(transformer, "high", folders)            # before shard, the same on every rank
    holdings = {"high": Holding(group.shard(transformer), bank)}   # ("high", "low") when colocated
    rank 0:  engine = DenoiseEngine(transformer, ..., runner=GroupRunner(group, holdings))
             group.start_keepalive(); engine.start(); health check: engine.is_alive() and group.is_healthy
             on shutdown: engine.shutdown(); group.close()  (tells the workers to stop)
    rank > 0: worker_loop(group, holdings)  (returns on STOP, raises ShardGroupError on a dead or silent
             peer: let the actor die), then group.close()
"""

from __future__ import annotations

import logging
import math
import threading
import time
import types
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pipeline.denoise.forward import GuidedInput, Rows, apply_guidance, stack_rows
from pipeline.denoise.runner import (
    Holding,
    PlannedRequest,
    RowKey,
    StepPlan,
    check_inputs,
    experts_named,
    holding_of,
    run_share,
)
from pipeline.spec import RESOLUTION_PRESETS, ModelSpec

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0  # one 720p forward of a 14B expert is ~30 s on one H100; ten of them is a hang
EXPERTS = ("high", "low")  # expert name <-> its code in the header
MESH_DIMS = ("cfg", "ring", "ulysses")
_STOP, _FORWARD, _PING, _RELEASE = 0, 1, 2, 3  # header ops (the header is this one int)


class ShardGroupError(RuntimeError):
    """A collective of the rank group failed or timed out; the whole group must be replaced."""


@dataclass(frozen=True, slots=True)
class ParallelDegree:
    """How one expert forward is split: `ulysses` ranks over the video tokens x `cfg` halves over rows."""

    ulysses: int = 1  # ranks sharing the video tokens of every row (diffusers' Ulysses attention)
    cfg: int = 1  # 1, or 2: cond and uncond rows on different halves of the group

    def __post_init__(self) -> None:
        if self.ulysses < 1:
            raise ValueError(f"`ulysses` must be >= 1 but is {self.ulysses}.")
        if self.cfg not in (1, 2):
            raise ValueError(f"`cfg` must be 1 or 2 but is {self.cfg}.")

    @property
    def world_size(self) -> int:
        return self.ulysses * self.cfg

    @property
    def is_sharded(self) -> bool:
        return self.world_size > 1


# ---- shape rules (admission asks these; no process group needed) -------------------------------------------


def heads_problem(num_heads: int, degree: ParallelDegree) -> str | None:
    """Why no size at all can run at `degree` on a model with `num_heads` heads, or None."""
    if num_heads % degree.ulysses:
        allowed = [u for u in range(1, num_heads + 1) if num_heads % u == 0]
        return (
            f"the model's {num_heads} attention heads do not divide by the Ulysses degree {degree.ulysses}; "
            f"allowed degrees: {', '.join(map(str, allowed))}"
        )
    return None


def shape_problem(
    width: int, height: int, num_frames: int, degree: ParallelDegree, *, model: ModelSpec, num_heads: int
) -> str | None:
    """Why a bucket (size, frames) cannot run at `degree`, naming the allowed sizes; None when it can."""
    problem = heads_problem(num_heads, degree)
    if problem is not None:
        return problem
    tokens = model.num_video_tokens(width, height, num_frames)
    if tokens % degree.ulysses == 0:
        return None
    allowed = allowed_sizes(num_frames, degree, model=model, num_heads=num_heads)
    sizes = ", ".join(f"{w}x{h}" for w, h in allowed) or "none of the presets"
    return (
        f"size {width}x{height} at {num_frames} frames has {tokens} video tokens, which do not divide by "
        f"the Ulysses degree {degree.ulysses}; sizes accepted at {num_frames} frames: {sizes} "
        f"(or any size whose latent frames x height/16 x width/16 divides by {degree.ulysses})"
    )


def preset_sizes() -> list[tuple[int, int]]:
    """(width, height) of Wan2.2's presets in both aspects: 832x480, 480x832, 1280x720, 720x1280."""
    return [size for w, h in RESOLUTION_PRESETS.values() for size in ((w, h), (h, w))]


def allowed_sizes(
    num_frames: int,
    degree: ParallelDegree,
    *,
    model: ModelSpec,
    num_heads: int,
    candidates: Sequence[tuple[int, int]] | None = None,
) -> list[tuple[int, int]]:
    """The (width, height) among `candidates` (default: the presets) that run at `degree`."""
    if heads_problem(num_heads, degree) is not None:
        return []
    return [
        (w, h)
        for w, h in (preset_sizes() if candidates is None else candidates)
        if model.num_video_tokens(w, h, num_frames) % degree.ulysses == 0
    ]


def ulysses_bytes_per_forward(
    num_rows: int, num_tokens: int, dim: int, num_layers: int, degree: ParallelDegree, element_size: int
) -> int:
    """Bytes one rank sends in the Ulysses all-to-alls of one forward (q, k, v and the output, per layer).

    Each all-to-all moves a (rows, tokens/U, dim) tensor and keeps 1/U of it; a cfg half runs
    rows/C of the rows."""
    if degree.ulysses == 1:
        return 0
    rows = math.ceil(num_rows / degree.cfg)
    local = rows * (num_tokens // degree.ulysses) * dim * element_size
    return 4 * num_layers * local * (degree.ulysses - 1) // degree.ulysses


# ---- the group ---------------------------------------------------------------------------------------------


def init_process_group(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device: str | torch.device | None = None,
) -> torch.device:
    """Join the default process group of `world_size` ranks (blocks until all joined): NCCL on CUDA, gloo
    on CPU, every collective bounded by `timeout_s`; returns this rank's device. `device` defaults to
    cuda:(rank % visible GPUs) when CUDA is available (one GPU per Ray actor gives cuda:0), else cpu.
    The rank groups of sharded experts (`ShardGroup.init`) and of parallel VAE decoders join with it."""
    if not 0 <= rank < world_size:
        raise ValueError(f"`rank` must be in 0..{world_size - 1} but is {rank}.")
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group; close it first.")
    if device is None:
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return device


class ShardGroup:
    """This process's membership of one rank group; `init` on every rank with the same arguments."""

    def __init__(self, rank: int, degree: ParallelDegree, device: torch.device, mesh: DeviceMesh, timeout_s):
        self.rank = rank
        self.degree = degree
        self.device = device  # where this rank's transformer and the broadcast tensors live
        self.mesh = mesh  # (cfg, ring, ulysses)
        self.timeout_s = timeout_s
        self.ulysses_rank = rank % degree.ulysses
        self.cfg_rank = rank // degree.ulysses
        self._lock = threading.Lock()  # one command at a time on rank 0 (the engine and the keepalive)
        self._last_command = time.monotonic()
        self._keepalive: threading.Thread | None = None
        self._stopped = threading.Event()
        self.num_forwards = 0  # sharded forwards this rank ran
        self.failure: str | None = None  # the first failed collective; a health check reports it

    @classmethod
    def init(
        cls,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        *,
        ulysses: int,
        cfg: int = 1,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        device: str | torch.device | None = None,
    ) -> ShardGroup:
        """Join the group (blocks until all `world_size` ranks joined); NCCL on CUDA, gloo on CPU.

        `device` defaults to cuda:(rank % visible GPUs) when CUDA is available (one GPU per Ray actor
        gives cuda:0), else cpu."""
        degree = ParallelDegree(ulysses=ulysses, cfg=cfg)
        if world_size != degree.world_size:
            raise ValueError(f"`world_size` must be ulysses x cfg = {degree.world_size} but is {world_size}.")
        device = init_process_group(rank, world_size, master_addr, master_port, timeout_s, device)
        backend = dist.get_backend()
        timeout = timedelta(seconds=timeout_s)
        options = dist.ProcessGroupNCCL.Options() if backend == "nccl" else dist.ProcessGroupGloo._Options()
        options._timeout = timeout  # subgroups otherwise get torch's default (10 or 30 minutes)
        mesh = init_device_mesh(
            device.type,
            (degree.cfg, 1, degree.ulysses),
            mesh_dim_names=MESH_DIMS,
            backend_override={name: (backend, options) for name in MESH_DIMS},
        )
        mesh["ring", "ulysses"]._flatten(backend_override=(backend, options))  # diffusers reuses it
        logger.info("rank %d/%d joined the shard group (%s on %s)", rank, world_size, backend, device)
        return cls(rank, degree, device, mesh, timeout_s)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def world_size(self) -> int:
        return self.degree.world_size

    @property
    def is_healthy(self) -> bool:
        """False once any collective of this rank failed: the group must be replaced as a whole."""
        return self.failure is None

    def shard(self, transformer: WanTransformer3DModel) -> WanTransformer3DModel:
        """Apply diffusers' Ulysses plan to this rank's copy of an expert (every rank, same order).

        Without Ulysses (CFG parallel only) the model is left as it is."""
        problem = heads_problem(transformer.config.num_attention_heads, self.degree)
        if problem is not None:
            raise ValueError(problem)
        if self.degree.ulysses == 1:
            return transformer
        config = ParallelConfig(
            context_parallel_config=ContextParallelConfig(ulysses_degree=self.degree.ulysses, mesh=self.mesh)
        )

        def resolve(model, _config):  # modeling_utils' own, with our device and mesh
            config.setup(self.rank, self.world_size, self.device, mesh=self.mesh)
            model._parallel_config = config
            return config

        transformer._resolve_parallel_config = types.MethodType(resolve, transformer)
        try:
            transformer.enable_parallelism(config=config)
        finally:
            del transformer._resolve_parallel_config
        return transformer

    # ---- rank 0 ---------------------------------------------------------------------------------------

    def run_plan(
        self, holdings: Mapping[str, Holding], plan: StepPlan, halves: Sequence[int], rows: Rows
    ) -> torch.Tensor:
        """Rank 0: broadcast one step (plan, row halves, rows), run rank 0's share, return every row's
        prediction in the plan's row order."""
        self._require_leader("run_plan")
        command = _Command(
            plan=plan,
            halves=tuple(halves),
            shape=tuple(rows.hidden_states.shape),
            text_shape=tuple(rows.encoder_hidden_states.shape),
            timestep_dtype=str(rows.timestep.dtype).removeprefix("torch."),
        )
        with self._lock:
            self._collective("broadcast the forward", self._send_header, _FORWARD)
            self._collective("broadcast the step plan", self._broadcast_object, command)
            self._collective("broadcast the rows", self._broadcast_rows, rows)
            prediction = self._execute(holding_of(holdings, plan.expert), command, rows)
            self._last_command = time.monotonic()
        return prediction

    def run_rows(self, expert: str, transformer: WanTransformer3DModel, rows: Rows) -> torch.Tensor:
        """Rank 0: one plain forward of `rows` (each an unguided, uncached member, base weights) on a
        group whose workers hold `expert`; every row's prediction (benchmarks and probes)."""
        inputs = range(rows.num_rows)
        plan = StepPlan(
            expert=expert, adapters=(), members=tuple(PlannedRequest(f"row{i}", guided=False) for i in inputs)
        )
        halves = [index * self.degree.cfg // rows.num_rows for index in inputs]  # contiguous chunks
        return self.run_plan({expert: Holding(transformer)}, plan, halves, rows)

    def release(
        self, holdings: Mapping[str, Holding], request_ids: Collection[str], expert: str | None
    ) -> None:
        """Rank 0: every rank drops these requests' residuals of `expert` (None: every expert). Rank 0
        drops its own first, so a broken group (nothing reaches the workers) frees rank 0 still."""
        self._require_leader("release")
        ids = sorted(request_ids)
        _release(holdings, ids, expert)
        with self._lock:
            if self._stopped.is_set() or not self.is_healthy:
                return  # the workers are gone or going: they free everything with their process
            self._collective("broadcast RELEASE", self._send_header, _RELEASE)
            self._collective("broadcast the released ids", self._broadcast_object, (ids, expert))
            self._last_command = time.monotonic()

    def stop_workers(self) -> None:
        """Rank 0: tell every worker to leave `worker_loop` (idempotent)."""
        self._require_leader("stop_workers")
        with self._lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
            self._collective("broadcast STOP", self._send_header, _STOP)

    def start_keepalive(self, interval_s: float | None = None) -> None:
        """Rank 0: ping the group while idle, so waiting workers do not time out between jobs."""
        self._require_leader("start_keepalive")
        if self._keepalive is not None:
            return
        interval = interval_s if interval_s is not None else self.timeout_s / 4

        def ping_while_idle() -> None:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # the current device is per thread
            while not self._stopped.wait(interval / 4):
                with self._lock:
                    if self._stopped.is_set() or time.monotonic() - self._last_command < interval:
                        continue
                    try:
                        self._send_header(_PING)
                    except Exception:  # the next forward reports it, naming the collective
                        logger.exception("shard group keepalive failed")
                        return
                    self._last_command = time.monotonic()

        self._keepalive = threading.Thread(target=ping_while_idle, name="shard-keepalive", daemon=True)
        self._keepalive.start()

    def close(self) -> None:
        """Leave the group: rank 0 stops the workers first. Safe to call twice."""
        if not dist.is_initialized():
            return
        if self.is_leader and self.is_healthy:  # on a broken group STOP would only wait out a timeout
            try:
                self.stop_workers()
            except ShardGroupError:
                logger.warning("could not tell the workers to stop; destroying the group anyway")
        self._stopped.set()
        if self._keepalive is not None:
            self._keepalive.join(timeout=5)
        dist.destroy_process_group()

    # ---- every rank -------------------------------------------------------------------------------------

    def serve_one(self, holdings: Mapping[str, Holding]) -> bool:
        """Ranks > 0: wait for one command from rank 0 and run it; False on STOP."""
        op = self._collective("wait for a command from rank 0", self._receive_header)
        if op == _STOP:
            return False
        if op == _RELEASE:
            ids, expert = self._collective("receive the released ids", self._broadcast_object, None)
            _release(holdings, ids, expert)
            return True
        if op != _FORWARD:
            return True  # PING
        command: _Command = self._collective("receive the step plan", self._broadcast_object, None)
        holding = holdings.get(command.plan.expert)
        dtype = (
            next(iter(holdings.values())).transformer.dtype if holding is None else holding.transformer.dtype
        )
        rows = Rows(
            hidden_states=torch.empty(command.shape, dtype=dtype, device=self.device),
            timestep=torch.empty(
                command.shape[:1], dtype=getattr(torch, command.timestep_dtype), device=self.device
            ),
            encoder_hidden_states=torch.empty(command.text_shape, dtype=dtype, device=self.device),
        )
        self._collective("receive the rows", self._broadcast_rows, rows)
        if holding is None:
            held = ", ".join(holdings)
            raise ShardGroupError(
                f"rank {self.rank} holds no {command.plan.expert} expert (it holds {held})."
            )
        self._execute(holding, command, rows)
        return True

    def _execute(self, holding: Holding, command: _Command, rows: Rows) -> torch.Tensor | None:
        """This rank's share of a step (every rank, the same code); rank 0 gets every row's prediction in
        the plan's row order, the others may get None."""
        self.num_forwards += 1
        plan, num_rows = command.plan, rows.num_rows
        if self.degree.cfg == 1:
            return self._collective(
                "run the sharded forward", run_share, holding, plan, rows, range(num_rows)
            )
        halves = command.halves
        mine = [row for row, half in enumerate(halves) if half == self.cfg_rank]
        out = None
        if mine:  # every rank of a half runs the same rows (the Ulysses collectives need it)
            index = torch.tensor(mine, device=self.device)
            share = Rows(rows.hidden_states[index], rows.timestep[index], rows.encoder_hidden_states[index])
            out = self._collective("run the sharded forward", run_share, holding, plan, share, mine)
        if self.ulysses_rank != 0:  # its half's ulysses rank 0 holds the same prediction and gathers it
            return None
        per_half = max(Counter(halves).values())
        channels = holding.transformer.config.out_channels
        padded = torch.zeros(
            (per_half, channels, *rows.hidden_states.shape[2:]),
            dtype=holding.transformer.dtype,
            device=self.device,
        )
        if out is not None:
            padded[: len(mine)] = out
        gathered = [torch.empty_like(padded) for _ in range(self.degree.cfg)]
        cfg_group = self.mesh.get_group("cfg")
        self._collective("gather the cfg halves", dist.all_gather, gathered, padded, group=cfg_group)
        prediction = torch.empty((num_rows, *padded.shape[1:]), dtype=padded.dtype, device=self.device)
        for half, part in enumerate(gathered):
            rows_of_half = [row for row, owner in enumerate(halves) if owner == half]
            if rows_of_half:
                prediction[torch.tensor(rows_of_half, device=self.device)] = part[: len(rows_of_half)]
        return prediction

    def _send_header(self, op: int) -> None:
        dist.broadcast(torch.tensor([op], dtype=torch.int64, device=self.device), src=0)

    def _receive_header(self) -> int:
        header = torch.empty(1, dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        return int(header.item())

    def _broadcast_object(self, value):
        """Rank 0 sends `value` (pickled); the others receive and return it."""
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def _broadcast_rows(self, rows: Rows) -> None:
        for tensor in (rows.hidden_states, rows.timestep, rows.encoder_hidden_states):
            dist.broadcast(tensor, src=0)  # stack_rows' tensors are contiguous, as broadcast needs

    def _collective(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ShardGroupError:
            raise
        except (RuntimeError, dist.DistBackendError) as error:
            message = (
                f"rank {self.rank} of {self.world_size}: could not {what} within {self.timeout_s:g} s "
                f"or a peer left: {error}"
            )
            self.failure = self.failure or message
            raise ShardGroupError(message) from error

    def _require_leader(self, what: str) -> None:
        if not self.is_leader:
            raise RuntimeError(f"`{what}` runs on rank 0 only; this is rank {self.rank}.")


@dataclass(frozen=True, slots=True)
class _Command:
    """What a FORWARD broadcasts after its header: the plan and how to receive its rows."""

    plan: StepPlan
    halves: tuple[int, ...]  # row -> the cfg half that runs it (empty without CFG parallel)
    shape: tuple[int, ...]  # rows' hidden states: (rows, channels, frames, height, width)
    text_shape: tuple[int, ...]  # rows' prompt embeddings: (rows, text tokens, text dim)
    timestep_dtype: str  # int64 for UniPC, float32 for the draft tier's Euler


def _release(holdings: Mapping[str, Holding], request_ids: Collection[str], expert: str | None) -> None:
    ids = set(request_ids)
    for name in experts_named(holdings, expert):
        holdings[name].store.release(ids)


class GroupRunner:
    """Rank 0's StepRunner over a ShardGroup: any expert of `holdings` (the workers hold the same ones)."""

    def __init__(
        self,
        group: ShardGroup,
        holdings: Mapping[str, Holding],
        *,
        on_failure: Callable[[ShardGroupError], None] | None = None,
    ) -> None:
        """`on_failure` is called with the error when a step fails on the group (a replica exits there, so
        that Serve replaces it with its whole group), before the error propagates."""
        group._require_leader("GroupRunner")
        unknown = set(holdings) - set(EXPERTS)
        if unknown or not holdings:
            raise ValueError(f"`holdings` must map some of {', '.join(EXPERTS)} but maps {sorted(holdings)}.")
        self.group = group
        self.holdings = dict(holdings)  # expert -> rank 0's holding (sharded by `group.shard`)
        self._halves: dict[tuple[str, RowKey], int] = {}  # (expert, caching row) -> its sticky cfg half
        self.on_failure = on_failure

    def holding(self, expert: str) -> Holding:
        return holding_of(self.holdings, expert)

    def run(self, plan: StepPlan, inputs: Sequence[GuidedInput]) -> list[torch.Tensor]:
        holding = self.holding(plan.expert)
        check_inputs(plan, inputs)
        rows = stack_rows(inputs, holding.transformer.dtype)
        halves = self._assign_halves(plan)
        try:
            prediction = self.group.run_plan(self.holdings, plan, halves, rows)
        except ShardGroupError as error:
            if self.on_failure is not None:
                self.on_failure(error)
            raise
        return apply_guidance(inputs, prediction)

    def release(self, request_ids: Collection[str], expert: str | None = None) -> None:
        ids = set(request_ids)
        self._halves = {
            key: half
            for key, half in self._halves.items()
            if key[1][0] not in ids or (expert is not None and key[0] != expert)
        }
        try:
            self.group.release(self.holdings, ids, expert)
        except ShardGroupError:  # rank 0's shares are gone; the next step fails the broken group
            logger.warning("could not tell the workers to release %s", sorted(ids), exc_info=True)

    def _assign_halves(self, plan: StepPlan) -> list[int]:
        """row -> cfg half: a caching row on its sticky half (where its residual lives), then every
        other row on the half with fewer rows through the blocks."""
        if self.group.degree.cfg == 1:
            return []
        rows = plan.rows()
        halves: list[int | None] = [None] * len(rows)
        load = [0, 0]  # rows through the blocks per half
        sticky = Counter(half for (expert, _), half in self._halves.items() if expert == plan.expert)
        for index, row in enumerate(rows):
            if not (row.reuse or row.keep):
                continue
            key = (plan.expert, row.key)
            half = self._halves.get(key)
            if half is None:
                if row.reuse:
                    raise ValueError(f"request {row.key[0]!r} reuses a residual no cfg half computed.")
                guided = any(m.request_id == row.key[0] and m.guided for m in plan.members)
                half = (0 if row.key[1] == "cond" else 1) if guided else min((0, 1), key=lambda h: sticky[h])
                self._halves[key] = half
                sticky[half] += 1
            halves[index] = half
            load[half] += not row.reuse
        for index, half in enumerate(halves):
            if half is None:
                halves[index] = half = 0 if load[0] <= load[1] else 1
                load[half] += 1
        return halves  # type: ignore[return-value]


class ShardedForward:
    """Rank 0's plain forward over the group (base weights, no caching), with the same interface as
    `guided_forward` (a `Forward`): for benchmarks and probes; the engine uses a GroupRunner."""

    def __init__(self, group: ShardGroup, transformer: WanTransformer3DModel, expert: str) -> None:
        if expert not in EXPERTS:
            raise ValueError(f"`expert` must be one of {', '.join(EXPERTS)} but is {expert!r}.")
        self.runner = GroupRunner(group, {expert: Holding(transformer)})
        self.transformer = transformer  # rank 0's sharded copy (`group.shard` was called on it)
        self.expert = expert

    def __call__(self, inputs: Sequence[GuidedInput]) -> list[torch.Tensor]:
        return self.runner.run(StepPlan.plain(self.expert, inputs), inputs)


@torch.inference_mode()
def worker_loop(group: ShardGroup, holdings: Mapping[str, Holding | WanTransformer3DModel]) -> int:
    """Ranks > 0: serve rank 0's commands until STOP; returns the forwards served.

    `holdings` maps expert name ("high", "low") to this rank's Holding (its sharded copy, the same adapter
    bank as rank 0's, its residual store), or to the bare sharded copy (base weights only); raises
    ShardGroupError when rank 0 or a peer died or went silent for `timeout_s`."""
    if group.is_leader:
        raise RuntimeError("worker_loop runs on ranks > 0; rank 0 drives the group with a GroupRunner.")
    held = {expert: held if isinstance(held, Holding) else Holding(held) for expert, held in holdings.items()}
    while group.serve_one(held):
        pass
    return group.num_forwards
