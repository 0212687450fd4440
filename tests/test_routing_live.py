"""The load-aware router on the live cluster with 2 replicas of each expert: a one-size storyboard of 8
shots (POST /v1/storyboards, as the studio page's composer sends it; all 8 videos are created in one
transaction and the Scheduler claims them together) runs on both replicas' engines (rows per replica from
Prometheus), and 2 same-shape takes created together (one shot x 2 seeds) under light load still share
forwards (one engine, fewer iterations than steps run).

The 2-replica app is a second Serve app (`previz-route`) beside the session's
(tests.support.cluster.extra_app), deployed by this module and deleted after it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from ray import serve

from serve._compat import ray_session_dir
from serve.cli.monitoring import PrometheusServer
from serve.stages.router import rendezvous_rank
from tests.support.cluster import Cluster, ExtraApp, extra_app
from tests.support.servers.prometheus import prometheus_server

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]  # the session cluster and the app start first

APP = "previz-route"
WAIT_S = 600  # bound of the waits on a loaded 2-core box; no timing is asserted
EXPORT_S = 90.0  # Ray's agents export every few seconds, then Prometheus scrapes
SHOT = {"resolution": "96x64", "duration": 0.5, "steps": 8}  # one bucket for every job
# The board's shots denoise long enough (about 30 high-noise steps) that the Scheduler's 8 claims pile up at
# the high expert: with 8 steps a tiny job left its engine before the next one's text was encoded, the
# queued work stayed inside the bound and affinity rightly kept all 8 on one replica.
BOARD_SHOT = {**SHOT, "steps": 48}
DENOISERS = ("HighNoiseDenoiser", "LowNoiseDenoiser")


def two_of_each_expert(app: dict[str, Any]) -> None:
    for entry in app["deployments"]:
        if entry["name"] in DENOISERS:
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


def test_a_one_size_storyboard_of_8_shots_runs_on_both_replicas_of_each_expert(
    routed: ExtraApp, prometheus: PrometheusServer
) -> None:
    shots = [{"prompt": f"board shot {i}", "seed": i} for i in range(8)]
    board = routed.client.create_storyboard({"title": "one-size board", **BOARD_SHOT, "shots": shots})
    assert board["num_videos"] == 8
    assert _wait_board(routed, board["id"])["counts"] == {"completed": 8}
    timings = [routed.client.get(video["video_id"])["timings"] for video in board["shots"][0]["videos"]]
    print(f"\nfirst shot's stage seconds: {timings}")
    both = lambda rows: len(rows) == 2 and min(rows.values()) > 0  # noqa: E731 (a series shows once exported)
    for deployment in DENOISERS:
        rows = _rows_per_replica(prometheus, deployment, both)
        print(f"{deployment} rows per replica: {rows}")
        assert len(rows) == 2 and all(count > 0 for count in rows.values()), rows
    # The other replica got rows only through decisions that gave affinity up (Serve's fallback tier is
    # never tried below max_ongoing_requests), counted under this app, apart from the session's.
    spread = lambda found: all(found.get((name, "given_up"), 0) > 0 for name in DENOISERS)  # noqa: E731
    decisions = _decisions(prometheus, spread)
    print(f"routing decisions of {APP}: {decisions}")
    for deployment in DENOISERS:
        assert decisions.get((deployment, "kept"), 0) > 0 and decisions.get((deployment, "given_up"), 0) > 0


def test_two_same_shape_takes_created_together_under_light_load_share_forwards(
    routed: ExtraApp, prometheus: PrometheusServer
) -> None:
    rows_before, before = _exported_engine_counts(prometheus, "HighNoiseDenoiser")
    board = routed.client.create_storyboard(
        {**SHOT, "shots": [{"prompt": "a pair of takes"}], "variants": {"seeds": [100, 101]}}
    )
    assert _wait_board(routed, board["id"])["counts"] == {"completed": 2}
    rows_after, after = _exported_engine_counts(prometheus, "HighNoiseDenoiser")
    changed = [replica for replica in rows_after if rows_after[replica] != rows_before.get(replica, 0)]
    assert len(changed) == 1, (rows_before, rows_after)  # both takes met on one replica
    iterations = after - before
    high_steps = (sum(rows_after.values()) - sum(rows_before.values())) / 2 / 2  # rows: 2 takes x CFG
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


def _decisions(prometheus: PrometheusServer, ready: Any) -> dict[tuple[str, str], float]:
    """(deployment, affinity) -> routing decisions of this module's app, once `ready` holds or EXPORT_S."""
    expr = f'sum by (deployment, affinity) (ray_previz_routing_decisions_total{{application="{APP}"}})'
    deadline, found = time.monotonic() + EXPORT_S, {}
    while time.monotonic() < deadline:
        rows = prometheus.query(expr)
        found = {(r["metric"]["deployment"], r["metric"]["affinity"]): float(r["value"][1]) for r in rows}
        if ready(found):
            return found
        time.sleep(1)
    return found


