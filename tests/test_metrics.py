"""Metrics, dashboards and alert rules, verified against a real Prometheus scraping the live cluster."""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from ray.serve import context as serve_context
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve._private.config import DeploymentConfig

from pipeline.priority import PRIORITIES
from pipeline.stages import job_plan
from serve import metrics as metrics_module
from serve._compat import ray_session_dir
from serve.cli.monitoring import PROMETHEUS_DIR, PrometheusServer, prometheus_config
from serve.metrics import FIRST_EVENT_METRICS, GPU_ONLY_METRICS, exported_name, metrics
from tests.support.cluster import Cluster
from tests.support.fake_stages import empty_store, scheduler_args
from tests.support.job_requests import job_request
from tests.support.servers.prometheus import prometheus_server, promtool

REPO = Path(__file__).resolve().parents[1]
GRAFANA_DIR = REPO / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
ALERTS = PROMETHEUS_DIR / "alerts.yml"
SMALL = {"resolution": "96x64", "duration": 0.5, "steps": 4}
NUM_JOBS = 3
STAGES = {row.name for row in job_plan()}  # every stage a text-to-video job runs
# Grafana template variables -> what they stand for when evaluated outside Grafana.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$application": ".*",
    "$project": ".*",
}
METRIC_NAME = re.compile(r"\b((?:ray|previz)_[a-zA-Z0-9_:]+)")
EXPORT_TIMEOUT_S = 90.0  # Ray's agents export every few seconds, then Prometheus scrapes every second
SESSION_APP = "previz"  # the session cluster's Serve app (deploy/local.yaml)
# What the Scheduler and Housekeeping publish (one of each per Serve app): labelled with their app.
IN_APP_METRICS = {
    "previz_jobs",
    "previz_jobs_stored",
    "previz_jobs_finished_total",
    "previz_queue_jobs",
    "previz_queue_oldest_age_seconds",
    "previz_job_stalled_seconds",
    "previz_queue_wait_seconds",
    "previz_job_seconds",
    "previz_stage_seconds",
    "previz_job_compute_seconds_total",
    "previz_scheduler_passes_total",
    "previz_cuts",
    "previz_cuts_finished_total",
    "previz_cut_render_seconds",
    "previz_lane_jobs",
    "previz_webhook_deliveries_total",
}


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every target and query variable of every dashboard."""
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                found.append((f"{path.name} / {panel['title']} / {target['refId']}", target["expr"]))
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable.get("definition", "")
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            if match:
                found.append((f"{path.name} / variable {variable['name']}", match.group(1)))
    return found


def alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [
        (f"alerts.yml / {rule['alert']}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def referenced_metrics(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def value(result: list[dict]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def wait_for_value(prometheus: PrometheusServer, expr: str, expected: float) -> float:
    return _poll(prometheus, expr, lambda got: got == expected, f"became {expected}")


def wait_for_at_least(prometheus: PrometheusServer, expr: str, minimum: float) -> float:
    """For a gauge published on a period (Housekeeping's): its value once it reaches `minimum`."""
    return _poll(prometheus, expr, lambda got: got >= minimum, f"reached {minimum}")


def _poll(prometheus: PrometheusServer, expr: str, accept: Callable[[float], bool], wanted: str) -> float:
    """`expr`'s value once `accept` takes it, polled each second up to EXPORT_TIMEOUT_S."""
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    seen: list[dict] = []
    while time.monotonic() < deadline:
        seen = prometheus.query(expr)
        if seen and accept(value(seen)):
            return value(seen)
        time.sleep(1)
    raise AssertionError(f"{expr} never {wanted} in {EXPORT_TIMEOUT_S:.0f} s (last: {seen})")


# ---- files alone -------------------------------------------------------------------------------------


def test_promtool_accepts_alert_rules_and_scrape_config(tmp_path: Path) -> None:
    tool = str(promtool())
    rules = subprocess.run([tool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    # The shipped config as it is (rule path relative to it) and as start_prometheus writes it.
    shipped = subprocess.run(
        [tool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")], capture_output=True, text=True
    )
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    generated = tmp_path / "prometheus.yml"
    generated.write_text(yaml.safe_dump(prometheus_config(tmp_path / "sd.json", scrape_interval="1s")))
    checked = subprocess.run([tool, "check", "config", str(generated)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_starved_lane_alerts_for_its_own_app_when_another_app_on_the_cluster_has_slots(
    tmp_path: Path,
) -> None:
    """promtool's rule test on two apps: `previz` has interactive shots queued and no free interactive slot
    and batch shots queued with none in flight, while `previz-two`'s lanes have room. Summed over the
    cluster, `previz-two`'s free and in-flight slots hid `previz`'s starved lanes."""
    rules = {
        rule["alert"]: rule
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    }

    def lane(app: str, name: str, state: str, jobs: int) -> dict[str, str]:
        labels = f'application="{app}", lane="{name}", state="{state}"'
        return {"series": f"ray_previz_lane_jobs{{{labels}}}", "values": f"{jobs}x50"}

    def queued(app: str, priority: str, jobs: int) -> dict[str, str]:
        labels = f'application="{app}", priority="{priority}", bucket="96x64x9"'
        return {"series": f"ray_previz_queue_jobs{{{labels}}}", "values": f"{jobs}x50"}

    def fired(alert: str, summary: str) -> dict:
        description = rules[alert]["annotations"]["description"]
        expected = {"exp_labels": {"severity": "warning", "application": "previz"}}
        return {**expected, "exp_annotations": {"summary": summary, "description": description}}

    series = [
        queued("previz", "interactive", 3),
        lane("previz", "interactive", "free", 0),
        queued("previz", "batch", 5),
        lane("previz", "batch", "free", 0),
        lane("previz", "batch", "in_flight", 0),
        queued("previz-two", "interactive", 0),
        lane("previz-two", "interactive", "free", 4),
        queued("previz-two", "batch", 2),
        lane("previz-two", "batch", "free", 0),
        lane("previz-two", "batch", "in_flight", 3),
    ]
    interactive = (
        "interactive shots are queued in previz and its interactive lane has had no free slot for 5 minutes"
    )
    batch = "batch shots are queued in previz and none has run for 30 minutes"
    test = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {
                        "eval_time": "10m",
                        "alertname": "PrevizInteractiveLaneStarved",
                        "exp_alerts": [fired("PrevizInteractiveLaneStarved", interactive)],
                    },
                    {"eval_time": "10m", "alertname": "PrevizBatchLaneStarved", "exp_alerts": []},
                    {
                        "eval_time": "40m",
                        "alertname": "PrevizBatchLaneStarved",
                        "exp_alerts": [fired("PrevizBatchLaneStarved", batch)],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "lanes_test.yml"
    path.write_text(yaml.safe_dump(test))
    checked = subprocess.run([str(promtool()), "test", "rules", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_scrape_config_discovers_targets_from_rays_service_discovery_file() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"] == [{"files": ["/tmp/ray/prom_metrics_service_discovery.json"]}]


def test_dashboards_are_valid_grafana_dashboard_json() -> None:
    datasource = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert {path.stem for path in DASHBOARDS} == {"studio-overview", "stages", "projects"}
    uids = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36, path.name
        assert dashboard["uid"] not in uids and len(dashboard["uid"]) <= 40
        uids.add(dashboard["uid"])
        assert dashboard["title"] and dashboard["panels"], path.name
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids {ids}"
        for panel in dashboard["panels"]:
            where = f"{path.name} / {panel['title']}"
            assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, where
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where
            assert panel["targets"], where
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), where
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == source["uid"] and target["expr"].strip(), where
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "previz.yml").read_text())
    assert provider["providers"][0]["type"] == "file"


# ---- in one process, as a Serve replica ----------------------------------------------------------------


@pytest.fixture
def in_app_two() -> Iterator[None]:
    """This process as Serve makes a replica of app `previz-two`'s Scheduler (its replica context), with
    metric objects made afresh inside it and again after it."""
    replica = ReplicaID("r1", DeploymentID(name="Scheduler", app_name="previz-two"))
    metrics.cache_clear()
    serve_context._set_internal_replica_context(
        replica_id=replica,
        servable_object=None,
        _deployment_config=DeploymentConfig(),
        rank=None,
        world_size=1,
    )
    try:
        yield
    finally:
        serve_context._INTERNAL_REPLICA_CONTEXT = None
        metrics.cache_clear()


def test_the_scheduler_and_housekeeping_metrics_carry_the_serve_app_they_run_in(in_app_two: None) -> None:
    m = metrics()
    labelled = {
        info["name"]: info["default_tags"]
        for info in (getattr(m, field.name).info for field in fields(m))
        if "application" in info["tag_keys"]
    }
    # the router's decisions name the app they were routed to, on each call (test_router)
    assert labelled == {name: {"application": "previz-two"} for name in IN_APP_METRICS} | {
        "previz_routing_decisions_total": {}
    }


def test_every_scheduler_and_housekeeping_record_fills_its_labels(
    in_app_two: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ray checks a record's labels in the recording process: one missing would be logged and dropped."""
    store = empty_store(scheduler_args(tmp_path))
    job, _ = store.create("board", "batch", job_request())
    reporter = metrics_module.QueueReporter()
    with caplog.at_level("WARNING", logger="ray.serve"):
        reporter.publish(store.count_by_status(), [job])
        reporter.publish_cuts({"queued": 1})
        metrics_module.record_lanes({"batch": 1}, {"interactive": 2}, {"interactive": 2, "batch": 1})
        metrics_module.record_job_claimed(job)
        metrics_module.record_job_finished(job, "succeeded", {"denoise_high": 1.0})
        metrics_module.record_scheduler_pass(ok=True)
        metrics_module.record_cut_finished("board", "succeeded", render_seconds=2.0)
        metrics_module.record_webhook_delivery("delivered")
    assert caplog.messages == []


def test_outside_a_serve_replica_the_app_label_reads_none() -> None:
    assert metrics_module.serve_application() == "none"


# ---- against the live cluster -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster) -> Iterator[PrometheusServer]:
    with prometheus_server(ray_session_dir()) as server:
        yield server


@pytest.fixture(scope="module")
def project(cluster: Cluster, prometheus: PrometheusServer) -> str:
    """A project of its own whose NUM_JOBS tiny jobs have finished and been scraped."""
    name = f"metrics-{uuid.uuid4().hex[:8]}"
    client = cluster.client(name)
    ids = [
        client.create(
            {"prompt": f"a monitored lighthouse, take {index}", "project": name, "seed": index, **SMALL}
        )["id"]
        for index in range(NUM_JOBS)
    ]
    finished = cluster.wait_for(ids)
    assert all(job["status"] == "completed" for job in finished.values()), finished
    wait_for_value(prometheus, f'sum(ray_previz_jobs_finished_total{{project="{name}"}})', NUM_JOBS)
    return name


@pytest.mark.cluster
def test_prometheus_counts_the_finished_jobs_by_status_and_project(
    prometheus: PrometheusServer, project: str
) -> None:
    finished = f'sum by (application, status) (ray_previz_jobs_finished_total{{project="{project}"}})'
    by_status = {
        (row["metric"]["application"], row["metric"]["status"]): float(row["value"][1])
        for row in prometheus.query(finished)
    }
    assert by_status == {(SESSION_APP, "succeeded"): NUM_JOBS}
    # a gauge Housekeeping refreshes from the store on its period: it may still lag the finished jobs
    stored = f'sum(ray_previz_jobs_stored{{application="{SESSION_APP}", status="succeeded"}})'
    assert wait_for_at_least(prometheus, stored, NUM_JOBS)
    assert (
        value(prometheus.query(f'sum(ray_previz_queue_wait_seconds_count{{project="{project}"}})'))
        == NUM_JOBS
    )


@pytest.mark.cluster
def test_the_lane_and_queue_gauges_carry_the_session_app(prometheus: PrometheusServer, project: str) -> None:
    """The Scheduler's lanes and Housekeeping's queues of the session app, apart from other apps' (the live
    modules' extra apps on this cluster publish their own under their names)."""
    lanes = f'sum by (lane, state) (ray_previz_lane_jobs{{application="{SESSION_APP}"}})'
    queues = f'sum by (priority) (ray_previz_queue_jobs{{application="{SESSION_APP}"}})'
    expected_lanes = {(lane, state) for lane in PRIORITIES for state in ("in_flight", "reserved", "free")}
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while True:
        found_lanes = {(row["metric"]["lane"], row["metric"]["state"]) for row in prometheus.query(lanes)}
        found_queues = {row["metric"]["priority"] for row in prometheus.query(queues)}
        if (found_lanes, found_queues) == (expected_lanes, set(PRIORITIES)) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert found_lanes == expected_lanes
    assert found_queues == set(PRIORITIES)


@pytest.mark.cluster
def test_prometheus_counts_a_cut_by_outcome_and_has_its_render_seconds_and_the_cut_gauges(
    cluster: Cluster, prometheus: PrometheusServer
) -> None:
    name = f"metrics-cut-{uuid.uuid4().hex[:8]}"
    client = cluster.client(name)
    tiny = {"size": "96x64", "seconds": "0.5", "steps": 4}
    board = client.create_storyboard({"shots": [{"name": "1A", "prompt": "a monitored pier", **tiny}]})
    videos = [video["video_id"] for shot in board["shots"] for video in shot["videos"]]
    assert all(job["status"] == "completed" for job in cluster.wait_for(videos).values())
    client.create_cut(board["id"])
    assert client.wait_for_cut(board["id"], timeout_s=600)["status"] == "completed"
    ended = f'ray_previz_cuts_finished_total{{project="{name}"}}'
    wait_for_value(prometheus, f"sum({ended})", 1)
    by_outcome = prometheus.query(f"sum by (outcome) ({ended})")
    assert {row["metric"]["outcome"]: float(row["value"][1]) for row in by_outcome} == {"succeeded": 1}
    assert value(prometheus.query("sum(ray_previz_cut_render_seconds_count)")) >= 1
    assert value(prometheus.query('sum(ray_previz_cut_render_seconds_bucket{le="1800.0"})')) >= 1
    # the Housekeeping replica publishes both statuses from the store, 0 when none
    wait_for_value(prometheus, 'count(sum by (status) (ray_previz_cuts{status=~"queued|running"}))', 2)
    statuses = {row["metric"]["status"] for row in prometheus.query("sum by (status) (ray_previz_cuts)")}
    assert statuses == {"queued", "running"}


@pytest.mark.cluster
def test_latency_histograms_have_the_jobs_and_every_stage(prometheus: PrometheusServer, project: str) -> None:
    assert value(prometheus.query('sum(ray_previz_job_seconds_count{resolution="96x64"})')) >= NUM_JOBS
    stages = prometheus.query('sum by (stage) (ray_previz_stage_seconds_count{resolution="96x64"})')
    counts = {row["metric"]["stage"]: float(row["value"][1]) for row in stages}
    # image-to-video jobs of other tests on the shared cluster (same size) add their keyframe encode
    assert STAGES <= counts.keys() <= STAGES | {"encode_image"}
    assert all(counts[stage] >= NUM_JOBS for stage in STAGES)
    # Buckets reach 30 minutes; a quantile over the cumulative buckets is a finite number of seconds. The
    # end-to-end time is wall clock from creation, so a session-wide p95 can sit in the +Inf bucket when the
    # machine's clock steps or another test's job waits long; Prometheus then answers the top bound, 1800.
    buckets = prometheus.query('max(ray_previz_stage_seconds_bucket{le="1800.0"})')
    assert value(buckets) >= NUM_JOBS
    p95 = prometheus.query(
        'histogram_quantile(0.95, sum by (le) (ray_previz_job_seconds_bucket{resolution="96x64"}))'
    )
    assert 0 < value(p95) <= 1800 and not math.isnan(value(p95))
    stage_p95 = prometheus.query(
        'histogram_quantile(0.95, sum by (le) (ray_previz_stage_seconds_bucket{resolution="96x64"}))'
    )
    assert 0 < value(stage_p95) < 1800
    assert value(prometheus.query("sum(ray_previz_denoise_iterations_total)")) > 0
    assert value(prometheus.query("sum(ray_previz_artifact_bytes_written_total)")) > 0


@pytest.mark.cluster
def test_every_dashboard_and_alert_expression_evaluates_on_metrics_that_exist(
    prometheus: PrometheusServer, project: str
) -> None:
    expressions = dashboard_expressions() + alert_expressions()
    assert len(expressions) > 40
    # no GPU on CI machines; no webhook or refusal need have happened before this test
    allowed_absent = {
        exported_name(name) + suffix  # a histogram's series: _bucket, _count, _sum
        for name in GPU_ONLY_METRICS + FIRST_EVENT_METRICS
        for suffix in ("", "_bucket", "_count", "_sum")
    }
    wanted = set().union(*(referenced_metrics(expr) for _, expr in expressions)) - allowed_absent
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while (missing := wanted - prometheus.metric_names()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not missing, f"dashboards or alerts use metrics Prometheus does not have: {sorted(missing)}"
    errors = []
    for where, expr in expressions:
        try:
            prometheus.query(grafana_to_promql(expr))
        except ValueError as error:
            errors.append(f"{where}: {error}")
    assert not errors, "\n".join(errors)
