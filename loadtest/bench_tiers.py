"""Quality tiers side by side, in one process: per clip, wall time, transformer forwards and rows, and the
PSNR of the decoded draft against the decoded final take of the same seed.

    python -m loadtest.bench_tiers --preset small            # 2 clips, 96x64, 1 s, CPU
    python -m loadtest.bench_tiers --preset tiny --sizes 160x96 --clips 3

`final` is the official recipe (40 steps, CFG 4.0/3.0, UniPC, shift 12); `draft` the 4-step distill
recipe (Euler, shift 5, no CFG) with the preset's built-in distill LoRA. On a preset the LoRA is seeded
random, not distilled, so the PSNR says how far the two tiers' takes are apart, not how good a real
distilled draft is; the forward and row counts and the time ratio are what carry over. Step caching
(final + cache) joins this table where the engine gains it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.denoise import Denoiser, initial_state
from pipeline.denoise.adapters import load_bank
from pipeline.denoise.state import tier_solvers
from pipeline.lora import distill_folder
from pipeline.spec import DISTILL_ADAPTER, RequestSpec, resolve
from pipeline.text import TextEncoder
from pipeline.vae import VAEDecoder
from pipeline.weights import build_preset

TIERS = ("final", "draft")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Of uint8 frames."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=("tiny", "small"))
    parser.add_argument("--sizes", default="96x64", help="Comma-separated WxH.")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--clips", type=int, default=2, help="Clips (seeds) per size.")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    components = build_preset(args.preset)
    model = components.model
    encoder = TextEncoder(
        components.tokenizer, components.text_encoder, max_sequence_length=model.max_sequence_length
    )
    with tempfile.TemporaryDirectory() as cache:
        folders = {DISTILL_ADAPTER: distill_folder("builtin", args.preset, cache_dir=Path(cache))}
        experts = {"high": components.transformer, "low": components.transformer_2}
        solvers = tier_solvers(model, components.scheduler)
        denoisers = {
            expert: Denoiser(
                transformer,
                components.scheduler,
                expert=expert,
                boundary_ratio=model.boundary_ratio,
                max_sequence_length=model.max_sequence_length,
                solvers=solvers,
                adapters=load_bank(transformer, expert, folders),
            )
            for expert, transformer in experts.items()
        }
    rows: list[int] = []
    hooks = [
        transformer.register_forward_pre_hook(
            lambda _m, _a, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
        )
        for transformer in experts.values()
    ]
    decoder = VAEDecoder(components.vae)
    print(f"# python -m loadtest.bench_tiers {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# preset {args.preset}, {torch.get_num_threads()} CPU threads")
    print("| clip | tier | steps | forwards | rows | seconds | time / final | PSNR vs final (dB) |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        for clip in range(args.clips):
            results = {}
            for quality in TIERS:
                spec = RequestSpec(
                    prompt="a courier runs across rooftops at dusk, handheld",
                    resolution=size,
                    duration=args.seconds,
                    seed=100 + clip,
                    quality=quality,
                )
                resolved = resolve(spec, model)
                prompt, negative = encoder.encode([resolved.prompt, resolved.negative_prompt])
                state = initial_state(resolved, model)
                rows.clear()
                started = time.perf_counter()
                for expert, guidance in (("high", resolved.guidance_high), ("low", resolved.guidance_low)):
                    state = denoisers[expert].run(
                        state,
                        prompt,
                        negative,
                        guidance,
                        quality=quality,
                        adapters=resolved.adapters(model),
                    )
                seconds = time.perf_counter() - started
                frames = torch.from_numpy(decoder.decode(state.latents, fps=resolved.fps).pixels)
                results[quality] = (resolved.steps, len(rows), sum(rows), seconds, frames)
            final_seconds, final_frames = results["final"][3], results["final"][4]
            for quality, (steps, forwards, num_rows, seconds, frames) in results.items():
                quality_psnr = "—" if quality == "final" else f"{psnr(frames, final_frames):.1f}"
                print(
                    f"| {size} #{clip} | {quality} | {steps} | {forwards} | {num_rows} | {seconds:.2f} | "
                    f"{seconds / final_seconds:.3f} | {quality_psnr} |"
                )
    for hook in hooks:
        hook.remove()


if __name__ == "__main__":
    main()
