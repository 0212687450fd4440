"""The GPU configs hold together: every sharded denoiser (either layout) reserves one GPU bundle per rank on
one 8-GPU node (a whole GPU, or more than half of one, so no two ranks share a GPU), its replica fits bundle
0, its degree divides A14B's 40 heads and the presets' token counts, and gpu-node.yaml's ranks cover its
node's 8 GPUs without asking for more."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.denoise.parallel import heads_problem, shape_problem
from pipeline.spec import ModelSpec
from serve.cli import launch
from serve.config import PrevizArgs
from serve.sharding import A14B_NUM_HEADS
from serve.stages import colocated, denoiser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
GPUS_PER_NODE = 8


def app_of(name: str) -> tuple[PrevizArgs, dict[str, dict]]:
    (app,) = launch.load_config(DEPLOY / name)["applications"]
    return PrevizArgs.model_validate(app["args"]), {entry["name"]: entry for entry in app["deployments"]}


@pytest.mark.parametrize("name", ["gpu-node.yaml", "cluster.yaml"])
def test_sharded_experts_reserve_a_gpu_per_rank_on_one_node(name: str) -> None:
    args, deployments = app_of(name)
    for expert in ("high", "low"):
        degree = args.experts.of(expert).parallel.degree
        deployment = args.experts.deployment(expert)
        entry = deployments[deployment]
        assert heads_problem(A14B_NUM_HEADS, degree) is None, (deployment, degree)
        for width, height in ((1280, 720), (832, 480)):  # the presets at 81 frames
            assert shape_problem(width, height, 81, degree, model=ModelSpec(), num_heads=40) is None
        bundles = entry.get("placement_group_bundles", [{"GPU": entry["ray_actor_options"]["num_gpus"]}])
        assert len(bundles) == degree.world_size, deployment
        assert all(0.5 < bundle["GPU"] <= 1 for bundle in bundles), deployment
        assert len(bundles) <= GPUS_PER_NODE
        if degree.is_sharded:
            assert entry["placement_group_strategy"] == "STRICT_PACK"
            actor = entry["ray_actor_options"]
            assert actor["num_gpus"] <= bundles[0]["GPU"] and actor["num_cpus"] <= bundles[0]["CPU"]


def test_gpu_node_spreads_its_denoiser_ranks_over_all_eight_gpus_and_asks_for_no_more() -> None:
    args, deployments = app_of("gpu-node.yaml")
    total, ranks = 0.0, 0
    for name, entry in deployments.items():
        bundles = entry.get("placement_group_bundles", [])
        per_replica = sum(bundle.get("GPU", 0) for bundle in bundles)
        per_replica = per_replica or entry.get("ray_actor_options", {}).get("num_gpus", 0)
        total += entry.get("num_replicas", 1) * per_replica
        if name in args.experts.deployment_names:
            ranks += entry.get("num_replicas", 1) * len(bundles)
    assert ranks == GPUS_PER_NODE and total <= GPUS_PER_NODE


@pytest.mark.parametrize("name", ["gpu-node.yaml", "cluster.yaml"])
def test_the_denoisers_queue_work_in_their_engines_and_drafts_have_a_lane(name: str) -> None:
    """Priority acts in the engines only if Serve's FIFO queue never holds the backlog: one denoiser replica
    must take every job the Scheduler keeps in flight (the load-aware router may send them all to one). The
    config states its lanes and the router's bound, and keeps slots for interactive shots."""
    args, deployments = app_of(name)
    default_limit = expert_options(args)["max_ongoing_requests"]  # what build_app binds
    for deployment in args.experts.deployment_names:
        limit = deployments[deployment].get("max_ongoing_requests", default_limit)
        assert limit >= args.max_jobs_in_flight, (deployment, limit, args.max_jobs_in_flight)
    assert args.lanes is not None and args.reserved_slots["interactive"] > 0
    assert "load_factor" in args.routing.model_fields_set and args.routing.load_factor >= 1.0


@pytest.mark.parametrize("layout", ["split", "colocated"])
def test_a_denoiser_replica_takes_every_job_in_flight_however_many_there_are(layout: str) -> None:
    """256 calls a replica, or `max_jobs_in_flight` where a config keeps more jobs in flight than that."""
    limits = {
        jobs: expert_options(PrevizArgs(max_jobs_in_flight=jobs, experts={"layout": layout}))
        for jobs in (8, 96, 256, 400)
    }
    assert {jobs: options["max_ongoing_requests"] for jobs, options in limits.items()} == {
        8: 256,
        96: 256,
        256: 256,
        400: 400,
    }


def expert_options(args: PrevizArgs) -> dict:
    """The Serve options build_app binds the (first) expert deployment with."""
    if args.experts.layout == "colocated":
        return colocated.default_options(args)
    return denoiser.default_options(args, "high")
