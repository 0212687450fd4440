"""MLPerf-style runs: the official LoadGen (`mlcommons-loadgen`) drives a running Previz over HTTP.

    python -m loadtest.mlperf --url http://127.0.0.1:8000 --api-key KEY --scenario Offline --out out/

MLPerf Inference v6.0's text-to-video benchmark is Wan2.2-T2V-A14B at 1280x720, 81 frames, 20 steps, CFG
4.0/3.0. Each LoadGen sample is one clip: the SUT creates a job (`POST /v1/videos`) and reports the sample
complete when the job has finished. On the `tiny` preset the shape is scaled down (printed as such);
`--shape mlperf` asks for the benchmark's own shape (a real Wan2.2 deployment).

LoadGen writes mlperf_log_summary.txt and mlperf_log_detail.txt into `--out`; `parse_summary` reads the
summary. What this runner does NOT meet of MLPerf's rules (so its numbers are "MLPerf-style", not results):
RULES_NOT_MET.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from serve.cli.client import PrevizClient

SCENARIOS = ("SingleStream", "Server", "Offline")
# MLPerf Inference v6.0 text-to-video (Wan2.2-T2V-A14B)
MLPERF_SHAPE: dict[str, Any] = {"size": "1280x720", "seconds": 5, "steps": 20, "quality": "final"}  # 81 f
# the tiny preset's scaled-down stand-in: 96x64, 0.5 s (9 frames), the same 20 steps and CFG recipe
TINY_SHAPE: dict[str, Any] = {"resolution": "96x64", "duration": 0.5, "steps": 20, "quality": "final"}
RULES_NOT_MET = (
    "no accuracy run: MLPerf gates text-to-video on a quality metric of the clips; none is computed",
    "minimum duration: MLPerf requires 600 s per performance run; --min-duration-s defaults lower here",
    "minimum query count: bounded by --count, below MLPerf's minimums",
    "dataset: built-in shot prompts, not MLPerf's prompt set",
    "on the tiny preset: random-weight model at a scaled-down shape, not Wan2.2-T2V-A14B at 1280x720x81",
)
PROMPTS = (
    "a lighthouse in a storm at night, waves breaking over the rocks",
    "a slow dolly shot down a neon-lit alley in the rain",
    "two knights clash swords in a misty forest clearing",
    "a red kite rising over a field of wheat at golden hour",
    "a crane shot over rooftops at dawn, pigeons taking off",
    "a close-up of a hand turning an old brass key in a lock",
    "a desert caravan crossing dunes under a full moon",
    "a spaceship docking with a rotating station, stars behind",
)
TERMINAL = ("completed", "failed", "cancelled")


class PrevizSUT:
    """LoadGen's system under test: each sample is one clip made by the running Previz."""

    def __init__(
        self, client: PrevizClient, shape: dict[str, Any], complete: Callable[[int, bool], None], workers: int
    ) -> None:
        self.client, self.shape, self.complete = client, shape, complete
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlperf-sut")
        self.outcomes: dict[str, int] = {}  # job status -> samples
        self._lock = threading.Lock()

    def issue(self, sample_id: int, index: int) -> None:
        self.pool.submit(self._run, sample_id, index)

    def _run(self, sample_id: int, index: int) -> None:
        status = "failed"
        try:
            body = {"prompt": PROMPTS[index % len(PROMPTS)], "seed": index, "priority": "batch", **self.shape}
            job_id = self.client.create(body)["id"]
            while (status := self.client.get(job_id)["status"]) not in TERMINAL:
                time.sleep(0.2)
        finally:
            with self._lock:
                self.outcomes[status] = self.outcomes.get(status, 0) + 1
            self.complete(sample_id, status == "completed")

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def run(
    client: PrevizClient,
    scenario: str,
    out: Path,
    *,
    count: int,
    shape: dict[str, Any],
    target_qps: float = 0.05,
    expected_latency_s: float = 30.0,
    min_duration_s: float = 0.0,
    workers: int = 64,
) -> dict[str, str]:
    """One LoadGen performance run; returns the parsed summary (and leaves LoadGen's logs in `out`)."""
    import mlperf_loadgen as lg  # mlcommons-loadgen: the `loadtest` extra

    if scenario not in SCENARIOS:
        raise ValueError(f"`scenario` must be one of {', '.join(SCENARIOS)}, not {scenario!r}.")
    settings = lg.TestSettings()
    settings.scenario = getattr(lg.TestScenario, scenario)
    settings.mode = lg.TestMode.PerformanceOnly
    settings.min_query_count = count
    settings.max_query_count = count
    settings.min_duration_ms = int(min_duration_s * 1000)
    settings.single_stream_expected_latency_ns = int(expected_latency_s * 1e9)
    settings.offline_expected_qps = max(count / max(min_duration_s, 1.0), 0.001)
    settings.server_target_qps = target_qps
    settings.server_target_latency_ns = int(4 * expected_latency_s * 1e9)

    def complete(sample_id: int, ok: bool) -> None:
        lg.QuerySamplesComplete([lg.QuerySampleResponse(sample_id, 0, 0)])

    sut_impl = PrevizSUT(client, shape, complete, workers)
    sut = lg.ConstructSUT(
        lambda samples: [sut_impl.issue(sample.id, sample.index) for sample in samples], lambda: None
    )
    qsl = lg.ConstructQSL(count, count, lambda _indices: None, lambda _indices: None)
    out.mkdir(parents=True, exist_ok=True)
    log = lg.LogOutputSettings()
    log.outdir = str(out)
    log.copy_summary_to_stdout = False
    log_settings = lg.LogSettings()
    log_settings.log_output = log
    try:
        lg.StartTestWithLogSettings(sut, qsl, settings, log_settings)
    finally:
        sut_impl.close()
        lg.DestroyQSL(qsl)
        lg.DestroySUT(sut)
    summary = parse_summary(out / "mlperf_log_summary.txt")
    summary["previz_outcomes"] = ", ".join(f"{k}={v}" for k, v in sorted(sut_impl.outcomes.items()))
    return summary


