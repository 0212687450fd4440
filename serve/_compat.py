"""Every private API of Ray and Typer that Previz uses, in one place, with the versions it was checked
against (pyproject pins them: ray[serve]==2.60.*, typer>=0.29,<0.30). An upgrade reads this file first.

- `ray_session_dir`: Ray has no public API for the session folder (/tmp/ray/session_...), where its
  metrics agents write the Prometheus service-discovery file. Checked with ray 2.60.0.
- `serve_start`: `serve run CONFIG` deploys through `ray.serve._private.api.serve_start(...)
  .deploy_apps(schema)`; `previz up` does exactly that, so a config behaves the same under both.
  Checked with ray 2.60.0.
- `drop_serve_shutdown_notice`: Ray's ServeController kills itself at the end of `graceful_shutdown` while
  the driver's call is still in flight, so the driver's error listener
  (`ray._private.worker.listen_error_messages` → `print_to_stdstream`) prints "(raylet) Task
  ServeController.graceful_shutdown failed … will be retried" on every clean stop. That one line is
  dropped; every other line passes. Checked with ray 2.60.0.
- `bound_deployment_names`: Serve lists an application's deployments only once it is deployed; before,
  `ray.serve._private.build_app.build_app(app, name=...)` walks the bound graph as `serve run` does (what
  the config tests read, without a cluster). Checked with ray 2.60.0.
- `click_exceptions`: typer >= 0.29 vendors click as `typer._click`; its UsageError is what a bad flag
  raises. Checked with typer 0.29.2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typer._click import exceptions as click_exceptions

CHECKED_VERSIONS: dict[str, str] = {"ray": "2.60.0", "typer": "0.29.2"}

__all__ = [
    "CHECKED_VERSIONS",
    "bound_deployment_names",
    "click_exceptions",
    "drop_serve_shutdown_notice",
    "ray_session_dir",
    "serve_start",
]
SERVE_SHUTDOWN_NOTICE = "ServeController.graceful_shutdown failed"


def bound_deployment_names(app: Any, name: str = "previz") -> list[str]:
    """The deployments a bound (not yet deployed) Serve application `app` consists of, sorted."""
    from ray.serve._private.build_app import build_app

    return sorted(deployment.name for deployment in build_app(app, name=name).deployments)


def ray_session_dir() -> Path:
    """The connected Ray instance's session folder."""
    import ray

    return Path(ray._private.worker.global_worker.node.get_session_dir_path())


def serve_start(http_options: dict[str, Any], proxy_location: Any) -> Any:
    """The Serve controller client `serve run` deploys through (started if it is not running)."""
    from ray.serve._private import api as serve_api

    return serve_api.serve_start(http_options=http_options, proxy_location=proxy_location)


def drop_serve_shutdown_notice() -> None:
    """From now on, this driver does not print Ray's notice that the Serve controller's graceful shutdown
    call "failed" (it ends by killing its own actor); any other line it prints as before."""
    from ray._private import worker

    original = worker.print_to_stdstream
    if getattr(original, "previz_filtered", False):
        return

    def filtered(data: dict[str, Any], ignore_prefix: bool) -> None:
        lines = [line for line in data.get("lines", []) if SERVE_SHUTDOWN_NOTICE not in line]
        if lines:
            original({**data, "lines": lines}, ignore_prefix)

    filtered.previz_filtered = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = filtered
