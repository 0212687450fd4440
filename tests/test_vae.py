"""VAEDecoder: uint8 frames made on the device in the configured dtype, equal to the float32 numpy path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from pipeline.vae import VAEDecoder, decode_dtype, num_video_frames
from pipeline.vae_memory import MEMORY_MARGIN, TILES, estimate_bytes
from pipeline.weights import PRESETS


def preset_vae(name: str) -> AutoencoderKLWan:
    """The preset's VAE alone, with its seeded random weights (what build_preset makes first is the
    transformers, so these weights differ from the preset's; the tests only need a fixed VAE)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PRESETS[name].seed)
        return AutoencoderKLWan(**PRESETS[name].vae).eval().requires_grad_(False)


def latents(shape: tuple[int, int, int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def numpy_path(decoder: VAEDecoder, z: torch.Tensor) -> np.ndarray:
    """What the decoder did before frames were made on the device: float chunks to the host, then numpy."""
    chunks = [(chunk.cpu().numpy() * 255).round().astype(np.uint8) for chunk in decoder.decode_chunks(z)]
    return np.concatenate(chunks)


def test_auto_dtype_is_bf16_on_cuda_and_float32_on_cpu() -> None:
    assert decode_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert decode_dtype("auto", torch.device("cpu")) == torch.float32
    assert decode_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert VAEDecoder(preset_vae("tiny")).dtype == torch.float32


@pytest.mark.parametrize("shape", [(16, 3, 4, 6), (16, 1, 5, 3)])
def test_device_uint8_frames_equal_numpy_path_bit_for_bit(shape: tuple[int, int, int, int]) -> None:
    decoder = VAEDecoder(preset_vae("tiny"))
    z = latents(shape)
    steps: list[tuple[int, int]] = []
    frames = decoder.decode(z, fps=16, progress=lambda done, total: steps.append((done, total)))
    assert frames.pixels.shape == (num_video_frames(shape[1]), shape[2] * 8, shape[3] * 8, 3)
    np.testing.assert_array_equal(frames.pixels, numpy_path(decoder, z))
    assert steps == [(done, shape[1]) for done in range(1, shape[1] + 1)]


def test_a_size_over_the_memory_bound_is_decoded_in_tiles_not_failed() -> None:
    vae = preset_vae("tiny")
    shape = (16, 2, 12, 12)  # 96 x 96 pixels: two 64-pixel tiles a side
    full = estimate_bytes(vae.config, shape, torch.float32)
    tiled = estimate_bytes(vae.config, shape, torch.float32, TILES[-1])
    assert tiled < full
    bound = int(tiled / MEMORY_MARGIN) + 1
    decoder = VAEDecoder(vae, memory_bound_bytes=bound)
    plan = decoder.plan(shape)
    assert (plan.mode, plan.tile, plan.fits, plan.budget_bytes) == ("tiled", TILES[-1], True, bound)
    z = latents(shape)
    frames = decoder.decode(z, fps=16, plan=plan)
    assert frames.pixels.shape == (5, 96, 96, 3)
    # exactly diffusers' own tiled decode with that tile
    vae.enable_tiling(64, 64, 48, 48)
    with torch.inference_mode():
        video = vae.decode(decoder.denormalize(z[None]), return_dict=False)[0]
    reference = ((video[0].permute(1, 2, 3, 0) / 2 + 0.5).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(frames.pixels, reference)


def test_full_frames_when_they_fit_and_smallest_tile_when_nothing_does() -> None:
    vae = preset_vae("tiny")
    shape = (16, 2, 12, 12)
    assert VAEDecoder(vae).plan(shape).mode == "full"  # CPU: no free-memory reading, no bound
    roomy = VAEDecoder(vae, memory_bound_bytes=2 * estimate_bytes(vae.config, shape, torch.float32))
    assert roomy.plan(shape).mode == "full"
    cramped = VAEDecoder(vae, memory_bound_bytes=1024).plan(shape)
    assert (cramped.mode, cramped.tile, cramped.fits) == ("tiled", TILES[-1], False)
    assert "64-pixel tiles" in cramped.describe()
    assert VAEDecoder(vae, spatial_tiling=True).plan(shape).tile == TILES[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_bf16_decode_stays_close_to_float32_on_small() -> None:
    z = latents((16, 2, 8, 10), seed=1)
    reference = VAEDecoder(preset_vae("small"), dtype=torch.float32).decode(z, fps=16).pixels
    bf16 = VAEDecoder(preset_vae("small"), dtype=torch.bfloat16)
    assert bf16.vae.dtype == torch.bfloat16
    value = psnr(bf16.decode(z, fps=16).pixels, reference)
    print(f"bf16 vs float32 decode PSNR on `small` (CPU): {value:.1f} dB")
    # bf16 keeps 8 mantissa bits (relative error 2^-9 per value); through a few dozen random-weight layers
    # the error grows to a few uint8 levels at worst: 35 dB is an RMS error of about 4.5 levels of 255.
    assert value > 35.0
