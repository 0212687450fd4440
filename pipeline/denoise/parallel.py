"""Sharded expert forwards: one guided forward over a group of U x C processes (Ulysses x CFG parallel).

Layout: rank = cfg_rank * U + ulysses_rank on a (cfg, ring=1, ulysses) device mesh. Rank 0 is the
planner: the engine (the Denoiser's too) on rank 0 calls a `ShardedForward` exactly where it would call
`guided_forward`. It broadcasts the iteration's rows (a fixed int64 header, then three tensors) to the
group, and every rank runs its share:
- CFG parallel (written here; diffusers 0.42 has none): the rows, laid out conds first then unconds
  (forward.stack_rows), are cut into C equal contiguous chunks, the last padded by repeating its last
  row; cfg half c runs chunk c; the ulysses-rank-0 member of each half all-gathers the chunks over
  its cfg group, so rank 0 holds every row's prediction before guidance.
- Ulysses (diffusers' own context-parallel plan for Wan via `enable_parallelism`): inside a half,
  the video tokens are split at `blocks.0` and at the RoPE output, self-attention does an all-to-all
  (each rank then holds all tokens and H/U heads), and `proj_out` gathers the tokens again, so every
  rank of the half ends with the full prediction of its rows.
Ranks > 0 run `worker_loop`, which serves broadcast forwards until rank 0 sends STOP.

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
    transformer = group.shard(load_components(source, parts=("transformer",)).transformer)
    rank 0:  engine = DenoiseEngine(transformer, ..., forward=ShardedForward(group, transformer, "high"))
             group.start_keepalive(); engine.start(); health check: engine.is_alive() and group.is_healthy
             on shutdown: engine.shutdown(); group.close()  (tells the workers to stop)
    rank > 0: worker_loop(group, {"high": transformer})  (returns on STOP, raises ShardGroupError on a
             dead or silent peer: let the actor die), then group.close()
"""

from __future__ import annotations

import logging
import math
import threading
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pipeline.denoise.forward import GuidedInput, Rows, apply_guidance, predict_rows, stack_rows
from pipeline.spec import RESOLUTION_PRESETS, ModelSpec

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0  # one 720p forward of a 14B expert is ~30 s on one H100; ten of them is a hang
EXPERTS = ("high", "low")  # expert name <-> its code in the header
MESH_DIMS = ("cfg", "ring", "ulysses")
_STOP, _FORWARD, _PING = 0, 1, 2  # header ops
_HEADER_LEN = 9  # op, expert, rows, channels, frames, height, width, text tokens, text dim


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
        if not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be in 0..{world_size - 1} but is {rank}.")
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group; close it first.")
        if device is None:
            cuda = torch.cuda.is_available()
            device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
        device = torch.device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
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

    def run_rows(self, expert: str, transformer: WanTransformer3DModel, rows: Rows) -> torch.Tensor:
        """Rank 0: broadcast one forward's rows, run rank 0's share, return every row's prediction."""
        self._require_leader("run_rows")
        c, f, h, w = rows.hidden_states.shape[1:]
        _, tokens, text_dim = rows.encoder_hidden_states.shape
        header = [_FORWARD, EXPERTS.index(expert), rows.num_rows, c, f, h, w, tokens, text_dim]
        with self._lock:
            self._collective("broadcast the forward", self._send_header, header)
            self._collective("broadcast the rows", self._broadcast_rows, rows)
            prediction = self._predict(transformer, rows)
            self._last_command = time.monotonic()
        return prediction

    def stop_workers(self) -> None:
        """Rank 0: tell every worker to leave `worker_loop` (idempotent)."""
        self._require_leader("stop_workers")
        with self._lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
            self._collective("broadcast STOP", self._send_header, [_STOP] + [0] * (_HEADER_LEN - 1))

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
                        self._send_header([_PING] + [0] * (_HEADER_LEN - 1))
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

    def serve_one(self, transformers: Mapping[str, WanTransformer3DModel]) -> bool:
        """Ranks > 0: wait for one command and run it; False on STOP."""
        header = self._collective("wait for a command from rank 0", self._receive_header)
        op, expert, num_rows, c, f, h, w, tokens, text_dim = header
        if op == _STOP:
            return False
        if op == _PING:
            return True
        dtype = next(iter(transformers.values())).dtype
        rows = Rows(
            hidden_states=torch.empty((num_rows, c, f, h, w), dtype=dtype, device=self.device),
            timestep=torch.empty((num_rows,), dtype=torch.int64, device=self.device),
            encoder_hidden_states=torch.empty((num_rows, tokens, text_dim), dtype=dtype, device=self.device),
        )
        self._collective("receive the rows", self._broadcast_rows, rows)
        name = EXPERTS[expert]
        if name not in transformers:
            held = ", ".join(transformers)
            raise ShardGroupError(f"rank {self.rank} holds no {name} expert (it holds {held}).")
        self._predict(transformers[name], rows)
        return True

    def _predict(self, transformer: WanTransformer3DModel, rows: Rows) -> torch.Tensor | None:
        """This rank's share of the forward; rank 0 gets every row's prediction, others may get None."""
        self.num_forwards += 1
        if self.degree.cfg == 1:
            return self._collective("run the sharded forward", predict_rows, transformer, rows)
        num_rows, halves = rows.num_rows, self.degree.cfg
        per_half = math.ceil(num_rows / halves)
        start = self.cfg_rank * per_half
        index = torch.arange(start, start + per_half, device=self.device).clamp(max=num_rows - 1)  # pad
        mine = Rows(rows.hidden_states[index], rows.timestep[index], rows.encoder_hidden_states[index])
        out = self._collective("run the sharded forward", predict_rows, transformer, mine).contiguous()
        if self.ulysses_rank != 0:  # its half's ulysses rank 0 holds the same prediction and gathers it
            return None
        gathered = [torch.empty_like(out) for _ in range(halves)]
        cfg_group = self.mesh.get_group("cfg")
        self._collective("gather the cfg halves", dist.all_gather, gathered, out, group=cfg_group)
        return torch.cat(gathered)[:num_rows]

    def _send_header(self, header: list[int]) -> None:
        dist.broadcast(torch.tensor(header, dtype=torch.int64, device=self.device), src=0)

    def _receive_header(self) -> list[int]:
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        return header.tolist()

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


class ShardedForward:
    """Rank 0's forward over the group, with the same interface as `guided_forward` (a `Forward`)."""

    def __init__(self, group: ShardGroup, transformer: WanTransformer3DModel, expert: str) -> None:
        if expert not in EXPERTS:
            raise ValueError(f"`expert` must be one of {', '.join(EXPERTS)} but is {expert!r}.")
        group._require_leader("ShardedForward")
        self.group = group
        self.transformer = transformer  # rank 0's sharded copy (`group.shard` was called on it)
        self.expert = expert

    def __call__(self, inputs: Sequence[GuidedInput]) -> list[torch.Tensor]:
        rows = stack_rows(inputs, self.transformer.dtype)
        return apply_guidance(inputs, self.group.run_rows(self.expert, self.transformer, rows))


@torch.inference_mode()
def worker_loop(group: ShardGroup, transformers: Mapping[str, WanTransformer3DModel]) -> int:
    """Ranks > 0: serve rank 0's forwards until STOP; returns the forwards served.

    `transformers` maps expert name ("high", "low") to this rank's sharded copy; raises ShardGroupError
    when rank 0 or a peer died or went silent for `timeout_s`."""
    if group.is_leader:
        raise RuntimeError("worker_loop runs on ranks > 0; rank 0 drives the group with ShardedForward.")
    while group.serve_one(transformers):
        pass
    return group.num_forwards
