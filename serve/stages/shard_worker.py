"""The rank group of a sharded expert replica: rank 0 is the Serve replica, ranks 1.. are ShardWorker actors
it starts in its own placement group (bundle r holds rank r), all joined in one torch.distributed group
(pipeline.denoise.parallel: NCCL on CUDA, gloo on CPU, every collective bounded by `timeout_s`).

Faults: a rank that dies or hangs breaks every collective of the group, so the group is replaced whole.
A forward that fails on the group (ShardGroupError, within `timeout_s`) makes rank 0 exit its process on
purpose (`exit_on_group_failure`): Serve then sees the replica's actor die, replaces it (new placement
group, new workers), and the job whose stream was cut gets ActorDiedError, which the Scheduler treats as a
lost replica (serve.scheduling.faults.REPLICA_LOST): requeued, resumed from its expert-boundary checkpoint.
Failing only the health check would not do: Serve stops an unhealthy replica gracefully, waiting up to
`graceful_shutdown_timeout_s` for calls that can never finish on a broken group, and the engine would fail
each in-flight request with an app error, which fails the job instead of requeueing it. The workers are
owned by rank 0, so Ray kills them with it. `check_health` names a dead worker between forwards.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future

import ray
import torch
from diffusers import WanTransformer3DModel
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.denoise.forward import Forward, GuidedInput
from pipeline.denoise.fp8 import quantize_fp8
from pipeline.denoise.kernels import compile_blocks, set_attention_backend
from pipeline.denoise.parallel import ShardGroup, ShardGroupError, worker_loop
from pipeline.determinism import make_batch_invariant
from serve.config import PrevizArgs
from serve.sharding import DEPLOYMENT_NAMES, Expert
from serve.stages.common import stage_components

logger = logging.getLogger("ray.serve")

GROUP_FAILURE_EXIT_CODE = 75  # rank 0 left on purpose: its rank group broke (EX_TEMPFAIL: try again)
JOIN_POLL_S = 1.0  # how often rank 0 looks for a worker that failed before the group formed


def load_expert(args: PrevizArgs, expert: Expert):
    """(components, this expert's transformer with its attention backend): the same on every rank."""
    parts = stage_components(args, "transformer" if expert == "high" else "transformer_2")
    transformer = parts.transformer if expert == "high" else parts.transformer_2
    backend = args.experts.of(expert).attention_backend
    if backend is not None:
        set_attention_backend(transformer, backend)
    return parts, transformer


@ray.remote(max_concurrency=2)  # `serve` holds one thread in worker_loop for the actor's whole life
class ShardWorker:
    """Rank `rank` > 0 of one replica's group: holds a sharded copy of the expert, runs rank 0's forwards."""

    def __init__(self, args: PrevizArgs, expert: Expert, rank: int) -> None:
        self.args, self.expert, self.rank = args, expert, rank
        self.group: ShardGroup | None = None
        self.transformer: WanTransformer3DModel | None = None

    def join(self, master_addr: str, master_port: int) -> None:
        """Load the expert, join the group (blocks until every rank joined) and shard the model."""
        _, transformer = load_expert(self.args, self.expert)
        self.group = join_group(self.args, self.expert, self.rank, master_addr, master_port)
        self.transformer = make_batch_invariant(self.group.shard(transformer))  # as rank 0's engine does
        if self.args.experts.of(self.expert).fp8:
            quantize_fp8(self.transformer, self.group.device)
        if self.args.experts.of(self.expert).compile:
            compile_blocks(self.transformer)

    def serve(self) -> int:
        """Serve rank 0's forwards until it sends STOP; raises ShardGroupError when a peer died or hung."""
        if self.group is None or self.transformer is None:
            raise RuntimeError(f"rank {self.rank}: `join` must succeed before `serve`.")
        num_forwards = worker_loop(self.group, {self.expert: self.transformer})
        self.group.close()
        return num_forwards


def join_group(args: PrevizArgs, expert: Expert, rank: int, master_addr: str, master_port: int) -> ShardGroup:
    settings = args.experts.of(expert).parallel
    if args.device != "cuda":
        torch.set_num_threads(
            max(1, (os.cpu_count() or 1) // settings.degree.world_size)
        )  # ranks share cores
    return ShardGroup.init(
        rank,
        settings.degree.world_size,
        master_addr,
        master_port,
        ulysses=settings.ulysses,
        cfg=settings.cfg,
        timeout_s=settings.timeout_s,
    )


class RankGroup:
    """Rank 0's side: the worker actors, the group, and whether every rank is still there."""

    def __init__(
        self, args: PrevizArgs, expert: Expert, transformer: WanTransformer3DModel, *, name: str
    ) -> None:
        """Start the workers in this replica's placement group and form the group with them; returns once
        every rank joined and sharded its copy (`self.transformer` is rank 0's). Worker r is the actor
        `worker_name(name, r)` (ops and tests find a rank by it)."""
        self.expert = expert
        degree = args.experts.of(expert).parallel.degree
        placement = ray.util.get_current_placement_group()
        if placement is None or len(placement.bundle_specs) < degree.world_size:
            raise RuntimeError(
                f"{DEPLOYMENT_NAMES[expert]} is sharded {degree.ulysses}x{degree.cfg} and needs a placement "
                f"group of {degree.world_size} bundles, but has "
                f"{'none' if placement is None else len(placement.bundle_specs)}; do not override "
                "`placement_group_bundles` with fewer bundles than ranks."
            )
        master_addr = ray.util.get_node_ip_address()
        master_port = free_port(master_addr)
        self.workers = [
            ShardWorker.options(
                name=worker_name(name, rank),
                num_cpus=placement.bundle_specs[rank].get("CPU", 0),
                num_gpus=placement.bundle_specs[rank].get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=placement,
                    placement_group_bundle_index=rank,
                    placement_group_capture_child_tasks=True,
                ),
            ).remote(args, expert, rank)
            for rank in range(1, degree.world_size)
        ]
        joins = [worker.join.remote(master_addr, master_port) for worker in self.workers]
        leader: Future[ShardGroup] = Future()

        def join_as_rank_0() -> None:  # concurrently with the workers: init blocks until all joined
            try:
                group = join_group(args, expert, 0, master_addr, master_port)
                self.transformer = group.shard(transformer)
                leader.set_result(group)
            except BaseException as error:
                leader.set_exception(error)

        threading.Thread(target=join_as_rank_0, name="shard-join", daemon=True).start()
        self._wait_for_joins(joins, leader)
        self.group = leader.result()
        self.serving = [worker.serve.remote() for worker in self.workers]  # rank r+1 -> its loop
        self.group.start_keepalive()
        logger.info("%s: rank group of %d formed", DEPLOYMENT_NAMES[expert], degree.world_size)

    def _wait_for_joins(self, joins: list[ray.ObjectRef], leader: Future) -> None:
        """Until every rank joined; a worker that failed first (no weights, a bad port) fails the replica
        now rather than after the group's timeout."""
        pending = list(joins)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=JOIN_POLL_S)
            for ref in done:
                ray.get(ref)  # raises the worker's error, naming its rank in the traceback
            if leader.done() and leader.exception() is not None:
                raise leader.exception()
        leader.result()  # rank 0's own init (bounded by the group's timeout)

    def forward(self, forward: Forward) -> Forward:
        """`forward` that exits this process when the group fails under it (see the module docstring)."""

        def guarded(inputs: Sequence[GuidedInput]) -> list[torch.Tensor]:
            try:
                return forward(inputs)
            except ShardGroupError as error:
                exit_on_group_failure(f"{DEPLOYMENT_NAMES[self.expert]}: {error}")

        return guarded

    def check(self) -> None:
        """Raise, naming the rank, when the group failed or a worker left its loop (died, or raised)."""
        if not self.group.is_healthy:
            raise RuntimeError(f"the rank group failed: {self.group.failure}")
        ready, _ = ray.wait(self.serving, num_returns=len(self.serving), timeout=0)
        for ref in ready:
            rank = self.serving.index(ref) + 1
            try:
                ray.get(ref)
                why = "left its loop"
            except RayActorError as error:
                why = f"its actor died ({type(error).__name__})"
            except Exception as error:
                why = f"raised {type(error).__name__}: {str(error).strip().splitlines()[-1:]}"
            raise RuntimeError(f"rank {rank} of {self.group.world_size} of the rank group {why}")

    def close(self) -> None:
        """Stop the workers (STOP, then kill what is left) and leave the group."""
        try:
            self.group.close()
        finally:
            for worker in self.workers:
                ray.kill(worker, no_restart=True)


def worker_name(replica: str, rank: int) -> str:
    """The actor name of rank `rank` of the replica named `replica` (its Serve replica actor name)."""
    return f"SHARD_WORKER::{replica.removeprefix('SERVE_REPLICA::')}#rank{rank}"


def exit_on_group_failure(why: str) -> None:
    logger.critical("%s; exiting so that Serve replaces this replica and its jobs are requeued", why)
    for handler in logging.getLogger().handlers + logger.handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(GROUP_FAILURE_EXIT_CODE)


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
