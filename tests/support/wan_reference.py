"""Reference runs shared by the equivalence tests: the stage classes vs diffusers' WanPipeline."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.denoise import Denoiser, initial_state
from pipeline.spec import RequestSpec, ResolvedRequest, resolve
from pipeline.text import TextEncoder
from pipeline.vae import VAEDecoder
from pipeline.weights import WanComponents, wan_pipeline

MAX_ABS_DIFF = 1e-4


def run_staged(components: WanComponents, request: RequestSpec) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Frames in [0, 1] from the stage classes, and the timesteps each expert saw."""
    model = components.model
    resolved = resolve(request, model)
    encoder = TextEncoder(
        components.tokenizer, components.text_encoder, max_sequence_length=model.max_sequence_length
    )
    prompt, negative = encoder.encode([resolved.prompt, resolved.negative_prompt])
    seen: dict[str, list[int]] = {"high": [], "low": []}
    state = initial_state(resolved, model)
    for expert, transformer, guidance in (
        ("high", components.transformer, resolved.guidance_high),
        ("low", components.transformer_2, resolved.guidance_low),
    ):
        denoiser = Denoiser(
            transformer, components.scheduler, expert=expert, boundary_ratio=model.boundary_ratio
        )
        hook = transformer.register_forward_pre_hook(
            lambda _m, _a, kw, expert=expert: seen[expert].extend(kw["timestep"].unique().tolist()),
            with_kwargs=True,
        )
        try:
            state = denoiser.run(state, prompt, negative, guidance)
        finally:
            hook.remove()
    assert state.is_done
    frames = torch.cat(list(VAEDecoder(components.vae).decode_chunks(state.latents)))
    return frames.numpy(), seen


def diffusers_arguments(resolved: ResolvedRequest, max_sequence_length: int) -> dict[str, Any]:
    """The call arguments of diffusers' Wan pipelines (text- and image-to-video) for a resolved request."""
    return dict(
        prompt=resolved.prompt,
        negative_prompt=resolved.negative_prompt,
        height=resolved.height,
        width=resolved.width,
        num_frames=resolved.num_frames,
        num_inference_steps=resolved.steps,
        guidance_scale=resolved.guidance_high,
        guidance_scale_2=resolved.guidance_low,
        generator=torch.Generator("cpu").manual_seed(resolved.seed),
        max_sequence_length=max_sequence_length,
    )


def run_diffusers(components: WanComponents, request: RequestSpec) -> tuple[np.ndarray, dict[str, list[int]]]:
    model = components.model
    resolved = resolve(request, model)
    pipe = wan_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    seen: dict[str, list[int]] = {"high": [], "low": []}
    hooks = [
        module.register_forward_pre_hook(
            lambda _m, _a, kw, expert=expert: seen[expert].extend(kw["timestep"].unique().tolist()),
            with_kwargs=True,
        )
        for expert, module in (("high", components.transformer), ("low", components.transformer_2))
    ]
    try:
        video = pipe(**diffusers_arguments(resolved, model.max_sequence_length), output_type="np").frames[0]
    finally:
        for hook in hooks:
            hook.remove()
    return np.asarray(video), seen


def tiny_request(**overrides) -> RequestSpec:
    fields = dict(
        prompt="a man in a black trench coat leaps from a tower",
        negative_prompt="blurry, static",
        resolution="96x64",
        duration=0.5,
        steps=8,
        seed=1234,
    )
    return RequestSpec(**(fields | overrides))


def panel(width: int, height: int, seed: int) -> np.ndarray:
    """A drawn-looking storyboard panel: smooth colour ramps plus a seeded block, uint8 (height, width, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 255
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    image[top : top + height // 3, left : left + width // 3] = rng.integers(0, 256, 3)
    return image.astype(np.uint8)


def run_diffusers_i2v_latents(
    components: WanComponents, request: RequestSpec, first: np.ndarray, last: np.ndarray | None = None
) -> torch.Tensor:
    """The final latents (channels, frames, height, width) of diffusers' WanImageToVideoPipeline on
    `components` (an I2V preset), conditioned on `first` (and `last`) given as PIL images."""
    from PIL import Image

    model = components.model
    resolved = resolve(request, model)
    pipe = wan_pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(
        image=Image.fromarray(first),
        last_image=None if last is None else Image.fromarray(last),
        **diffusers_arguments(resolved, model.max_sequence_length),
        output_type="latent",
    ).frames
    return latents[0].float()