def parse_summary(path: Path) -> dict[str, str]:
    """LoadGen's mlperf_log_summary.txt as `key -> value` (its `key : value` lines; later keys win)."""
    summary: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and not line.startswith("="):
            summary[key.strip()] = value.strip()
    if "Scenario" not in summary or "Result is" not in summary:
        raise ValueError(f"{path} is not a LoadGen summary (no 'Scenario' / 'Result is' line).")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--scenario", choices=SCENARIOS, required=True)
    parser.add_argument("--count", type=int, default=8, help="samples (clips) in the run")
    parser.add_argument("--shape", choices=("tiny", "mlperf"), default="tiny")
    parser.add_argument("--target-qps", type=float, default=0.05, help="Server scenario: arrivals per second")
    parser.add_argument("--expected-latency-s", type=float, default=30.0)
    parser.add_argument("--min-duration-s", type=float, default=0.0, help="MLPerf's rule is 600")
    parser.add_argument("--out", type=Path, default=Path("mlperf-out"))
    args = parser.parse_args(argv)
    shape = TINY_SHAPE if args.shape == "tiny" else MLPERF_SHAPE
    if args.shape == "tiny":
        print(f"scaled down for the tiny preset: {shape} (MLPerf's shape: {MLPERF_SHAPE}, CFG 4.0/3.0)")
    client = PrevizClient(args.url, api_key=args.api_key, timeout_s=60)
    summary = run(
        client,
        args.scenario,
        args.out,
        count=args.count,
        shape=shape,
        target_qps=args.target_qps,
        expected_latency_s=args.expected_latency_s,
        min_duration_s=args.min_duration_s,
    )
    for key in ("Scenario", "Mode", "Result is", "Samples per second", "90th percentile latency (ns)"):
        if key in summary:
            print(f"{key}: {summary[key]}")
    print(f"previz outcomes: {summary['previz_outcomes']}; logs in {args.out}")
    print("MLPerf rules this run does not meet:")
    for rule in RULES_NOT_MET:
        print(f"  - {rule}")


if __name__ == "__main__":
    main()
