"""Magnitude curves for step caching (pipeline.denoise.stepcache): MagCache's published ratios for the real
Wan2.2 T2V-A14B experts, or a calibration run that measures them on a model (the tiny and small presets).

A calibration run is MagCache's: one request, every step computed, and at each step the mean over video
tokens of |r_t| / |r_(t-1)| for the cond and the uncond row, r the blocks' residual; the residual carries
across the expert switch, as in MagCache's own run, so a curve has the same shape as the published one
(the ratio at the switch is never used: an expert's first step always runs).

An I2V preset is calibrated the same way, its rows conditioned on a fixed panel (`calibration_panel`). Real
Wan2.2-I2V-A14B weights have no curve here (MagCache's ratios in this repository are T2V's): such a model
serves no step caching, and a request asking for it is refused by the engine.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from pipeline.denoise.blocks import SplitTransformer
from pipeline.denoise.experts import expert_for
from pipeline.denoise.forward import GuidedInput
from pipeline.denoise.state import initial_state, new_solver
from pipeline.denoise.stepcache import MagnitudeCurve, cached_guided_forward
from pipeline.spec import ModelSpec, RequestSpec, ResolvedRequest, resolve
from pipeline.text import TextEncoder, pad_embeds
from pipeline.vae_encode import Keyframes, VAEEncoder
from pipeline.weights import PRESETS, WanComponents, build_preset

# MagCache's Wan2.2 T2V-A14B ratios (40 steps, both experts), with their source inside
WAN22_T2V_A14B_CURVE = Path(__file__).with_name("magcache_wan22_t2v_a14b.json")
CALIBRATION_PROMPT = "a lighthouse keeper climbs a spiral staircase at dusk, handheld camera"


def calibration_panel(width: int, height: int) -> np.ndarray:
    """The first frame an I2V preset is calibrated on: colour ramps, uint8 (height, width, 3)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return (np.stack([x / width, y / height, 1 - x / width], axis=-1) * 255).astype(np.uint8)


def calibration_request(model: ModelSpec, steps: int | None = None) -> ResolvedRequest:
    """The clip a preset is calibrated on: small, with CFG, the model's default steps."""
    spec = RequestSpec(prompt=CALIBRATION_PROMPT, resolution="96x64", duration=0.5, steps=steps, seed=0)
    return resolve(spec, model)


@torch.inference_mode()
def calibrate(components: WanComponents, request: ResolvedRequest) -> MagnitudeCurve:
    """Measure `components`' magnitude ratios on `request` (WanComponents with both experts and the text
    encoder): every step computed, cond and uncond rows, the residual carried across the expert switch as
    MagCache's calibration run does."""
    if request.guidance_high <= 1.0 or request.guidance_low <= 1.0:
        raise ValueError(
            "a calibration request needs CFG (guidance > 1) in both experts, for the uncond rows."
        )
    model = components.model
    device = next(components.transformer.parameters()).device
    encoder = TextEncoder(
        components.tokenizer, components.text_encoder, max_sequence_length=model.max_sequence_length
    )
    prompt, negative = encoder.encode([request.prompt, request.negative_prompt])
    cond, uncond = pad_embeds([prompt, negative], model.max_sequence_length).to(device)
    solver = new_solver(components.scheduler, request.steps, device)
    boundary = model.boundary_ratio * components.scheduler.config.num_train_timesteps
    latents = initial_state(request, model).latents.to(device)
    condition = None
    if components.task == "i2v":
        first = calibration_panel(request.width, request.height)
        condition = VAEEncoder(components.vae).encode(Keyframes(first=first), request.num_frames).to(device)
    experts = {
        "high": (SplitTransformer(components.transformer), request.guidance_high),
        "low": (SplitTransformer(components.transformer_2), request.guidance_low),
    }
    ratios: list[tuple[float, float]] = []
    previous: torch.Tensor | None = None
    for t in solver.timesteps:
        split, guidance = experts[expert_for(t, boundary)]
        item = GuidedInput(
            latents=latents, timestep=t, cond=cond, uncond=uncond, guidance=guidance, condition=condition
        )
        out = cached_guided_forward(split, [item], [None], [True])
        residual = out.residuals[0]
        if previous is None:
            ratios.append((1.0, 1.0))
        else:
            norms = residual.float().norm(dim=-1) / previous.float().norm(dim=-1)  # (rows, tokens)
            ratios.append(tuple(round(float(value), 5) for value in norms.mean(dim=1)))
        previous = residual
        latents = solver.step(out.noise[0][None], t, latents[None], return_dict=False)[0][0]
    return MagnitudeCurve(
        cond=tuple(c for c, _ in ratios),
        uncond=tuple(u for _, u in ratios),
        source=f"calibrate({components.source!r}, {request.width}x{request.height}, "
        f"{request.num_frames} frames, {request.steps} steps, seed {request.seed})",
    )


@functools.lru_cache(maxsize=4)
def calibration_curve(source: str, model: ModelSpec, task: str | None = None) -> MagnitudeCurve | None:
    """The curve for a model source: a preset is calibrated on itself (seeded, so the same every time);
    real Wan2.2 T2V-A14B weights use MagCache's published ratios, real I2V weights have none (None).
    `task`: the source's (t2v or i2v); None: a preset's own, else t2v."""
    if not has_curve(source, task):
        return None
    if source in PRESETS:
        return calibrate(build_preset(source, model), calibration_request(model))
    return MagnitudeCurve.load(WAN22_T2V_A14B_CURVE)


def has_curve(source: str, task: str | None = None) -> bool:
    """Whether `calibration_curve` has a curve for the source, without measuring it: what admission and
    the models list tell a step-cache request by (real I2V weights have none)."""
    return source in PRESETS or (task or "t2v") != "i2v"
