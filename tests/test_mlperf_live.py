"""MLPerf LoadGen drives the session cluster: bounded Offline and SingleStream runs complete, and the
summary LoadGen writes is parsed. Needs `mlcommons-loadgen` (the `loadtest` extra)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.mlperf import TINY_SHAPE, parse_summary, run
from tests.support.cluster import Cluster

pytest.importorskip("mlperf_loadgen")
pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("scenario", ["Offline", "SingleStream"])
def test_a_bounded_loadgen_run_completes_and_its_summary_parses(
    cluster: Cluster, tmp_path: Path, scenario: str
) -> None:
    summary = run(
        cluster.client("mlperf"), scenario, tmp_path, count=2, shape=TINY_SHAPE, expected_latency_s=20
    )
    print(f"\n{scenario}: {summary}")
    assert summary["Scenario"].replace(" ", "") == scenario
    assert summary["previz_outcomes"] == "completed=2"
    assert summary["Result is"] in ("VALID", "INVALID")  # INVALID: below MLPerf's minimum duration and count
    assert (tmp_path / "mlperf_log_detail.txt").stat().st_size > 0
    rate = "Samples per second" if scenario == "Offline" else "QPS w/o loadgen overhead"
    assert float(summary[rate]) > 0
    assert parse_summary(tmp_path / "mlperf_log_summary.txt") == {
        k: v for k, v in summary.items() if k != "previz_outcomes"
    }
