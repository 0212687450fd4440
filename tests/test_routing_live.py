"""The load-aware router on the live cluster with 2 replicas of each expert: a one-size board of 8 jobs runs
on both replicas' engines (rows per replica from Prometheus), and 2 same-shape jobs created together under
light load still share forwards (one engine, fewer iterations than steps run).

The 2-replica app is a second Serve app (`previz-route`) beside the session's
(tests.support.cluster.extra_app), deployed by this module and deleted after it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from serve._compat import ray_session_dir
from serve.cli.monitoring import PrometheusServer
from tests.support.cluster import Cluster, ExtraApp, extra_app
from tests.support.servers.prometheus import prometheus_server

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]  # the session cluster and the app start first

APP = "previz-route"
WAIT_S = 600  # bound of the waits on a loaded 2-core box; no timing is asserted
EXPORT_S = 90.0  # Ray's agents export every few seconds, then Prometheus scrapes
SHOT = {"resolution": "96x64", "duration": 0.5, "steps": 8}  # one bucket for every job


def two_of_each_expert(app: dict[str, Any]) -> None:
    for entry in app["deployments"]:
        if entry["name"] in ("HighNoiseDenoiser", "LowNoiseDenoiser"):
            entry["num_replicas"] = 2


@pytest.fixture(scope="module")
def routed(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExtraApp]:
    with extra_app(
        cluster, APP, tmp_path_factory.mktemp("route"), two_of_each_expert, timeout_s=WAIT_S
    ) as app:
        yield app


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster) -> Iterator[PrometheusServer]:
    with prometheus_server(ray_session_dir()) as server:
        yield server


def test_a_one_size_board_runs_on_both_replicas_of_each_expert(
    routed: ExtraApp, prometheus: PrometheusServer
) -> None:
    ids = [routed.client.create({"prompt": f"board shot {i}", "seed": i, **SHOT})["id"] for i in range(8)]
    for job_id in ids:
        assert _wait(routed, job_id)["status"] == "completed"
    for deployment in ("HighNoiseDenoiser", "LowNoiseDenoiser"):
        rows = _rows_per_replica(prometheus, deployment, lambda rows: min(rows.values(), default=0) > 0)
        print(f"\n{deployment} rows per replica: {rows}")
        assert len(rows) == 2 and all(count > 0 for count in rows.values()), rows


def test_two_same_shape_jobs_created_together_under_light_load_share_forwards(
    routed: ExtraApp, prometheus: PrometheusServer
) -> None:
    before = _iterations(prometheus, "HighNoiseDenoiser")
    rows_before = _rows_per_replica(prometheus, "HighNoiseDenoiser", lambda _rows: True)
    ids = [routed.client.create({"prompt": f"pair {i}", "seed": 100 + i, **SHOT})["id"] for i in range(2)]
    jobs = [_wait(routed, job_id) for job_id in ids]
    assert all(job["status"] == "completed" for job in jobs)
    grew = lambda rows: sum(rows.values()) > sum(rows_before.values())  # noqa: E731
    rows_after = _rows_per_replica(prometheus, "HighNoiseDenoiser", grew)
    changed = [replica for replica in rows_after if rows_after[replica] != rows_before.get(replica, 0)]
    assert len(changed) == 1, (rows_before, rows_after)  # both jobs met on one replica
    iterations = _iterations(prometheus, "HighNoiseDenoiser") - before
    high_steps = (sum(rows_after.values()) - sum(rows_before.values())) / 2 / 2  # rows: 2 jobs x CFG
    assert 0 < iterations < 2 * high_steps, (iterations, high_steps)  # some forwards carried both


def _replica_ids(deployment: str) -> list[str]:
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)]
    return sorted(name.rsplit("#", 1)[1] for name in names if name.startswith(prefix))


def _rows_per_replica(prometheus: PrometheusServer, deployment: str, ready: Any) -> dict[str, float]:
    replicas = _replica_ids(deployment)
    expr = f'sum by (replica) (ray_previz_denoise_rows_total{{replica=~"{"|".join(replicas)}"}})'
    deadline, rows = time.monotonic() + EXPORT_S, {}
    while time.monotonic() < deadline:
        rows = {r["metric"]["replica"]: float(r["value"][1]) for r in prometheus.query(expr)}
        if ready(rows):
            return rows
        time.sleep(1)
    return rows


def _iterations(prometheus: PrometheusServer, deployment: str) -> float:
    replicas = _replica_ids(deployment)
    expr = f'sum(ray_previz_denoise_iterations_total{{replica=~"{"|".join(replicas)}"}})'
    result = prometheus.query(expr)
    return float(result[0]["value"][1]) if result else 0.0


def _wait(app: ExtraApp, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = app.client.get(job_id)
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {WAIT_S} s")
