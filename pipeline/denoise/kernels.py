"""How one expert's transformer computes: its attention backend, optional regional compile, and a warm-up
forward per bucket so that compile and kernel autotuning happen before a replica takes work.

`ModelMixin.set_attention_backend` (diffusers 0.42) sets the backend on every attention processor of the
model AND makes it the process-wide default (`_AttentionBackendRegistry.set_active_backend`), which would
switch every other model of the process too (a replica may hold a text encoder or a second expert).
`set_attention_backend` here keeps the per-module part only: it restores the previous default.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from pipeline.denoise.forward import Forward, GuidedInput

ATTENTION_BACKENDS = tuple(name.value for name in AttentionBackendName)  # diffusers' names


def check_attention_backend(name: str) -> str:
    """`name` when diffusers knows it; a ValueError listing the known names otherwise."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"`attention_backend` must be one of diffusers' backends ({', '.join(ATTENTION_BACKENDS)}) "
            f"but is {name!r}."
        )
    return name


def set_attention_backend(transformer: WanTransformer3DModel, name: str) -> WanTransformer3DModel:
    """Make this model's attention use backend `name`; the process-wide default stays as it was.

    Raises diffusers' RuntimeError when the backend needs a missing package (flash-attn, kernels...)."""
    previous = _AttentionBackendRegistry._active_backend
    try:
        transformer.set_attention_backend(check_attention_backend(name))
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)
    return transformer


def attention_backends_of(transformer: WanTransformer3DModel) -> set[str]:
    """The backends this model's attention processors are set to ("default": the process-wide one)."""
    found = set()
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            backend = processor._attention_backend
            found.add("default" if backend is None else AttentionBackendName(backend).value)
    return found


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on `device` is done (a no-op on CPU, whose ops finish when they return).

    A CUDA forward returns once its kernels are queued, so wall time read before this is the launch time,
    not the compute time; step times (ETAs) and benchmarks read the clock after it. A full sync, not CUDA
    events: the engine's update right after reads every latent on the host anyway (its finite check), so
    the sync costs no extra wait, and an ETA needs wall time, host-side launch and Python time included,
    which events between two points of the stream leave out. The same sync covers a sharded forward (rank
    0's result exists only once its gather over the group finished) and both experts of a colocated one."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def compile_blocks(transformer: WanTransformer3DModel) -> WanTransformer3DModel:
    """Regional compile: each repeated transformer block is compiled once and reused (diffusers'
    `compile_repeated_blocks`), far quicker to compile than the whole model."""
    transformer.compile_repeated_blocks()
    return transformer


@torch.inference_mode()
def warm_up(
    forward: Forward,
    transformer: WanTransformer3DModel,
    latent_shapes: Iterable[tuple[int, int, int, int]],
    max_sequence_length: int,
) -> int:
    """One guided (cond + uncond) forward per latent shape through `forward`, so compiled graphs and kernel
    choices exist before the first request; returns the forwards run. Inputs are zeros: only shapes matter."""
    device = next(transformer.parameters()).device
    text = torch.zeros((max_sequence_length, transformer.config.text_dim), device=device)
    count = 0
    for shape in latent_shapes:
        latents = torch.zeros(shape, device=device)
        timestep = torch.tensor(999, dtype=torch.int64, device=device)
        forward([GuidedInput(latents=latents, timestep=timestep, cond=text, uncond=text, guidance=2.0)])
        count += 1
    return count
