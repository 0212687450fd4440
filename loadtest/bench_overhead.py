"""The cluster's overhead per job: wall time from create to completed minus the stages' own compute.

Deploys deploy/local.yaml (a local Ray instance, SQLite and artifacts in a temporary folder) on a preset,
submits jobs one at a time (so no job waits behind another), and for each completed job takes from the
store its wall time (created_at -> finished_at) and its stage timings (the seconds each stage's replica
reports; the encode as the Scheduler measured it). Overhead = wall - sum(timings): claiming, the hops
between deployments, moving data, store writes. Printed, not asserted.

    flock /tmp/previz-ray.lock python -m loadtest.bench_overhead --model small --jobs 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from serve.cli import launch
from serve.cli.client import PrevizClient
from serve.jobs import JobStore
from serve.webhooks import open_job_store

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", help="Model preset (tiny, small) or a Diffusers folder.")
    parser.add_argument("--jobs", type=int, default=5, help="Jobs measured (after one warm-up job).")
    parser.add_argument("--resolution", default="96x64")
    parser.add_argument("--duration", type=float, default=0.5, help="Seconds of video per job.")
    parser.add_argument("--steps", type=int, default=8)
    return parser.parse_args()


def run_job(client: PrevizClient, store: JobStore, body: dict) -> tuple[float, float]:
    """(wall seconds create -> completed, the stages' compute seconds) of one job run alone."""
    job_id = client.create(body)["id"]
    while (job := store.get(job_id)) is None or not job.is_finished:
        time.sleep(0.05)
    if job.status.api_state != "completed":
        raise RuntimeError(f"job {job_id} ended {job.status.name}: {job.error_message}")
    assert job.finished_at is not None
    return (job.finished_at - job.created_at).total_seconds(), sum(job.timings.values())


def main() -> None:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="previz-bench-overhead-"))
    database_url = f"sqlite:///{workdir / 'jobs.db'}"
    config = launch.load_config(
        REPO / "deploy" / "local.yaml",
        port=8765,
        args_overrides={
            "model": args.model,
            "database_url": database_url,
            "storage": {"kind": "local", "local_root": str(workdir / "artifacts")},
            "poll_interval_s": 0.5,  # the default: the claim loop's wait is part of the overhead
            "envelope": {"min_pixels": 64 * 64},
        },
    )
    url = launch.deploy(config)
    try:
        launch.wait_ready(url, timeout_s=900)
        store = open_job_store(database_url)
        store.create_project("bench")
        client = PrevizClient(url, api_key=store.create_key("bench")[1], timeout_s=60)
        body = {
            "prompt": "a lighthouse in a storm",
            "project": "bench",
            "resolution": args.resolution,
            "duration": args.duration,
            "steps": args.steps,
        }
        run_job(client, store, body)  # warm-up: first calls load code paths and caches
        rows = [run_job(client, store, {**body, "seed": 100 + index}) for index in range(args.jobs)]
    finally:
        launch.shutdown()
    shares = [(wall - compute) / compute for wall, compute in rows]
    for index, (wall, compute) in enumerate(rows):
        print(f"job {index}: wall {wall:.2f} s, compute {compute:.2f} s, overhead {wall - compute:.2f} s")
    walls, computes = [wall for wall, _ in rows], [compute for _, compute in rows]
    print(
        f"model {args.model}, {args.resolution}, {args.duration} s, {args.steps} steps, {args.jobs} jobs: "
        f"median wall {statistics.median(walls):.2f} s, median compute {statistics.median(computes):.2f} s, "
        f"median overhead {100 * statistics.median(shares):.1f} % of compute"
    )


if __name__ == "__main__":
    main()
