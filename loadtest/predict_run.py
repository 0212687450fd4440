"""What the capacity simulator predicts for a measured studio_load run, beside what was measured.

    python -m loadtest.predict_run run.json      # run.json written by `python -m loadtest.studio_load --json`

The simulator is fed the stage times the run measured (medians of its videos' timings) and replays the
run's arrivals on the local cluster's replica set; the table compares predicted and measured p50/p95.
(Its own module: loadtest.capacity is what loadtest.studio_load builds on, so neither imports the other
back.)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from loadtest.capacity import Cluster, Shot, Tier, percentile, simulate
from loadtest.cost_model import ONE_GPU, CostModel
from loadtest.studio_load import LoadPlan, VideoRecord
from pipeline.denoise.parallel import ParallelDegree

HIGH_SHARE = 26 / 40  # of a run's steps in the high-noise expert (Wan2.2's boundary at 40 steps)


class MeasuredCosts(CostModel):
    """A cost model whose step and serial times are those a run measured (per step and row, alone)."""

    def __init__(self, step_s_per_row: float, serial_s: float) -> None:
        super().__init__()
        object.__setattr__(self, "_step", step_s_per_row)
        object.__setattr__(self, "_serial", serial_s)

    def forward_s(self, num_tokens: int, num_rows: int, degree: ParallelDegree = ONE_GPU) -> float:
        return self._step * num_rows

    def serial_s(self, width: int, height: int, num_frames: int) -> float:
        return self._serial


def predict_measured(run: dict[str, Any]) -> str:
    """The simulator fed the stage times a studio_load run measured (medians of its videos' timings),
    replaying the run's arrivals on the local cluster's replica set; predicted vs measured p50/p95."""
    plan = LoadPlan(**run["plan"])
    records = [VideoRecord(**record) for record in run["records"] if record["done_s"] is not None]
    steps = {"draft": plan.draft_steps, "final": plan.final_steps}
    rows = {"draft": 2, "final": 2}  # tiny runs CFG on both tiers when tiers are step counts
    per_row = [
        (r.timings.get("denoise_high", 0) + r.timings.get("denoise_low", 0)) / (steps[r.tier] * rows[r.tier])
        for r in records
        if r.timings
    ]
    serial = statistics.median(r.timings.get("decode", 0) + r.timings.get("upscale", 0) for r in records)
    model = MeasuredCosts(statistics.median(per_row), serial)
    shots = [
        Shot(i, r.project, r.klass, r.tier, plan.size, r.arrival_s, num_frames=round(plan.seconds * 16) + 1)
        for i, r in enumerate(records)
    ]
    cluster = Cluster(
        high_replicas=1,
        low_replicas=1,
        high_degree=ParallelDegree(),
        low_degree=ParallelDegree(),
        decode_replicas=1,
        max_jobs_in_flight=8,
        max_batch_size=16,
        max_num_tokens=262_144,
        text_s=statistics.median(r.timings.get("encode", 0) for r in records),
        finish_s=statistics.median(r.timings.get("finish", 0) for r in records),
    )
    tiers = {
        name: Tier(name, math.ceil(count * HIGH_SHARE), count - math.ceil(count * HIGH_SHARE), True)
        for name, count in steps.items()
    }
    report = simulate(shots, cluster, model, "previz", tiers)
    lines = ["class                 measured p50   model p50   measured p95   model p95"]
    for name, predicted in report.latency_s.items():
        measured = [r.done_s - r.arrival_s for r in records if f"{r.klass}/{r.tier}" == name]
        m50, m95 = percentile(measured, 50), percentile(measured, 95)
        error50 = 100 * (predicted["p50"] - m50) / m50
        error95 = 100 * (predicted["p95"] - m95) / m95
        lines.append(
            f"{name:20} {m50:12.2f}  {predicted['p50']:10.2f}  {m95:13.2f}  {predicted['p95']:10.2f}"
            f"   ({error50:+.0f} % / {error95:+.0f} %)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a loadtest.studio_load JSON")
    args = parser.parse_args(argv)
    print(predict_measured(json.loads(args.run.read_text())))


if __name__ == "__main__":
    main()
