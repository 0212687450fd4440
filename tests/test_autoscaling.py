"""Denoisers autoscale on queued work: the policy asks for the replicas the reported work needs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from serve.stages.autoscaling import QUEUED_WORK_METRIC, QueuedWorkPolicy, replicas_for_work


def test_replicas_follow_the_queued_work_not_the_calls() -> None:
    assert replicas_for_work({"a": 300.0, "b": 180.0}, current=2, target_queued_s=120) == 4
    assert replicas_for_work({"a": 0.0, "b": 0.0}, current=3, target_queued_s=120) == 1
    assert replicas_for_work({}, current=3, target_queued_s=120) == 3  # no report yet: stay
    with pytest.raises(ValueError, match="target_queued_seconds"):
        replicas_for_work({"a": 1.0}, current=1, target_queued_s=0)


def test_the_policy_reads_the_replicas_reports_from_serves_context() -> None:
    ctx = AutoscalingContext(
        deployment_id=None, deployment_name="Denoiser", app_name="previz", current_num_replicas=2,
        target_num_replicas=2, running_replicas=[], total_num_requests=40.0, total_queued_requests=0.0,
        aggregated_metrics={QUEUED_WORK_METRIC: {"r1": 900.0, "r2": 300.0}}, raw_metrics=None,
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=24, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=None,
    )  # fmt: skip
    assert QueuedWorkPolicy(target_queued_seconds=200)(ctx) == (6, {})


def test_serve_accepts_the_policy_by_import_path_with_its_kwargs() -> None:
    policy = AutoscalingPolicy(
        policy_function="serve.stages.autoscaling:QueuedWorkPolicy",
        policy_kwargs={"target_queued_seconds": 60},
    )
    assert policy.policy_kwargs == {"target_queued_seconds": 60}


def test_the_cluster_configs_denoiser_scales_on_queued_work() -> None:
    config = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "cluster.yaml").read_text())
    (denoiser,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "Denoiser"]
    autoscaling = AutoscalingConfig(**denoiser["autoscaling_config"])
    assert autoscaling.policy.policy_function == "serve.stages.autoscaling:QueuedWorkPolicy"
    assert QueuedWorkPolicy(**autoscaling.policy.policy_kwargs).target_queued_seconds > 0
