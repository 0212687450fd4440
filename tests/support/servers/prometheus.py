"""A real Prometheus for tests: the Debian `prometheus` package (scripts/install_prometheus.sh installs it
when missing), on a free loopback port, with a temporary config and storage, scraping the session's Ray
cluster through Ray's service discovery file.

    with prometheus_server(ray_session_dir()) as prometheus:
        prometheus.query("sum(ray_previz_jobs_finished_total)")
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from serve.cli.monitoring import INSTALL_SCRIPT, PrometheusServer, start_prometheus
from tests.support.cluster import free_port

# bounds of its start and of its first scrape: only a hang reaches them (on a loaded 2-core CI box)
STARTUP_TIMEOUT_S = 120.0
TARGETS_TIMEOUT_S = 120.0


def promtool() -> Path:
    """`promtool` (shipped with the Debian prometheus package), installed by the project script if missing."""
    if shutil.which("promtool") is None:
        subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True)
    found = shutil.which("promtool")
    if found is None:
        raise FileNotFoundError("`promtool` is not on PATH after scripts/install_prometheus.sh.")
    return Path(found)


@contextmanager
def prometheus_server(ray_session_dir: Path, *, scrape_interval: str = "1s") -> Iterator[PrometheusServer]:
    """Prometheus scraping every metrics agent of the cluster; yields once at least one target is up."""
    server = start_prometheus(
        ray_session_dir, free_port(), scrape_interval=scrape_interval, startup_timeout_s=STARTUP_TIMEOUT_S
    )
    try:
        deadline = time.monotonic() + TARGETS_TIMEOUT_S
        while not any(target["health"] == "up" for target in server.targets()):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no Ray metrics target up after {TARGETS_TIMEOUT_S:.0f} s: {server.targets()}"
                )
            time.sleep(0.5)
        yield server
    finally:
        server.stop()
