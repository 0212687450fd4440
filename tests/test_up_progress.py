"""What `previz up` shows while the cluster starts: each deployment once it is ready (a line a log keeps)
and, in the spinner, those still starting with their replicas up."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.status import Status

from serve.cli.cluster import StartProgress
from serve.cli.launch import DeploymentProgress


def progress(name: str, status: str, num_running: int, num_replicas: int = 1) -> DeploymentProgress:
    return DeploymentProgress(name, status, num_running, num_replicas, "")


def test_each_deployment_is_reported_once_when_ready_and_the_rest_are_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    monkeypatch.setattr("serve.cli.cluster.console", Console(file=out, width=200))
    status = Status("starting", console=Console(file=io.StringIO()))
    shown = StartProgress(status, started=0.0)
    shown.update("DEPLOYING", [])
    assert "deploying Previz (deploying)" in str(status.renderable.text)
    shown.update("DEPLOYING", [progress("Ingress", "HEALTHY", 1), progress("VAEDecoder", "UPDATING", 0, 2)])
    shown.update("DEPLOYING", [progress("Ingress", "HEALTHY", 1), progress("VAEDecoder", "UPDATING", 1, 2)])
    assert "1/2 deployments ready; waiting for VAEDecoder 1/2 up" in str(status.renderable.text)
    shown.update("RUNNING", [progress("Ingress", "HEALTHY", 1), progress("VAEDecoder", "HEALTHY", 2, 2)])
    lines = [line.strip() for line in out.getvalue().splitlines()]
    assert [line.split(" (")[0] for line in lines] == ["Ingress ready", "VAEDecoder ready"]
