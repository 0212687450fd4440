"""The rank group of a sharded expert replica: rank 0 is the Serve replica, ranks 1.. are ShardWorker actors
it starts in its own placement group (bundle r holds rank r), all joined in one torch.distributed group
(pipeline.denoise.parallel: NCCL on CUDA, gloo on CPU, every collective bounded by `timeout_s`).

Every rank holds the same experts (one in the split layout, both when colocated) with the same adapters
(`expert_adapters`: the draft tier's distill LoRA and the style LoRAs, loaded before the model is
sharded), so the replica's engine serves drafts, LoRAs and step caching at any degree.

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
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import ray
import torch
from diffusers import WanTransformer3DModel
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pipeline.denoise.adapters import AdapterBank, load_bank
from pipeline.denoise.fp8 import quantize_fp8
from pipeline.denoise.kernels import compile_blocks, set_attention_backend
from pipeline.denoise.parallel import GroupRunner, ShardGroup, ShardGroupError, worker_loop
from pipeline.denoise.runner import Holding
from pipeline.determinism import make_batch_invariant
from pipeline.lora import distill_folder, resolve_lora_folder
from pipeline.spec import DISTILL_ADAPTER
from serve.config import PrevizArgs
from serve.sharding import Expert
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


def expert_adapters(args: PrevizArgs, expert: Expert, transformer) -> AdapterBank | None:
    """The expert's adapters, loaded once per rank: the draft tier's distill LoRA and the configured style
    LoRAs (None when there are none). Every rank of a group loads the same, before `shard`."""
    settings, cache = args.adapters, args.model_cache_dir
    folders = {}
    if settings.draft_lora is not None:
        folders[DISTILL_ADAPTER] = distill_folder(settings.draft_lora, args.model, cache_dir=cache)
    for lora in settings.loras:
        folders[lora.name] = resolve_lora_folder(lora.source, cache_dir=cache)
    if not folders:
        return None
    return load_bank(transformer, expert, folders, max_adapters=settings.max_adapters)


@ray.remote(max_concurrency=2)  # `serve` holds one thread in worker_loop for the actor's whole life
class ShardWorker:
    """Rank `rank` > 0 of one replica's group: holds sharded copies of the replica's experts (with the
    same adapters as rank 0) and runs rank 0's steps."""

    def __init__(self, args: PrevizArgs, experts: tuple[Expert, ...], rank: int) -> None:
        self.args, self.experts, self.rank = args, experts, rank
        self.group: ShardGroup | None = None
        self.holdings: dict[Expert, Holding] = {}

    def join(self, master_addr: str, master_port: int) -> None:
        """Load the experts and their adapters, join the group (blocks until every rank joined) and shard
        the models."""
        loaded = {}
        for expert in self.experts:
            _, transformer = load_expert(self.args, expert)
            loaded[expert] = (transformer, expert_adapters(self.args, expert, transformer))  # before shard
        self.group = join_group(self.args, self.experts, self.rank, master_addr, master_port)
        for expert, (transformer, bank) in loaded.items():
            sharded = make_batch_invariant(self.group.shard(transformer))  # as rank 0's engine does
            if self.args.experts.of(expert).fp8:
                quantize_fp8(sharded, self.group.device)
            if self.args.experts.of(expert).compile:
                compile_blocks(sharded)
            self.holdings[expert] = Holding(sharded, bank)

    def serve(self) -> int:
        """Serve rank 0's steps until it sends STOP; raises ShardGroupError when a peer died or hung."""
        if self.group is None or not self.holdings:
            raise RuntimeError(f"rank {self.rank}: `join` must succeed before `serve`.")
        num_forwards = worker_loop(self.group, self.holdings)
        self.group.close()
        return num_forwards


