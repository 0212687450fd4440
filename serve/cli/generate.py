"""`previz generate`: one clip in this process, no cluster (the artist's and the benchmark's path)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from pipeline.stages import STEP_LABELS
from serve.cli.common import CliError, app, console

if TYPE_CHECKING:  # imported lazily below, so `previz` starts without loading torch
    from pipeline.local import FinishOptions
    from pipeline.lut import Lut
    from pipeline.safety import FrameCheck

STAGE_LABELS = STEP_LABELS  # step -> what its progress bar shows, from the stage table


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="What the shot shows.", show_default=False)] = None,
    shot: Annotated[Path | None, typer.Option(help="Structured shot spec (YAML/JSON).")] = None,
    negative_prompt: Annotated[
        str | None, typer.Option(help="What to avoid (default: Wan2.2's own).")
    ] = None,
    resolution: Annotated[str, typer.Option(help="480p, 720p or WxH (multiples of 16).")] = "480p",
    aspect: Annotated[str | None, typer.Option(help="16:9 or 9:16, for 480p/720p.")] = None,
    duration: Annotated[float, typer.Option(help="Clip length in seconds.")] = 5.0,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the tier's).")] = None,
    quality: Annotated[
        str, typer.Option(help="final (40 steps, CFG) or draft (4-step distill LoRA, no CFG).")
    ] = "final",
    draft_lora: Annotated[
        str | None,
        typer.Option(help="Distill LoRA folder or s3:// prefix of the draft tier (presets: built in)."),
    ] = None,
    draft_decoder: Annotated[
        str,
        typer.Option(
            help="The draft tier's decoder: vae (the full Wan VAE) or fast (TAEHV's tiny decoder, as a "
            "cluster's `decoder.draft: fast`; several times faster, softer). Finals always use the VAE."
        ),
    ] = "vae",
    fast_weights: Annotated[
        str,
        typer.Option(
            help="The fast decoder's weights: TAEHV's published taew2_1.pth (or .safetensors), or builtin "
            "(the presets' seeded random ones)."
        ),
    ] = "builtin",
    seed: Annotated[int | None, typer.Option(help="Noise seed (random when omitted).")] = None,
    cache_threshold: Annotated[
        float | None,
        typer.Option(
            help="Step caching (MagCache) of a final clip at this threshold; default: the final tier's "
            "(0.06, 10 warm-up steps); 0 never skips. Not with --quality draft."
        ),
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Run every step (no step caching).")] = False,
    model: Annotated[
        str, typer.Option(help="tiny | small | Diffusers folder | s3://bucket/prefix.")
    ] = "tiny",
    upscale: Annotated[str, typer.Option(help="none | 720p | 1080p.")] = "none",
    look: Annotated[str, typer.Option(help="none | film.")] = "none",
    lut: Annotated[
        Path | None,
        typer.Option(help="A .cube 3D LUT file to grade with instead of --look (tetrahedral, as a cluster)."),
    ] = None,
    fps: Annotated[
        int | None, typer.Option(help="Delivered frame rate: 16, 24 or 25 (motion-interpolated from 16).")
    ] = None,
    sr_weights: Annotated[
        Path | None, typer.Option(help="Real-ESRGAN-family weights file for upscaling.")
    ] = None,
    label: Annotated[bool, typer.Option(help="Burn the 'AI-generated draft' label into frames.")] = True,
    frame_check: Annotated[
        str | None,
        typer.Option(
            help="`module:callable` called with the finished frames, as a cluster's `safety.frame_check`: "
            "a clip it blocks is not written (exit 2)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    ulysses: Annotated[
        int, typer.Option(help="Shard each expert forward over N processes (sequence parallel).")
    ] = 1,
    cfg_parallel: Annotated[
        bool, typer.Option(help="Run cond and uncond rows on two halves of the processes (x2).")
    ] = False,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the mp4.")] = Path("out.mp4"),
    image: Annotated[
        Path | None,
        typer.Option(help="The shot's first frame (a storyboard panel) for an I2V model (tiny-i2v, ...)."),
    ] = None,
    last_image: Annotated[
        Path | None,
        typer.Option(help="Its last frame too (experimental: Wan2.2 I2V was not trained for it)."),
    ] = None,
) -> None:
    """Generate one clip in this process and write it as an mp4 (from `--image` with an I2V model)."""
    from pipeline.denoise.parallel import ParallelDegree
    from pipeline.finish import ClipFinish
    from pipeline.interpolate import CONFORM_RATES
    from pipeline.local import FinishOptions
    from pipeline.prompt import ShotSpecError, compose_prompt, load_shot_file
    from pipeline.s3sync import parse_s3_uri
    from pipeline.safety import ContentBlocked, FrameCheck, PromptPolicy, SafetySettings
    from pipeline.spec import DEFAULT_FINAL_CACHE, RequestSpec, describe_validation_error
    from pipeline.upscale import upscale_target_size
    from pipeline.video import DRAFT_LABEL

    try:
        shot_spec = load_shot_file(shot) if shot is not None else None
        text = compose_prompt(prompt, shot_spec)
        verdict = PromptPolicy.from_settings(SafetySettings()).check(text)  # the server's default policy
        if verdict is not None:
            raise CliError(str(ContentBlocked.of(verdict)))
        fields = dict(
            prompt=text,
            resolution=resolution,
            aspect=aspect,
            duration=duration,
            steps=steps,
            seed=seed,
            quality=quality,
        )
        if negative_prompt is not None:
            fields["negative_prompt"] = negative_prompt
        if no_cache and cache_threshold is not None:
            raise ValueError("give `--cache-threshold` or `--no-cache`, not both.")
        if no_cache:
            fields["cache"] = None  # named None: every step runs (omitted: the tier's default)
        elif cache_threshold is not None:  # the final tier's max_skip and warm-up
            fields["cache"] = {**DEFAULT_FINAL_CACHE.model_dump(), "threshold": cache_threshold}
        request = RequestSpec(**fields)
        upscale_target_size(upscale, *request.size)
        grade_lut = None
        if lut is not None:
            if look != "none":
                raise ValueError("give `--look` or `--lut`, not both.")
            look, grade_lut = lut.name, _read_lut(lut)  # a built-in look's name never ends in .cube
        if fps is not None and fps not in CONFORM_RATES:
            raise ValueError(f"`--fps` must be one of 16, 24, 25 but is {fps}.")
        ClipFinish(seed=0, look=look, lut=grade_lut)
        finish = FinishOptions(
            upscale=upscale, look=look, lut=grade_lut, label=DRAFT_LABEL if label else None, fps=fps
        )
        check = FrameCheck.from_settings(SafetySettings(frame_check=frame_check))
        if model.startswith("s3://"):
            parse_s3_uri(model)
        if ulysses < 1:
            raise ValueError(f"`--ulysses` must be >= 1 but is {ulysses}.")
        degree = ParallelDegree(ulysses=ulysses, cfg=2 if cfg_parallel else 1)
        if draft_decoder not in ("vae", "fast"):
            raise ValueError(f"`--draft-decoder` must be vae or fast but is {draft_decoder!r}.")
        if draft_decoder == "fast" and request.quality != "draft":
            raise ValueError(
                "`--draft-decoder fast` is for `--quality draft`: a final always decodes with the full VAE."
            )
    except ValidationError as error:
        raise CliError(describe_validation_error(error)) from None
    except (ShotSpecError, ValueError) as error:
        raise CliError(str(error)) from None
    if output.suffix.lower() != ".mp4":
        raise CliError(f"`--output` must end in .mp4 but is {str(output)!r}.")
    if sr_weights is not None and not sr_weights.is_file():
        raise CliError(f"`--sr-weights` {str(sr_weights)!r} is not a file.")
    keyframes = _read_keyframes(image, last_image, request.size)
    output.parent.mkdir(parents=True, exist_ok=True)
    _run_generate(
        request,
        model,
        output,
        finish,
        sr_weights=sr_weights,
        frame_check=check,
        device=device,
        degree=degree,
        draft_lora=draft_lora,
        fast_weights=fast_weights if draft_decoder == "fast" else None,
        keyframes=keyframes,
    )


def _read_keyframes(first: Path | None, last: Path | None, size: tuple[int, int]):
    """The keyframes of `--image` (and `--last-image`), fitted to the clip's size by the cluster's rule
    (serve.jobs.keyframes.fit_to_size: cover, then centre-crop); None without `--image`."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from pipeline.vae_encode import Keyframes
    from serve.jobs.keyframes import fit_to_size

    if first is None:
        if last is not None:
            raise CliError("`--last-image` needs `--image` (the first frame).")
        return None
    images = []
    for flag, path in (("--image", first), ("--last-image", last)):
        if path is None:
            images.append(None)
            continue
        try:
            with Image.open(path) as opened:
                images.append(np.asarray(fit_to_size(opened, *size)))
        except (OSError, UnidentifiedImageError) as error:
            raise CliError(f"`{flag}` {str(path)!r} is not an image: {error}") from None
    return Keyframes(first=images[0], last=images[1])


