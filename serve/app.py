"""build_app: the Previz Serve application, from Python, `serve run serve.app:build_app` or a config YAML.

    serve run deploy/local.yaml          # or: previz up --config deploy/local.yaml

How a job flows: the Ingress (serve/http) admits it into the job store (serve/jobs); the Scheduler
(serve/scheduling) claims it there and drives it through the stage deployments (serve/stages), recording
every transition back in the store. The Ingress and the Scheduler never call each other for work: they
meet in the job store, plus a `wake` nudge when a job is queued and a `cancel` when one is cancelled.
Each stage declares its own default Serve options; the config YAML's `deployments:` section overrides them.
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application

from serve.config import PrevizArgs, with_environment
from serve.http.ingress import Ingress
from serve.scheduling.housekeeping import HousekeepingDeployment
from serve.scheduling.scheduler import SchedulerDeployment
from serve.sharding import check_degrees
from serve.stages import colocated, decoder, denoiser, finisher, text_encoder, upscaler


def build_app(args: PrevizArgs | dict[str, Any]) -> Application:
    """Validate the args, then bind every stage, Housekeeping, the Scheduler and the Ingress."""
    args = with_environment(PrevizArgs.model_validate(args), os.environ)
    check_degrees(args.experts, args.model, args.model_cache_dir, args.sampling)
    encoder = text_encoder.TextEncoderDeployment.options(**text_encoder.default_options(args)).bind(args)
    if args.experts.layout == "colocated":  # one Denoiser holds both experts: the Scheduler calls it once
        high = low = colocated.ColocatedDenoiserDeployment.options(**colocated.default_options(args)).bind(
            args
        )
    else:
        high = denoiser.DenoiserDeployment.options(**denoiser.default_options(args, "high")).bind(
            args, "high"
        )
        low = denoiser.DenoiserDeployment.options(**denoiser.default_options(args, "low")).bind(args, "low")
    vae = decoder.VAEDecoderDeployment.options(**decoder.default_options(args)).bind(args)
    sr = upscaler.UpscalerDeployment.options(**upscaler.default_options(args)).bind(args)
    finish = finisher.FinisherDeployment.options(**finisher.default_options(args)).bind(args)
    housekeeping = HousekeepingDeployment.bind(args)  # webhooks, retention, gauges: one replica
    scheduler = SchedulerDeployment.bind(
        args, args.sampling, housekeeping, encoder, high, low, vae, sr, finish
    )
    return Ingress.bind(args, args.sampling, scheduler)
