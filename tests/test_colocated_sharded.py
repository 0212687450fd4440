"""A colocated replica on a rank group (gloo, spawned, Ulysses 2): one group holds both experts on every
rank, and one ColocatedEngine on rank 0 runs a draft (distill LoRA), a final, a cached final and a style-LoRA
final, joining at staggered steps, to the unsharded split pair's latents (fp32); every rank frees the
cached residuals of the requests that finished."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.denoise.calibration import calibration_curve
from pipeline.denoise.colocated import ColocatedEngine
from pipeline.denoise.parallel import GroupRunner, ParallelDegree, ShardGroup, worker_loop
from pipeline.denoise.runner import Holding
from pipeline.text import TextEncoder
from pipeline.weights import build_preset
from tests.test_colocated import CASES, MAX_ABS_DIFF, engines, load_banks, lora_folders, request, run_split

DEGREE = ParallelDegree(ulysses=2)  # 72 video tokens and 2 heads divide by 2
JOINS = {0: ["cached", "styled"], 2: ["draft"], 5: ["final"]}  # iteration -> requests joining then


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def colocated_rank(rank: int, world_size: int, port: int, out: Path, loras: Path) -> None:
    """Every rank: the tiny preset's two experts with the same adapters, sharded; rank 0 drives the engine."""
    torch.set_num_threads(1)  # the ranks share this machine's two cores
    group = ShardGroup.init(
        rank, world_size, "127.0.0.1", port, ulysses=DEGREE.ulysses, cfg=DEGREE.cfg, timeout_s=120
    )
    tiny = build_preset("tiny")
    banks = load_banks(tiny, lora_folders(loras))  # before sharding, as a replica loads them
    transformers = {"high": group.shard(tiny.transformer), "low": group.shard(tiny.transformer_2)}
    holdings = {expert: Holding(transformers[expert], banks[expert]) for expert in transformers}
    if rank != 0:
        worker_loop(group, holdings)
        torch.save(
            {expert: len(holding.store) for expert, holding in holdings.items()}, out / f"rank{rank}.pt"
        )
        group.close()
        return
    curve = calibration_curve("tiny", tiny.model)
    pair = engines(tiny, banks, curve, runner=GroupRunner(group, holdings), transformers=transformers)
    engine = ColocatedEngine(pair["high"], pair["low"])
    encoder = TextEncoder(
        tiny.tokenizer, tiny.text_encoder, max_sequence_length=tiny.model.max_sequence_length
    )
    futures = {}
    for iteration in itertools.count():
        for request_id in JOINS.get(iteration, []):
            futures[request_id] = engine.submit(request(tiny, encoder, request_id))
        if iteration > max(JOINS) and all(future.done() for future in futures.values()):
            break
        engine.step()
        assert iteration < 200, "the colocated engine made no progress"
    stats = engine.stats()
    results = {
        "latents": {request_id: future.result().latents for request_id, future in futures.items()},
        "cached_steps": {expert: stats[expert].num_cached_steps for expert in stats},
        "handovers": engine.num_boundary_handovers,
        "residuals": {expert: len(holding.store) for expert, holding in holdings.items()},
    }
    group.close()
    torch.save(results, out / "rank0.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    out, loras = tmp_path_factory.mktemp("colocated-u2"), tmp_path_factory.mktemp("loras")
    lora_folders(loras)  # written once here; every rank reads the same files
    mp.start_processes(
        colocated_rank,
        args=(DEGREE.world_size, free_port(), out, loras),
        nprocs=DEGREE.world_size,
        join=True,
        start_method="spawn",
    )
    return {rank: torch.load(out / f"rank{rank}.pt") for rank in range(DEGREE.world_size)}


def test_a_sharded_colocated_replica_equals_the_unsharded_split_pair(ranks, tmp_path: Path) -> None:
    tiny = build_preset("tiny")
    banks = load_banks(tiny, lora_folders(tmp_path))
    encoder = TextEncoder(
        tiny.tokenizer, tiny.text_encoder, max_sequence_length=tiny.model.max_sequence_length
    )
    curve = calibration_curve("tiny", tiny.model)
    items = [request(tiny, encoder, request_id) for request_id in CASES]
    expected = run_split(engines(tiny, banks, curve), items)
    leader = ranks[0]
    assert set(leader["latents"]) == set(CASES)
    for request_id in CASES:
        diff = float((leader["latents"][request_id] - expected[request_id].latents).abs().max())
        assert diff <= MAX_ABS_DIFF, (request_id, diff)
    assert leader["handovers"] == len(CASES)  # every request crossed in memory on the group
    assert leader["cached_steps"]["high"] > 0  # the cached final skipped steps on the group


def test_every_rank_freed_the_residuals_of_the_finished_requests(ranks) -> None:
    for rank, saved in ranks.items():
        residuals = saved["residuals"] if rank == 0 else saved
        assert residuals == {"high": 0, "low": 0}, rank