def _read_lut(path: Path) -> Lut:
    """The LUT of a .cube file; ValueError says what is wrong with it."""
    from pipeline.finish import lut_from_cube

    if not path.is_file():
        raise ValueError(f"`--lut` {str(path)!r} is not a file.")
    try:
        return lut_from_cube(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"`--lut` {str(path)!r} is not a 3D .cube LUT: {error}") from None


def _run_generate(
    request,
    model: str,
    output: Path,
    finish: FinishOptions,
    *,
    sr_weights: Path | None,
    frame_check: FrameCheck | None,
    device: str | None,
    degree,
    draft_lora: str | None = None,
    fast_weights: str | None = None,
    keyframes=None,
) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    from pipeline.denoise.parallel import ShardGroupError
    from pipeline.determinism import use_deterministic_kernels
    from pipeline.local import request_shape_problem, sharded_pipeline
    from pipeline.s3sync import S3SyncError
    from pipeline.safety import ContentBlocked, SafetyCheckError
    from pipeline.taehv import FastDecoder, fast_decoder_network
    from pipeline.upscale import Upscaler
    from pipeline.weights import load_components

    download = Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
    )
    use_deterministic_kernels()  # the same seed gives the same clip as the cluster's stages do
    with download, console.status(f"loading model {model} …"):
        task = download.add_task("download weights", total=None, visible=model.startswith("s3://"))
        try:
            components = load_components(
                model,
                device=device,
                progress=lambda done, total: download.update(task, completed=done, total=total),
            )
        except (FileNotFoundError, ValueError, S3SyncError) as error:
            raise CliError(str(error)) from None
        except (BotoCoreError, ClientError) as error:
            raise CliError(f"cannot read {model}: {error}") from None
        upscaler = Upscaler.from_file(sr_weights) if sr_weights is not None else None
        fast = None
        if fast_weights is not None:  # the draft tier's TAEHV, beside the VAE, as a cluster's decoder
            try:
                fast = FastDecoder(fast_decoder_network(fast_weights, model, components.vae.device))
            except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
                raise CliError(f"`--fast-weights`: {error}") from None
    problem = request_shape_problem(components, request, degree)
    if problem is None and (keyframes is not None) != (components.task == "i2v"):
        problem = (
            f"model {model} is image-to-video: give `--image`"
            if components.task == "i2v"
            else f"`--image` needs an image-to-video model (tiny-i2v, a Wan2.2 I2V folder), not {model}"
        )
    if problem is not None:  # before any rank starts
        raise CliError(problem)
    with ExitStack() as stack:
        try:
            with console.status(f"starting {degree.world_size} ranks …", spinner="dots"):
                pipeline = stack.enter_context(
                    sharded_pipeline(
                        components,
                        degree,
                        upscaler=upscaler,
                        draft_lora=draft_lora,
                        frame_check=frame_check,
                        draft_decoder=fast,
                    )
                )
        except (ValueError, FileNotFoundError, ShardGroupError) as error:
            raise CliError(str(error)) from None
        try:
            result = _run_stages(pipeline, request, output, finish, keyframes)
        except (ShardGroupError, ContentBlocked, SafetyCheckError) as error:
            raise CliError(str(error)) from None  # a blocked clip is not written
    _print_result(result)


