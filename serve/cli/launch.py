"""Start a local Ray instance and deploy a Previz Serve config on it (what `previz up` and the tests run).

The config is deployed exactly as `serve run CONFIG.yaml` deploys it (same schema, same per-deployment
overrides); only relative paths in the app args are made absolute first, since replicas do not run in
the caller's working directory.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from serve._compat import drop_serve_shutdown_notice, ray_session_dir, serve_start
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
        check_layout(app)
    ServeDeploySchema.model_validate(config)
    return config


def check_layout(app: dict[str, Any]) -> None:
    """Refuse an app whose `deployments:` name denoiser deployments its `experts.layout` does not bind, or
    list a parallel VAEDecoder without a placement bundle per rank."""
    from serve.sharding import ExpertsSettings, bundles_problem, deployments_problem  # torch: when read

    args = app.get("args", {})
    experts = ExpertsSettings.model_validate(args.get("experts", {}))
    entries = {entry.get("name", ""): entry for entry in app.get("deployments", [])}
    problem = deployments_problem(experts, list(entries))
    if problem is None and "VAEDecoder" in entries:
        ranks = int(args.get("decoder", {}).get("parallel", 1))
        problem = bundles_problem("VAEDecoder", "decoder.parallel", ranks, entries["VAEDecoder"])
    if problem is not None:
        raise ValueError(f"application {app.get('name', APP_NAME)!r}: {problem}")


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
        quiet_token_auth_notice()
        ray.init(namespace="serve", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        global _discovery
        _discovery = ServiceDiscoveryWriter(ray_session_dir()).start()
    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    host = schema.http_options.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{schema.http_options.port}"


@dataclass(frozen=True, slots=True)
class DeploymentProgress:
    """Where one deployment of the app is while the cluster starts."""

    name: str
    status: str  # Serve's DeploymentStatus: UPDATING until its replicas are up, then HEALTHY
    num_running: int  # replicas up and healthy
    num_replicas: int  # replicas in any state (starting, running, …)
    message: str  # Serve's own words, e.g. why a replica cannot be placed

    @property
    def is_ready(self) -> bool:
        return self.status == "HEALTHY"

    def describe(self) -> str:
        if self.is_ready:
            return f"{self.name} ready"
        return f"{self.name} {self.num_running}/{max(self.num_replicas, 1)} up"


def deployment_progress(app_name: str = APP_NAME) -> list[DeploymentProgress]:
    """Each deployment of the app, in the order Serve lists them (empty before the app exists)."""
    status = serve.status().applications.get(app_name)
    if status is None:
        return []
    return [
        DeploymentProgress(
            name=name,
            status=str(getattr(overview.status, "value", overview.status)),
            num_running=overview.replica_states.get("RUNNING", 0),
            num_replicas=sum(overview.replica_states.values()),
            message=overview.message,
        )
        for name, overview in status.deployments.items()
    ]


class _TokenAuthEnabledNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def quiet_token_auth_notice() -> None:
    """Ray enables token authentication on a new local cluster by default, and warns that it did on every
    start; the notice is dropped (a warning that it is disabled still shows)."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(existing, _TokenAuthEnabledNotice) for existing in logger.filters):
        logger.addFilter(_TokenAuthEnabledNotice())


def wait_ready(
    url: str,
    *,
    timeout_s: float = 600,
    on_wait: Callable[[str, list[DeploymentProgress]], None] | None = None,
    app_name: str = APP_NAME,
) -> float:
    """Block until the app (`app_name`, served at `url`) is RUNNING and its /readyz answers; returns the
    seconds waited. `on_wait` hears the app's state and every deployment's progress about twice a second."""
    started = time.monotonic()
    while True:
        waited = time.monotonic() - started
        status = serve.status().applications.get(app_name)
        state = status.status if status is not None else "NOT_STARTED"
        if state == "DEPLOY_FAILED":
            raise RuntimeError(f"the {app_name} app failed to deploy: {status.message}")
        if state == "RUNNING":
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    if on_wait is not None:  # the last deployments became ready since the last look
                        on_wait("RUNNING", deployment_progress(app_name))
                    return waited
            except httpx.HTTPError:
                pass
        if waited > timeout_s:
            raise TimeoutError(f"the {app_name} app was not ready after {timeout_s:.0f} s (state {state})")
        if on_wait is not None:
            on_wait(str(getattr(state, "value", state)), deployment_progress(app_name))
        time.sleep(0.5)


def shutdown() -> None:
    global _discovery
    if _discovery is not None:
        _discovery.stop()
        _discovery = None
    drop_serve_shutdown_notice()
    serve.shutdown()
    ray.shutdown()
