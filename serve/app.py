"""build_app: the Previz Serve application, from Python, `serve run serve.app:build_app` or a config YAML.

serve run deploy/local.yaml          # or: previz up --config deploy/local.yaml
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from serve.config import PrevizArgs
from serve.deployments import (
    DenoiserDeployment,
    FinisherDeployment,
    TextEncoderDeployment,
    UpscalerDeployment,
    VAEDecoderDeployment,
)
from serve.ingress import Ingress
from serve.scheduler import Scheduler

BUCKET_ROUTER = RequestRouterConfig(request_router_class="serve.router:BucketAffinityRouter")
GPU_STAGES = ("TextEncoder", "HighNoiseDenoiser", "LowNoiseDenoiser", "VAEDecoder", "Upscaler")


def stage_options(args: PrevizArgs, name: str) -> dict[str, Any]:
    """Default Serve options of a stage; the config YAML's `deployments:` section overrides them."""
    options: dict[str, Any] = {"name": name}
    if name in GPU_STAGES and args.device == "cuda":
        options["ray_actor_options"] = {"num_gpus": 1}
    if name in ("HighNoiseDenoiser", "LowNoiseDenoiser"):
        options["request_router_config"] = BUCKET_ROUTER
    return options


def build_app(args: PrevizArgs | dict[str, Any]) -> Application:
    """Validate the args, then bind every stage, the Scheduler and the Ingress."""
    args = PrevizArgs.model_validate(args)
    text_encoder = TextEncoderDeployment.options(**stage_options(args, "TextEncoder")).bind(args)
    high = DenoiserDeployment.options(**stage_options(args, "HighNoiseDenoiser")).bind(args, "high")
    low = DenoiserDeployment.options(**stage_options(args, "LowNoiseDenoiser")).bind(args, "low")
    vae = VAEDecoderDeployment.options(**stage_options(args, "VAEDecoder")).bind(args)
    upscaler = UpscalerDeployment.options(**stage_options(args, "Upscaler")).bind(args)
    finisher = FinisherDeployment.options(**stage_options(args, "Finisher")).bind(args)
    scheduler = Scheduler.bind(args, args.sampling, text_encoder, high, low, vae, upscaler, finisher)
    return Ingress.bind(args, args.sampling, scheduler)