def _run_stages(pipeline, request, output: Path, finish: FinishOptions, keyframes=None):
    from pipeline.local import I2V_STAGES, STAGES

    stages = I2V_STAGES if keyframes is not None else STAGES  # an I2V clip shows its keyframe encode too
    steps = pipeline.steps_per_expert(request)
    progress = Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    totals = {"denoise_high": steps["high"], "denoise_low": steps["low"]}
    tasks = {stage: progress.add_task(STAGE_LABELS[stage], total=totals.get(stage, 1)) for stage in stages}

    def on_progress(stage: str, done: int, total: int) -> None:
        progress.update(tasks[stage], completed=done, total=total)

    with progress:
        result = pipeline.generate(
            request,
            output,
            finish=finish,
            progress=on_progress,
            keyframes=keyframes,
        )
        for stage in stages:  # stages with nothing to do (no upscale, zero low steps) still show as done
            progress.update(tasks[stage], completed=progress.tasks[tasks[stage]].total)
    return result


def _print_result(result) -> None:
    from pipeline.local import I2V_STAGES, STAGES

    out = Console()
    out.print(
        f"{result.path}: {result.width}x{result.height}, {result.num_frames} frames, "
        f"seed {result.request.seed}"
    )
    table = Table()
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage in I2V_STAGES if "encode_image" in result.stage_seconds else STAGES:
        table.add_row(STAGE_LABELS[stage], f"{result.stage_seconds.get(stage, 0.0):.2f}")
    table.add_row("total", f"{sum(result.stage_seconds.values()):.2f}", style="bold")
    out.print(table)
