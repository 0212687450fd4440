"""Start a local Ray instance and deploy a Previz Serve config on it (what `previz up` and the tests run).

The config is deployed exactly as `serve run CONFIG.yaml` deploys it (same schema, same per-deployment
overrides); only relative paths in the app args are made absolute first, since replicas do not run in
the caller's working directory.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from serve._compat import ray_session_dir, serve_start
from serve.cli.monitoring import ServiceDiscoveryWriter

APP_NAME = "previz"
# Ray's dashboard writes the Prometheus discovery file; without the dashboard this driver writes it.
_discovery: ServiceDiscoveryWriter | None = None


def load_config(path: Path, *, port: int | None = None, args_overrides: dict[str, Any] | None = None) -> dict:
    """The YAML as a dict, with `port` and app args overridden and relative paths made absolute."""
    if not path.is_file():
        raise FileNotFoundError(f"`--config` {str(path)!r} is not a file.")
    config = yaml.safe_load(path.read_text())
    config = copy.deepcopy(config)
    if port is not None:
        config.setdefault("http_options", {})["port"] = port
    for app in config.get("applications", []):
        args = app.setdefault("args", {})
        for key, value in (args_overrides or {}).items():
            args[key] = value
        _absolutize(args)
    ServeDeploySchema.model_validate(config)
    return config


def _absolutize(args: dict[str, Any]) -> None:
    prefix = "sqlite:///"
    url = args.get("database_url", "sqlite:///previz-data/jobs.db")
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != "sqlite:///:memory:":
        path = Path(url.removeprefix(prefix)).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        args["database_url"] = prefix + str(path)
    storage = args.setdefault("storage", {})
    if storage.get("kind", "local") == "local":
        storage["local_root"] = str(Path(storage.get("local_root", "previz-artifacts")).resolve())
    model = str(args.get("model", "tiny"))
    if "/" in model and not model.startswith("s3://"):
        args["model"] = str(Path(model).expanduser().resolve())


def deploy(config: dict, *, num_cpus: int | None = None) -> str:
    """Start Ray here if needed, deploy `config`, return the HTTP base URL (not yet waiting for ready).

    A local instance advertises at least 8 logical CPUs: the stages idle most of the time, and Ray's
    accounting (the app-build task alone takes a whole CPU) would otherwise leave replicas unscheduled
    on a 2-core machine.
    """
    if num_cpus is None:
        num_cpus = max(8, os.cpu_count() or 1)
    if not ray.is_initialized():
        ray.init(namespace="serve", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        global _discovery
        _discovery = ServiceDiscoveryWriter(ray_session_dir()).start()
    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    host = schema.http_options.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{schema.http_options.port}"


def wait_ready(url: str, *, timeout_s: float = 600, on_wait: Callable[[str], None] | None = None) -> float:
    """Block until the app is RUNNING and /readyz answers; returns the seconds waited."""
    started = time.monotonic()
    while True:
        waited = time.monotonic() - started
        status = serve.status().applications.get(APP_NAME)
        state = status.status if status is not None else "NOT_STARTED"
        if state == "DEPLOY_FAILED":
            raise RuntimeError(f"the Previz app failed to deploy: {status.message}")
        if state == "RUNNING":
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    return waited
            except httpx.HTTPError:
                pass
        if waited > timeout_s:
            raise TimeoutError(f"the Previz app was not ready after {timeout_s:.0f} s (state {state})")
        if on_wait is not None:
            on_wait(str(state))
        time.sleep(0.5)


def shutdown() -> None:
    global _discovery
    if _discovery is not None:
        _discovery.stop()
        _discovery = None
    serve.shutdown()
    ray.shutdown()