def _exported_engine_counts(prometheus: PrometheusServer, deployment: str) -> tuple[dict[str, float], float]:
    """(rows per replica, iterations) of `deployment`'s engines as Prometheus has them, once they equal what
    the engines themselves count: each replica reports on a period and Ray exports on another, so a read
    right after a board finished could miss its last rows (or the previous test's), or see part of them."""
    engines = _engine_counts(deployment)
    rows_wanted = {replica: float(rows) for replica, (rows, _) in engines.items() if rows > 0}
    iterations_wanted = float(sum(iterations for _, iterations in engines.values()))
    replicas = "|".join(engines)
    rows_expr = f'sum by (replica) (ray_previz_denoise_rows_total{{replica=~"{replicas}"}})'
    iterations_expr = f'sum(ray_previz_denoise_iterations_total{{replica=~"{replicas}"}})'
    deadline, rows, iterations = time.monotonic() + EXPORT_S, {}, 0.0
    while time.monotonic() < deadline:
        rows = {r["metric"]["replica"]: float(r["value"][1]) for r in prometheus.query(rows_expr)}
        result = prometheus.query(iterations_expr)
        iterations = float(result[0]["value"][1]) if result else 0.0
        if rows == rows_wanted and iterations == iterations_wanted:
            return rows, iterations
        time.sleep(1)
    raise AssertionError(
        f"Prometheus has {rows} rows and {iterations} iterations of {deployment}, the engines "
        f"{rows_wanted} and {iterations_wanted} after {EXPORT_S:.0f} s"
    )


def _engine_counts(deployment: str) -> dict[str, tuple[int, int]]:
    """Replica id -> (rows, iterations) its engine counts, asked of each replica of this module's app by a
    `stats(bucket)` call with a bucket that replica is the rendezvous choice of (idle, it keeps it)."""
    handle = serve.get_deployment_handle(deployment, app_name=APP)
    replicas = _replica_ids(deployment)
    deadline, counts = time.monotonic() + WAIT_S, {}
    for index in itertools.count():
        if counts.keys() == set(replicas):
            return counts
        assert time.monotonic() < deadline, (replicas, counts)
        bucket = f"stats-{index}"
        if rendezvous_rank(bucket, replicas)[0] not in counts:
            replica, stats = handle.stats.remote(bucket=bucket).result()
            counts[replica] = (stats.num_rows, stats.num_iterations)
    raise AssertionError("unreachable")


def _wait_board(app: ExtraApp, board_id: str) -> dict[str, Any]:
    """The storyboard once every video on it finished, as the board page polls it."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        board = app.client.get_storyboard(board_id)
        if board["status"] in ("completed", "failed"):
            return board
        time.sleep(0.5)
    raise AssertionError(f"storyboard {board_id} did not finish in {WAIT_S} s: {board['counts']}")