def group_settings(args: PrevizArgs, experts: tuple[Expert, ...]):
    """The parallel settings the experts of one rank group share; ValueError when they differ."""
    if not experts:
        raise ValueError("a rank group needs at least one expert.")
    settings = args.experts.of(experts[0]).parallel
    for expert in experts[1:]:
        other = args.experts.of(expert).parallel
        if other.degree != settings.degree:
            raise ValueError(
                f"the experts of one rank group must share a degree, but {experts[0]} is "
                f"{settings.ulysses}x{settings.cfg} and {expert} is {other.ulysses}x{other.cfg}."
            )
    return settings


def join_group(
    args: PrevizArgs, experts: tuple[Expert, ...], rank: int, master_addr: str, master_port: int
) -> ShardGroup:
    settings = group_settings(args, experts)
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
        self,
        args: PrevizArgs,
        experts: tuple[Expert, ...],
        transformers: Mapping[Expert, WanTransformer3DModel],
        banks: Mapping[Expert, AdapterBank | None],
        *,
        name: str,
    ) -> None:
        """Start the workers in this replica's placement group and form the group with them; returns once
        every rank joined and sharded its copies. `transformers` and `banks` are rank 0's, the banks
        already loaded (before sharding); `self.holdings` are rank 0's holdings and `self.runner` the
        engine's GroupRunner over them. Worker r is the actor `worker_name(name, r)` (ops and tests find a
        rank by it)."""
        self.experts = experts
        self.label = " + ".join(dict.fromkeys(args.experts.deployment(expert) for expert in experts))
        degree = group_settings(args, experts).degree
        what = f"{self.label} is sharded {degree.ulysses}x{degree.cfg}"
        placement = rank_placement(what, degree.world_size)
        master_addr = ray.util.get_node_ip_address()
        master_port = free_port(master_addr)
        self.workers = [
            ShardWorker.options(**rank_actor_options(placement, rank, worker_name(name, rank))).remote(
                args, experts, rank
            )
            for rank in range(1, degree.world_size)
        ]
        joins = [worker.join.remote(master_addr, master_port) for worker in self.workers]
        leader: Future[ShardGroup] = Future()

        def join_as_rank_0() -> None:  # concurrently with the workers: init blocks until all joined
            try:
                group = join_group(args, experts, 0, master_addr, master_port)
                self.holdings = {
                    expert: Holding(group.shard(transformers[expert]), banks.get(expert))
                    for expert in experts
                }
                leader.set_result(group)
            except BaseException as error:
                leader.set_exception(error)

        threading.Thread(target=join_as_rank_0, name="shard-join", daemon=True).start()
        self._wait_for_joins(joins, leader)
        self.group = leader.result()
        self.serving = [worker.serve.remote() for worker in self.workers]  # rank r+1 -> its loop
        self.runner = GroupRunner(self.group, self.holdings, on_failure=self._exit)
        self.group.start_keepalive()
        logger.info("%s: rank group of %d formed", self.label, degree.world_size)

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

    def _exit(self, error: ShardGroupError) -> None:
        """A step failed on the group: exit this process (see the module docstring)."""
        exit_on_group_failure(f"{self.label}: {error}")

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


def rank_placement(what: str, world_size: int) -> PlacementGroup:
    """This replica's placement group, checked to hold a bundle per rank; `what` says in the error what
    needs the ranks."""
    placement = ray.util.get_current_placement_group()
    if placement is None or len(placement.bundle_specs) < world_size:
        raise RuntimeError(
            f"{what} and needs a placement group of {world_size} bundles, but has "
            f"{'none' if placement is None else len(placement.bundle_specs)}; do not override "
            "`placement_group_bundles` with fewer bundles than ranks."
        )
    return placement


def rank_actor_options(placement: PlacementGroup, rank: int, name: str) -> dict[str, Any]:
    """Actor options that start rank `rank`'s worker, named `name`, in its own bundle of `placement`."""
    return {
        "name": name,
        "num_cpus": placement.bundle_specs[rank].get("CPU", 0),
        "num_gpus": placement.bundle_specs[rank].get("GPU", 0),
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=placement,
            placement_group_bundle_index=rank,
            placement_group_capture_child_tasks=True,
        ),
    }


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
