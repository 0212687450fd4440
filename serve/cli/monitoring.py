"""Prometheus wiring for a local cluster (`previz up --with-monitoring`, the monitoring tests).

Ray exports metrics on each node's metrics agent and lists those agents in a Prometheus file-based
service discovery file, `<session dir>/prom_metrics_service_discovery.json` (with a link at
`/tmp/ray/prom_metrics_service_discovery.json`). Ray's dashboard head writes that file; a local Previz
instance runs without the dashboard, so `ServiceDiscoveryWriter` writes the same file, in Ray's format, from
the driver. `start_prometheus` runs the Debian `prometheus` binary against it with the project's alert
rules (deploy/prometheus/).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULE_FILES = (PROMETHEUS_DIR / "alerts.yml",)
SERVICE_DISCOVERY_FILE = (
    "prom_metrics_service_discovery.json"  # ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE
)
LEGACY_DISCOVERY_PATH = Path("/tmp/ray") / SERVICE_DISCOVERY_FILE
INSTALL_SCRIPT = REPO / "scripts" / "install_prometheus.sh"

logger = logging.getLogger(__name__)


class ServiceDiscoveryWriter:
    """Keeps Ray's service discovery file current (every alive node's metrics agent) from the driver."""

    def __init__(self, session_dir: str | Path, interval_s: float = 5.0, legacy_link: bool = True) -> None:
        self.path = Path(session_dir) / SERVICE_DISCOVERY_FILE
        self._interval_s = interval_s
        self._legacy_link = legacy_link
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="previz-prom-sd", daemon=True)

    def start(self) -> ServiceDiscoveryWriter:
        try:
            self.write()
        except Exception:  # monitoring must never keep the cluster from starting
            logger.warning("could not write %s; retrying in the background", self.path, exc_info=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def write(self) -> None:
        targets = [
            f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
            for node in ray.nodes()
            if node["Alive"]
        ]
        content = json.dumps([{"labels": {"job": "ray"}, "targets": targets}])
        temporary = self.path.with_name(f"tmp_{SERVICE_DISCOVERY_FILE}")
        temporary.write_text(content)
        os.replace(temporary, self.path)  # atomic: Prometheus never reads half a file
        if self._legacy_link and LEGACY_DISCOVERY_PATH.parent.is_dir():
            try:
                if LEGACY_DISCOVERY_PATH.is_symlink() or LEGACY_DISCOVERY_PATH.exists():
                    if os.readlink(LEGACY_DISCOVERY_PATH) == str(self.path):
                        return
                    LEGACY_DISCOVERY_PATH.unlink()
                LEGACY_DISCOVERY_PATH.symlink_to(self.path)
            except OSError:
                pass  # a shared /tmp/ray owned by someone else: the session-dir file is the reliable one

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                if ray.is_initialized():
                    self.write()
            except Exception:  # the cluster is going away; the next tick (or stop) settles it
                pass


def prometheus_config(
    discovery_file: str | Path,
    *,
    scrape_interval: str = "10s",
    rule_files: tuple[Path, ...] = RULE_FILES,
) -> dict:
    """deploy/prometheus/prometheus.yml with the discovery file, interval and rule paths filled in."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = scrape_interval
    config["rule_files"] = [str(path) for path in rule_files]
    for job in config["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [str(discovery_file)]
    return config


def find_prometheus() -> Path:
    """The `prometheus` binary; runs scripts/install_prometheus.sh (Debian package) when it is missing."""
    found = shutil.which("prometheus")
    if found is None:
        subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True)
        found = shutil.which("prometheus")
    if found is None:
        raise FileNotFoundError("`prometheus` is not on PATH after scripts/install_prometheus.sh.")
    return Path(found)


@dataclass
class PrometheusServer:
    """A running Prometheus on loopback with its own config and throwaway storage."""

    url: str
    process: subprocess.Popen
    workdir: Path
    log_path: Path
    _owns_workdir: bool = field(default=True, repr=False)

    def query(self, expr: str, timeout_s: float = 10) -> list[dict]:
        """Instant query; raises ValueError with Prometheus's message when `expr` does not evaluate."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=timeout_s)
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def metric_names(self) -> set[str]:
        response = httpx.get(f"{self.url}/api/v1/label/__name__/values", timeout=10)
        return set(response.json()["data"])

    def targets(self) -> list[dict]:
        return httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def start_prometheus(
    ray_session_dir: str | Path,
    port: int = 9090,
    *,
    host: str = "127.0.0.1",
    scrape_interval: str = "10s",
    workdir: Path | None = None,
    startup_timeout_s: float = 30,
) -> PrometheusServer:
    """Start Prometheus scraping the Ray cluster whose session dir is `ray_session_dir`; returns once its
    HTTP API answers (stop it with `.stop()`)."""
    owns = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="previz-prometheus-")) if workdir is None else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    config = prometheus_config(
        Path(ray_session_dir) / SERVICE_DISCOVERY_FILE, scrape_interval=scrape_interval
    )
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = workdir / "prometheus.log"
    command = [
        str(find_prometheus()),
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={host}:{port}",
        "--web.enable-lifecycle",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = PrometheusServer(f"http://{host}:{port}", process, workdir, log_path, owns)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"prometheus exited with code {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise TimeoutError(f"prometheus on {server.url} was not ready after {startup_timeout_s:.0f} s")
