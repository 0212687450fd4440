"""The GPU configs hold together: every sharded expert reserves one GPU bundle per rank on one 8-GPU node,
its replica fits bundle 0, its degree divides A14B's 40 heads and the presets' token counts, and
gpu-node.yaml uses exactly its node's 8 GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.denoise.parallel import heads_problem, shape_problem
from pipeline.spec import ModelSpec
from serve.cli import launch
from serve.config import PrevizArgs
from serve.sharding import A14B_NUM_HEADS, DEPLOYMENT_NAMES

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
GPUS_PER_NODE = 8


def app_of(name: str) -> tuple[PrevizArgs, dict[str, dict]]:
    (app,) = launch.load_config(DEPLOY / name)["applications"]
    return PrevizArgs.model_validate(app["args"]), {entry["name"]: entry for entry in app["deployments"]}


@pytest.mark.parametrize("name", ["gpu-node.yaml", "cluster.yaml"])
def test_sharded_experts_reserve_a_gpu_per_rank_on_one_node(name: str) -> None:
    args, deployments = app_of(name)
    for expert, deployment in DEPLOYMENT_NAMES.items():
        degree = args.experts.of(expert).parallel.degree
        entry = deployments[deployment]
        assert heads_problem(A14B_NUM_HEADS, degree) is None, (deployment, degree)
        for width, height in ((1280, 720), (832, 480)):  # the presets at 81 frames
            assert shape_problem(width, height, 81, degree, model=ModelSpec(), num_heads=40) is None
        bundles = entry.get("placement_group_bundles", [{"GPU": entry["ray_actor_options"]["num_gpus"]}])
        assert len(bundles) == degree.world_size and all(bundle["GPU"] == 1 for bundle in bundles), deployment
        assert len(bundles) <= GPUS_PER_NODE
        if degree.is_sharded:
            assert entry["placement_group_strategy"] == "STRICT_PACK"
            actor = entry["ray_actor_options"]
            assert actor["num_gpus"] <= bundles[0]["GPU"] and actor["num_cpus"] <= bundles[0]["CPU"]


def test_gpu_node_uses_exactly_its_eight_gpus() -> None:
    _, deployments = app_of("gpu-node.yaml")
    total = 0.0
    for entry in deployments.values():
        per_replica = sum(bundle.get("GPU", 0) for bundle in entry.get("placement_group_bundles", []))
        per_replica = per_replica or entry.get("ray_actor_options", {}).get("num_gpus", 0)
        total += entry.get("num_replicas", 1) * per_replica
    assert total == pytest.approx(GPUS_PER_NODE)
