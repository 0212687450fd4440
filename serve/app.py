"""build_app: the Previz Serve application, from Python, `serve run serve.app:build_app` or a config YAML.

    serve run deploy/local.yaml          # or: previz up --config deploy/local.yaml

How a job flows: the Ingress (serve/http) admits it into the job store (serve/jobs); the Scheduler
(serve/scheduling) claims it there and drives it through the stage deployments (serve/stages), recording
every transition back in the store. The Ingress and the Scheduler never call each other for work: they
meet in the job store, plus a `wake` nudge when a job is queued and a `cancel` when one is cancelled.
Each stage declares its own default Serve options; the config YAML's `deployments:` section overrides them.

A second model (`i2v`: Wan2.2-I2V-A14B) adds its own expert deployments, the T2V classes bound with its
args under the `I2V` prefix (`I2VHighNoiseDenoiser`...), and a VAEEncoder; the text encoder, the decoder,
the upscaler and the finisher serve both models.
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application

from serve.config import PrevizArgs, with_environment
from serve.http.ingress import Ingress
from serve.scheduling.housekeeping import HousekeepingDeployment
from serve.scheduling.scheduler import SchedulerDeployment
from serve.sharding import I2V_PREFIX, check_degrees
from serve.stages import colocated, decoder, denoiser, encoder, finisher, text_encoder, upscaler


def build_app(args: PrevizArgs | dict[str, Any]) -> Application:
    """Validate the args, then bind every stage, Housekeeping, the Scheduler and the Ingress."""
    args = with_environment(PrevizArgs.model_validate(args), os.environ)
    check_degrees(args.experts, args.model, args.model_cache_dir, args.sampling)
    text = text_encoder.TextEncoderDeployment.options(**text_encoder.default_options(args)).bind(args)
    high, low = bind_experts(args)
    i2v: dict[str, Application] = {}
    if args.i2v is not None:
        i2v_args = args.for_i2v()
        check_degrees(i2v_args.experts, i2v_args.model, i2v_args.model_cache_dir, i2v_args.sampling)
        i2v_high, i2v_low = bind_experts(i2v_args, I2V_PREFIX)
        encoder_options = encoder.default_options(i2v_args)
        image_encoder = encoder.VAEEncoderDeployment.options(**encoder_options).bind(i2v_args)
        i2v = {"i2v_high": i2v_high, "i2v_low": i2v_low, "image_encoder": image_encoder}
    vae = decoder.VAEDecoderDeployment.options(**decoder.default_options(args)).bind(args)
    sr = upscaler.UpscalerDeployment.options(**upscaler.default_options(args)).bind(args)
    finish = finisher.FinisherDeployment.options(**finisher.default_options(args)).bind(args)
    housekeeping = HousekeepingDeployment.bind(args)  # webhooks, retention, gauges: one replica
    scheduler = SchedulerDeployment.bind(
        args, args.sampling, housekeeping, text, high, low, vae, sr, finish, **i2v
    )
    return Ingress.bind(args, args.sampling, scheduler)


def bind_experts(args: PrevizArgs, prefix: str = "") -> tuple[Application, Application]:
    """(high, low): a deployment per expert (split), or one Denoiser holding both, bound twice
    (colocated: the Scheduler calls it once); named with `prefix` for a second model."""
    if args.experts.layout == "colocated":
        options = colocated.default_options(args)
        options["name"] = prefix + options["name"]
        both = colocated.ColocatedDenoiserDeployment.options(**options).bind(args)
        return both, both
    bound = []
    for expert in ("high", "low"):
        options = denoiser.default_options(args, expert)
        options["name"] = prefix + options["name"]
        bound.append(denoiser.DenoiserDeployment.options(**options).bind(args, expert))
    return bound[0], bound[1]
