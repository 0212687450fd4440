"""Previz's serving side: the Ray Serve application and its client, laid out by a job's life.

    http/        the Ingress: FastAPI app, routes, the one admission path, schemas and views
    jobs/        the durable truth: job store, typed JobRequest, projects and keys, webhook outbox
    scheduling/  the Scheduler: claim → run → record → requeue, faults, fair share, checkpoints
    stages/      the stage deployments, their typed payloads, the bucket-affinity router
    cli/         `previz` by audience (generate, up, videos, admin), the HTTP client, launch, monitoring
    app.py config.py metrics.py storage.py webhooks.py auth.py _compat.py

The public names below are imported on first use, so `previz generate` and the client never pay for
importing Ray Serve.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "build_app": "serve.app",
    "PrevizArgs": "serve.config",
    "JobStore": "serve.jobs",
    "JobRequest": "serve.jobs.request",
    "PrevizClient": "serve.cli.client",
    "PrevizApiError": "serve.cli.client",
    "verify_signature": "serve.webhooks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'serve' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
