"""Autoscaling the denoisers on queued work, not on calls (Ray Serve 2.60's custom autoscaling policy).

Serve's default policy scales on ongoing requests per replica. For a denoiser that is the wrong signal: a
call is a whole expert's worth of steps, 4 for a draft and 26 for a final, at 480p or 720p, so 16 calls
can be a minute's work or an hour's. Each denoiser replica reports its engine's queued work in seconds
(`record_autoscaling_stats` -> {"queued_work_seconds": tokens x steps left at its measured step rate});
Serve aggregates it per replica and calls `QueuedWorkPolicy` on the controller, which asks for as many
replicas as the total work needs at `target_queued_seconds` each. Serve still applies the deployment's
min/max replicas and its upscale/downscale delays around the decision.

Configured in a Serve config as
    autoscaling_config:
      policy: {policy_function: serve.stages.autoscaling:QueuedWorkPolicy,
               policy_kwargs: {target_queued_seconds: 120}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ray.serve.config import AutoscalingContext

QUEUED_WORK_METRIC = "queued_work_seconds"  # the key replicas report and the policy reads
DEFAULT_TARGET_QUEUED_S = 120.0


def replicas_for_work(work_by_replica: Mapping[Any, float], current: int, target_queued_s: float) -> int:
    """Replicas the queued work needs at `target_queued_s` each; `current` while no replica has reported
    (a fresh deployment), so a missing report never scales anything down."""
    if target_queued_s <= 0:
        raise ValueError(f"`target_queued_seconds` must be > 0, got {target_queued_s}.")
    if not work_by_replica:
        return current
    return max(1, math.ceil(sum(work_by_replica.values()) / target_queued_s))


class QueuedWorkPolicy:
    """Serve custom autoscaling policy (a class, so Serve passes `policy_kwargs` to the constructor)."""

    def __init__(self, target_queued_seconds: float = DEFAULT_TARGET_QUEUED_S) -> None:
        if target_queued_seconds <= 0:
            raise ValueError(f"`target_queued_seconds` must be > 0, got {target_queued_seconds}.")
        self.target_queued_seconds = target_queued_seconds

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        work = (ctx.aggregated_metrics or {}).get(QUEUED_WORK_METRIC, {})
        desired = replicas_for_work(work, ctx.current_num_replicas, self.target_queued_seconds)
        return desired, ctx.policy_state
