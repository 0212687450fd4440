"""The rank group of a parallel VAEDecoder replica (`decoder.parallel: N`): rank 0 is the Serve replica,
ranks 1.. are DecodeWorker actors it starts in its own placement group (bundle r holds rank r), all joined
in one torch.distributed group (NCCL on CUDA, gloo on CPU, every collective bounded by
`decoder.timeout_s`): the placement and the group are the sharded experts' (serve.sharding's bundles,
pipeline.denoise.parallel.init_process_group). Every rank holds the VAE in the decoder's dtype, patched to
decode its block of every frame (pipeline.vae_parallel).

Unlike an expert's group, work reaches the workers as Ray calls, not through a broadcast loop: for each
decode rank 0 puts the latents in the object store once, calls `decode` on every worker with the ref and
decodes its own block at the same time; the ranks meet only in the decode's collectives (halos, the
mid-block's gather, the frames' gather). An idle worker waits for a call, not in a collective, so the
group needs no keepalive.

Faults, as for sharded experts (serve.stages.shard_worker): a decode that fails on the group (a collective
timed out or a peer left, a worker's call failed, or the decode itself raised: the other ranks may be
stuck in a collective) makes rank 0 exit its process on purpose, so Serve replaces the replica with a new
group and the Scheduler requeues the job whose stream was cut (a lost replica). `check`, the replica's
health check, names a worker that stopped answering.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future

import numpy as np
import ray
import torch
import torch.distributed as dist
from diffusers import AutoencoderKLWan
from ray.exceptions import RayError

from pipeline.denoise.parallel import init_process_group
from pipeline.frames import Frames
from pipeline.vae import decode_dtype
from pipeline.vae_parallel import ParallelVAEDecoder
from serve.config import PrevizArgs
from serve.stages.common import stage_components
from serve.stages.shard_worker import (
    JOIN_POLL_S,
    exit_on_group_failure,
    free_port,
    rank_actor_options,
    rank_placement,
)

logger = logging.getLogger("ray.serve")

PING_TIMEOUT_S = 30.0  # a worker busy in a decode still answers (two threads); silence this long is a fault


def join_decode_group(
    args: PrevizArgs, vae: AutoencoderKLWan, rank: int, master_addr: str, master_port: int
) -> ParallelVAEDecoder:
    """Join the decoder's group as `rank` (blocks until every rank joined) and patch a copy of `vae` to
    decode this rank's blocks."""
    world_size = args.decoder.parallel
    device = next(vae.parameters()).device
    if device.type != "cuda":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # ranks share cores
    init_process_group(rank, world_size, master_addr, master_port, args.decoder.timeout_s, device)
    # its constructor is every rank's first collective, together (a barrier): NCCL sets its communicator
    # up on the first one, and a halo swap leaves out the ranks with no neighbour on an axis
    return ParallelVAEDecoder(vae, dtype=decode_dtype(args.decoder.dtype, device))


@ray.remote(max_concurrency=2)  # `ping` answers while a decode runs
class DecodeWorker:
    """Rank `rank` > 0 of a VAEDecoder replica's group: decodes its block of the clips rank 0 decodes."""

    def __init__(self, args: PrevizArgs, rank: int) -> None:
        self.args, self.rank = args, rank
        self.decoder: ParallelVAEDecoder | None = None

    def join(self, master_addr: str, master_port: int) -> None:
        """Load the VAE and join the group (blocks until every rank joined)."""
        vae = stage_components(self.args, "vae").vae
        self.decoder = join_decode_group(self.args, vae, self.rank, master_addr, master_port)

    def decode(self, latents: np.ndarray) -> int:
        """This rank's part of one decode; the frames it made with the others."""
        if self.decoder is None:
            raise RuntimeError(f"rank {self.rank}: `join` must succeed before `decode`.")
        return self.decoder.take_part(torch.from_numpy(latents))

    def ping(self) -> int:
        return self.rank


class DecodeGroup:
    """Rank 0's side: the worker actors, rank 0's parallel decoder, and whether every rank still answers."""

    def __init__(self, args: PrevizArgs, vae: AutoencoderKLWan, *, name: str) -> None:
        """Start the workers in this replica's placement group and form the group with them; returns once
        every rank joined. `vae` is rank 0's (a copy of it is patched). Worker r is the actor
        `decode_worker_name(name, r)`."""
        self.world_size, self.timeout_s = args.decoder.parallel, args.decoder.timeout_s
        placement = rank_placement(
            f"VAEDecoder decodes over {self.world_size} ranks (`decoder.parallel`)", self.world_size
        )
        master_addr = ray.util.get_node_ip_address()
        master_port = free_port(master_addr)
        self.workers = [
            DecodeWorker.options(
                **rank_actor_options(placement, rank, decode_worker_name(name, rank))
            ).remote(args, rank)
            for rank in range(1, self.world_size)
        ]
        joins = [worker.join.remote(master_addr, master_port) for worker in self.workers]
        leader: Future[ParallelVAEDecoder] = Future()

        def join_as_rank_0() -> None:  # concurrently with the workers: init blocks until all joined
            try:
                leader.set_result(join_decode_group(args, vae, 0, master_addr, master_port))
            except BaseException as error:
                leader.set_exception(error)

        threading.Thread(target=join_as_rank_0, name="decode-join", daemon=True).start()
        pending = list(joins)
        while pending:  # a worker that failed first (no weights, a bad port) fails the replica now
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=JOIN_POLL_S)
            for ref in done:
                ray.get(ref)
            if leader.done() and leader.exception() is not None:
                raise leader.exception()
        self.decoder = leader.result()
        logger.info("VAEDecoder: rank group of %d formed", self.world_size)

    def decode(self, latents: torch.Tensor, fps: int) -> Frames:
        """The clip decoded over every rank (each its block of every frame), as uint8 frames on rank 0."""
        ref = ray.put(latents.numpy())
        parts = [worker.decode.remote(ref) for worker in self.workers]
        try:
            frames = self.decoder.decode(latents, fps=fps)
            ray.get(parts, timeout=self.timeout_s)
        except (RuntimeError, RayError) as error:  # dist.DistBackendError is a RuntimeError
            exit_on_group_failure(f"VAEDecoder: a decode over {self.world_size} ranks failed: {error}")
        return frames

    def check(self) -> None:
        """Raise, naming the rank, when a worker died or stopped answering."""
        pings = [worker.ping.remote() for worker in self.workers]
        for rank, ping in enumerate(pings, start=1):
            try:
                ray.get(ping, timeout=PING_TIMEOUT_S)
            except RayError as error:
                raise RuntimeError(
                    f"rank {rank} of {self.world_size} of the decoder's rank group: {type(error).__name__}"
                ) from error

    def close(self) -> None:
        """Leave the group and stop the workers."""
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            for worker in self.workers:
                ray.kill(worker, no_restart=True)


def decode_worker_name(replica: str, rank: int) -> str:
    """The actor name of rank `rank` of the VAEDecoder replica named `replica` (its Serve replica actor)."""
    return f"DECODE_WORKER::{replica.removeprefix('SERVE_REPLICA::')}#rank{rank}"
