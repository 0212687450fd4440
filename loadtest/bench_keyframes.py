"""What an I2V shot costs beyond a T2V one, as ratios measured in one run on this machine:

    python -m loadtest.bench_keyframes --preset small-i2v --size 416x240 --frames 17

- `encode / decode`: the keyframe encode (pipeline.vae_encode: the VAE's encoder over a clip-length video,
  first frame only and first + last) against the decode of the same clip's latents: why the encode is a
  deployment of its own (VAEEncoder) rather than a second job for the decoders' line.
- `i2v step / t2v step`: one guided forward (cond + uncond rows) of the I2V expert (36 input channels:
  latents + condition) against its T2V twin's (16), the same tokens: the condition widens only the patch
  embedding, so the step should cost about the same.

Wall times are the median of `--repeats` runs after one warm-up; ratios, not seconds, are the result.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from pipeline.denoise.forward import GuidedInput, guided_forward
from pipeline.vae import VAEDecoder
from pipeline.vae_encode import Keyframes, VAEEncoder
from pipeline.weights import PRESETS, build_preset


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.inference_mode()
def measure(preset: str, width: int, height: int, num_frames: int, repeats: int) -> dict[str, float]:
    """name -> median seconds of each variant, and the two ratios."""
    i2v = build_preset(preset)
    t2v = build_preset(PRESETS[preset].shares or preset)
    rng = np.random.default_rng(0)
    first, last = (rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(2))
    encoder, decoder = VAEEncoder(i2v.vae), VAEDecoder(i2v.vae)
    condition = encoder.encode(Keyframes(first=first), num_frames)
    latents = torch.randn(16, *condition.shape[1:], generator=torch.Generator().manual_seed(1))
    embeds = torch.randn(i2v.model.max_sequence_length, i2v.transformer.config.text_dim)
    timestep = torch.tensor(999)

    def step(transformer, with_condition: bool) -> Callable[[], object]:
        row = GuidedInput(latents, timestep, embeds, embeds, 3.5, condition if with_condition else None)
        return lambda: guided_forward(transformer, [row])

    seconds = {
        "encode first": median_seconds(lambda: encoder.encode(Keyframes(first=first), num_frames), repeats),
        "encode first+last": median_seconds(
            lambda: encoder.encode(Keyframes(first=first, last=last), num_frames), repeats
        ),
        "decode": median_seconds(lambda: decoder.decode(latents, fps=16), repeats),
        "i2v step": median_seconds(step(i2v.transformer, True), repeats),
        "t2v step": median_seconds(step(t2v.transformer, False), repeats),
    }
    seconds["encode / decode"] = seconds["encode first"] / seconds["decode"]
    seconds["i2v step / t2v step"] = seconds["i2v step"] / seconds["t2v step"]
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="small-i2v", choices=[n for n, p in PRESETS.items() if p.task == "i2v"]
    )
    parser.add_argument("--size", default="416x240", help="WxH, multiples of 16")
    parser.add_argument("--frames", type=int, default=17, help="4k + 1")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    width, height = map(int, args.size.split("x"))
    if (args.frames - 1) % 4:
        parser.error(f"--frames must be 4k + 1 but is {args.frames}")
    results = measure(args.preset, width, height, args.frames, args.repeats)
    print(
        f"python -m loadtest.bench_keyframes --preset {args.preset} --size {args.size} --frames {args.frames}"
    )
    for name, value in results.items():
        unit = "" if "/" in name else " s"
        print(f"{name:<22} {value:8.3f}{unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
