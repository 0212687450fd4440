"""The Ingress deployment: the FastAPI app of serve.http.app, served by Ray Serve."""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from pipeline.spec import ModelSpec
from serve.config import PrevizArgs
from serve.http.app import app
from serve.http.deps import IngressState


@serve.deployment(name="Ingress", max_ongoing_requests=512, health_check_period_s=10)
@serve.ingress(app)
class Ingress:
    def __init__(self, args: PrevizArgs, model: ModelSpec, scheduler: DeploymentHandle) -> None:
        IngressState.current = IngressState(args, model, scheduler)
