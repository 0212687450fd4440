"""The `previz` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

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
from typer._click import exceptions as click_exceptions  # typer >= 0.29 vendors click

app = typer.Typer(
    name="previz",
    help="Previz: studio text-to-video drafts on Wan2.2.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)

STAGE_LABELS = {
    "encode": "text encoder",
    "denoise_high": "denoise (high-noise expert)",
    "denoise_low": "denoise (low-noise expert)",
    "decode": "VAE decode",
    "upscale": "upscale",
    "grade": "grade",
    "encode_video": "mp4 encode",
}


@app.callback()
def root() -> None:
    """Previz: studio text-to-video drafts on Wan2.2."""


class CliError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""


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
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default 40).")] = None,
    seed: Annotated[int | None, typer.Option(help="Noise seed (random when omitted).")] = None,
    model: Annotated[
        str, typer.Option(help="tiny | small | Diffusers folder | s3://bucket/prefix.")
    ] = "tiny",
    upscale: Annotated[str, typer.Option(help="none | 720p | 1080p.")] = "none",
    look: Annotated[str, typer.Option(help="none | film.")] = "none",
    sr_weights: Annotated[
        Path | None, typer.Option(help="Real-ESRGAN-family weights file for upscaling.")
    ] = None,
    label: Annotated[bool, typer.Option(help="Burn the 'AI-generated draft' label into frames.")] = True,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the mp4.")] = Path("out.mp4"),
) -> None:
    """Generate one clip in this process and write it as an mp4."""
    from pipeline.grade import Grader
    from pipeline.prompt import ShotSpecError, compose_prompt, load_shot_file
    from pipeline.s3sync import parse_s3_uri
    from pipeline.safety import ContentBlocked, PromptPolicy, SafetySettings
    from pipeline.spec import RequestSpec, describe_validation_error
    from pipeline.upscale import upscale_target_size

    try:
        shot_spec = load_shot_file(shot) if shot is not None else None
        text = compose_prompt(prompt, shot_spec)
        verdict = PromptPolicy.from_settings(SafetySettings()).check(text)  # the server's default policy
        if verdict is not None:
            raise CliError(str(ContentBlocked.of(verdict)))
        fields = dict(
            prompt=text, resolution=resolution, aspect=aspect, duration=duration, steps=steps, seed=seed
        )
        if negative_prompt is not None:
            fields["negative_prompt"] = negative_prompt
        request = RequestSpec(**fields)
        upscale_target_size(upscale, *request.size)
        Grader(look)
        if model.startswith("s3://"):
            parse_s3_uri(model)
    except ValidationError as error:
        raise CliError(describe_validation_error(error)) from None
    except (ShotSpecError, ValueError) as error:
        raise CliError(str(error)) from None
    if output.suffix.lower() != ".mp4":
        raise CliError(f"`--output` must end in .mp4 but is {str(output)!r}.")
    if sr_weights is not None and not sr_weights.is_file():
        raise CliError(f"`--sr-weights` {str(sr_weights)!r} is not a file.")
    output.parent.mkdir(parents=True, exist_ok=True)
    _run_generate(
        request, model, output, upscale=upscale, look=look, sr_weights=sr_weights, label=label, device=device
    )


def _run_generate(
    request,
    model: str,
    output: Path,
    *,
    upscale: str,
    look: str,
    sr_weights: Path | None,
    label: bool,
    device: str | None,
) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    from pipeline.local import STAGES, FinishOptions, LocalPipeline
    from pipeline.s3sync import S3SyncError
    from pipeline.upscale import Upscaler
    from pipeline.weights import load_components

    download = Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
    )
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
        pipeline = LocalPipeline(components, upscaler=upscaler)
    steps = pipeline.steps_per_expert(request)
    progress = Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    totals = {"denoise_high": steps["high"], "denoise_low": steps["low"]}
    tasks = {stage: progress.add_task(STAGE_LABELS[stage], total=totals.get(stage, 1)) for stage in STAGES}

    def on_progress(stage: str, done: int, total: int) -> None:
        progress.update(tasks[stage], completed=done, total=total)

    with progress:
        result = pipeline.generate(
            request,
            output,
            finish=FinishOptions(upscale=upscale, look=look, label="AI-generated draft" if label else None),
            progress=on_progress,
        )
        for stage in STAGES:  # stages with nothing to do (no upscale, zero low steps) still show as done
            progress.update(tasks[stage], completed=progress.tasks[tasks[stage]].total)

    out = Console()
    out.print(
        f"{result.path}: {result.width}x{result.height}, {result.num_frames} frames, "
        f"seed {result.request.seed}"
    )
    table = Table()
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage in STAGES:
        table.add_row(STAGE_LABELS[stage], f"{result.stage_seconds.get(stage, 0.0):.2f}")
    table.add_row("total", f"{sum(result.stage_seconds.values()):.2f}", style="bold")
    out.print(table)


DEMO_PROMPT = (
    "a man in a black trench coat leaps from a tower, flips twice, lands; explosion behind; slow motion"
)


@app.command()
def up(
    config: Annotated[Path, typer.Option(help="Serve config YAML.")] = Path("deploy/local.yaml"),
    port: Annotated[int | None, typer.Option(help="HTTP port (default: the config's).")] = None,
    model: Annotated[str | None, typer.Option(help="Override the config's model.")] = None,
    demo: Annotated[
        Path | None, typer.Option(help="Once ready, generate the demo shot into this mp4.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Keep serving until Ctrl-C.")] = True,
    with_monitoring: Annotated[
        bool, typer.Option(help="Also start a local Prometheus (Debian package) scraping the cluster.")
    ] = False,
    prometheus_port: Annotated[int, typer.Option(help="Port of that Prometheus.")] = 9090,
) -> None:
    """Start a local Ray instance with the Previz app and print its URL."""
    import time

    from serve import launch

    started = time.monotonic()
    overrides = {"model": model} if model is not None else None
    try:
        cluster_config = launch.load_config(config, port=port, args_overrides=overrides)
    except (FileNotFoundError, ValidationError) as error:
        raise CliError(str(error).splitlines()[0]) from None
    api_key = bootstrap_default_project(cluster_config["applications"][0]["args"]["database_url"])
    with console.status("starting Ray and the Previz deployments …") as status:
        url = launch.deploy(cluster_config)
        launch.wait_ready(url, on_wait=lambda state: status.update(f"deploying Previz ({state.lower()}) …"))
    console.print(f"Previz is ready at [bold]{url}[/] ({time.monotonic() - started:.1f} s after start)")
    prometheus = None
    if with_monitoring:
        from serve.monitoring import ray_session_dir, start_prometheus

        prometheus = start_prometheus(ray_session_dir(), prometheus_port)
        console.print(f"Prometheus is at [bold]{prometheus.url}[/]")
    if demo is not None:
        from serve.client import PrevizClient

        database_url = cluster_config["applications"][0]["args"]["database_url"]
        client = PrevizClient(url, api_key=api_key or _demo_key(database_url))
        try:
            job = client.create(
                {"prompt": DEMO_PROMPT, "duration": 1, "steps": 8, "upscale": "720p", "look": "film"}
            )
            job = _follow(client, job["id"])
            if job["status"] != "completed":
                raise CliError(f"demo job {job['id']} {job['status']}: {job.get('error')}")
            client.download(job["id"], demo)
        finally:
            if api_key is None:  # the demo's own key: done with it
                _revoke_demo_key(database_url, client.http.headers["Authorization"].removeprefix("Bearer "))
        console.print(
            f"demo clip: {demo} (job {job['id']}, {sum(job['timings'].values()):.1f} s of stage compute)"
        )
    if wait:
        console.print("serving; Ctrl-C stops the cluster")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    if prometheus is not None:
        prometheus.stop()
    launch.shutdown()


def bootstrap_default_project(database_url: str) -> str | None:
    """Before the first deploy: make sure the job store has project `default` with an admin key. The key
    is PREVIZ_API_KEY when set (stored unless it is already); otherwise one is generated, once, and shown
    in a panel. Returns the key when it is known here (from the environment or just generated)."""
    import os

    from rich.panel import Panel

    from serve.jobs import JobStore

    env_key = os.environ.get("PREVIZ_API_KEY") or None
    store = JobStore(database_url)
    try:
        store.create_schema()
        generated = store.ensure_default_project("default", env_key)
    finally:
        store.close()
    if generated is not None:
        console.print(
            Panel(
                f"[bold]{generated}[/]\n\nAdmin key of project [bold]default[/]: save this key, it is not "
                "shown again.\nUse it as `export PREVIZ_API_KEY=...` or `Authorization: Bearer ...`.",
                title="Previz API key",
            )
        )
    return env_key or generated


def _demo_key(database_url: str) -> str:
    """A member key of project `default` for the demo shot, when no key is at hand."""
    from serve.jobs import JobStore

    store = JobStore(database_url)
    try:
        return store.create_key("default", "member", "previz up --demo")[1]
    finally:
        store.close()


def _revoke_demo_key(database_url: str, key: str) -> None:
    from serve.auth import key_id_of
    from serve.jobs import JobStore

    store = JobStore(database_url)
    try:
        store.revoke_key(key_id_of(key))
    finally:
        store.close()


def _follow(client, job_id: str) -> dict:
    """Poll a job with a progress bar until it finishes."""
    import time

    progress = Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        task = progress.add_task(job_id, total=100)
        while True:
            job = client.get(job_id)
            progress.update(task, completed=job["progress"], description=f"{job_id[:12]} {job['stage']}")
            if job["status"] in ("completed", "failed", "cancelled"):
                return job
            time.sleep(0.5)


# -- client commands: talk to a running Previz server --------------------------------------------------

ServerOption = Annotated[str, typer.Option("--server", envvar="PREVIZ_SERVER", help="Previz server URL.")]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="PREVIZ_API_KEY",
        help="Sent as `Authorization: Bearer KEY`; it names the project.",
    ),
]
DEFAULT_SERVER = "http://127.0.0.1:8000"
FINISHED_STATES = ("completed", "failed", "cancelled")


def _client(server: str, api_key: str | None):
    from serve.client import PrevizClient

    return PrevizClient(server, api_key=api_key, timeout_s=60)


def _api_call(call, *args, **kwargs):
    """Run one client call; API and connection errors become one-line CLI errors."""
    import httpx

    from serve.client import PrevizApiError

    try:
        return call(*args, **kwargs)
    except PrevizApiError as error:
        where = f" ({error.param})" if error.param else ""
        raise CliError(f"{error.code}{where}: {error.message}") from None
    except httpx.HTTPError as error:
        raise CliError(f"cannot reach the Previz server: {error}") from None


def _read_mapping(path: Path, what: str) -> dict:
    import json

    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CliError(f"cannot read {what} {str(path)!r}: {error.strerror}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise CliError(f"{what} {str(path)!r} is not valid JSON/YAML: {error}") from None
    if not isinstance(data, dict):
        raise CliError(f"{what} {str(path)!r} must hold a mapping, not {type(data).__name__}")
    return data


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"`--tag` must be KEY=VALUE but is {pair!r}")
        labels[key] = value
    return labels


@app.command()
def submit(
    prompt: Annotated[str | None, typer.Argument(help="What the shot shows.", show_default=False)] = None,
    shot: Annotated[Path | None, typer.Option(help="Structured shot spec (YAML/JSON).")] = None,
    storyboard: Annotated[
        Path | None, typer.Option(help="Storyboard (YAML/JSON): shots and a variant plan.")
    ] = None,
    project: Annotated[str | None, typer.Option(help="Project (default: the API key's).")] = None,
    priority: Annotated[str | None, typer.Option(help="interactive | batch (default batch).")] = None,
    size: Annotated[str | None, typer.Option(help="WxH, e.g. 832x480 (or use --resolution).")] = None,
    resolution: Annotated[str | None, typer.Option(help="480p | 720p | WxH.")] = None,
    aspect: Annotated[str | None, typer.Option(help="16:9 or 9:16, for 480p/720p.")] = None,
    seconds: Annotated[float | None, typer.Option(help="Clip length in seconds (default 5).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default 40).")] = None,
    seed: Annotated[int | None, typer.Option(help="Noise seed (random when omitted).")] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="What to avoid.")] = None,
    upscale: Annotated[str | None, typer.Option(help="none | 720p | 1080p.")] = None,
    look: Annotated[str | None, typer.Option(help="none | film.")] = None,
    label: Annotated[bool, typer.Option(help="Burn the 'AI-generated draft' label into frames.")] = True,
    tag: Annotated[
        list[str] | None, typer.Option(help="Label KEY=VALUE (repeatable): scene, shot, take.")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Retrying with the same key makes no new job.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow progress until every video finishes.")] = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Folder to download the clips into (implies --wait)."),
    ] = None,
    server: ServerOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Send a shot (or a storyboard) to a Previz server; with --wait, show live progress bars."""
    from pipeline.prompt import ShotSpecError, load_shot_file

    settings = {
        "size": size,
        "resolution": resolution,
        "aspect": aspect,
        "seconds": seconds,
        "steps": steps,
        "seed": seed,
        "negative_prompt": negative_prompt,
        "upscale": upscale,
        "look": look,
    }
    settings = {key: value for key, value in settings.items() if value is not None}
    if not label:
        settings["label"] = False
    common = {
        key: value for key, value in (("project", project), ("priority", priority)) if value is not None
    }
    labels = _labels(tag or [])
    client = _client(server, api_key)
    if storyboard is not None:
        if prompt is not None or shot is not None:
            raise CliError("give a PROMPT/--shot or a --storyboard, not both")
        board = {**_read_mapping(storyboard, "storyboard"), **common}
        if settings:  # command-line settings apply to every shot that does not set them itself
            board["shots"] = [
                {**settings, **entry} for entry in board.get("shots", []) if isinstance(entry, dict)
            ]
        if labels:
            board["labels"] = {**board.get("labels", {}), **labels}
        created = _api_call(client.create_storyboard, board, idempotency_key=idempotency_key)
        console.print(f"storyboard {created['id']}: {created['num_videos']} videos queued", highlight=False)
        Console().print(created["id"])
        if wait or output is not None:
            _follow_storyboard(client, created["id"], output)
        return
    body: dict = {**settings, **common}
    if prompt is not None:
        body["prompt"] = prompt
    if shot is not None:
        try:
            body["shot"] = load_shot_file(shot).model_dump(exclude_none=True)
        except ShotSpecError as error:
            raise CliError(str(error)) from None
    if labels:
        body["labels"] = labels
    video = _api_call(client.create, body, idempotency_key=idempotency_key)
    console.print(
        f"video {video['id']} {video['status']} ({video['size']}, {video['seconds']} s)", highlight=False
    )
    Console().print(video["id"])
    if wait or output is not None:
        video = _follow(client, video["id"])
        if video["status"] != "completed":
            raise CliError(
                f"video {video['id']} {video['status']}: {(video.get('error') or {}).get('message')}"
            )
        if output is not None:
            path = _api_call(client.download, video["id"], output / f"{video['id']}.mp4")
            console.print(f"saved {path}", highlight=False)


def _follow_storyboard(client, storyboard_id: str, output: Path | None) -> None:
    """One progress bar per video of the board until all finish; then download the completed ones."""
    import time

    progress = Progress(
        TextColumn("{task.description:<40}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
    )
    tasks: dict[str, int] = {}
    with progress:
        while True:
            board = _api_call(client.get_storyboard, storyboard_id)
            for shot in board["shots"]:
                for video in shot["videos"]:
                    shot_name = shot["name"] or f"shot {shot['index'] + 1}"
                    name = f"{shot_name} v{video['variant']}"
                    if video["video_id"] not in tasks:
                        tasks[video["video_id"]] = progress.add_task(name, total=100)
                    progress.update(
                        tasks[video["video_id"]],
                        completed=video["progress"],
                        description=f"{name} {video['stage']}",
                    )
            if board["status"] in ("completed", "failed"):
                break
            time.sleep(0.5)
    console.print(f"storyboard {storyboard_id} {board['status']}: {board['counts']}", highlight=False)
    if output is not None:
        for shot in board["shots"]:
            for video in shot["videos"]:
                if video["status"] == "completed":
                    name = f"{shot['index'] + 1:02d}-{shot['name'] or 'shot'}-v{video['variant']}.mp4"
                    _api_call(client.download, video["video_id"], output / name)
        console.print(f"saved {board['counts'].get('completed', 0)} clips in {output}", highlight=False)
    if board["status"] != "completed":
        raise CliError(f"storyboard {storyboard_id} {board['status']}: {board['counts']}")


@app.command()
def status(
    video_id: Annotated[str, typer.Argument(help="A video id (vid_…) or a storyboard id (sb_…).")],
    server: ServerOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Show a video's (or storyboard's) state, progress and links."""
    client = _client(server, api_key)
    out = Console()
    if video_id.startswith("sb_"):
        board = _api_call(client.get_storyboard, video_id)
        out.print(f"{board['id']} {board['status']} {board['progress']}% {board['counts']}", highlight=False)
        table = Table("shot", "variant", "video", "status", "progress", "content")
        for shot in board["shots"]:
            for video in shot["videos"]:
                table.add_row(
                    shot["name"] or str(shot["index"] + 1),
                    str(video["variant"]),
                    video["video_id"],
                    video["status"],
                    f"{video['progress']}%",
                    video["content_url"] or "",
                )
        out.print(table)
        return
    video = _api_call(client.get, video_id)
    out.print(
        f"{video['id']} {video['status']} ({video['stage']}) {video['progress']}%  "
        f"project {video['project']}, {video['size']}, {video['seconds']} s, seed {video['seed']}",
        highlight=False,
    )
    if video.get("error"):
        out.print(f"error: {video['error']['code']}: {video['error']['message']}", highlight=False)
    if video.get("content_url"):
        out.print(f"content: {client.base_url}{video['content_url']}", highlight=False)


@app.command()
def fetch(
    video_id: Annotated[str, typer.Argument(help="A completed video's id.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write (default ID.mp4).")
    ] = None,
    thumbnail: Annotated[bool, typer.Option(help="Fetch the JPEG poster frame instead.")] = False,
    server: ServerOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Download a completed video's mp4 (or its poster frame)."""
    client = _client(server, api_key)
    path = output or Path(f"{video_id}.{'jpg' if thumbnail else 'mp4'}")
    _api_call(client.download, video_id, path, variant="thumbnail" if thumbnail else "video")
    Console().print(str(path), highlight=False)


@app.command()
def cancel(
    video_id: Annotated[str, typer.Argument(help="A queued or running video's id.")],
    server: ServerOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Cancel a queued or running video (its slot goes to the next queued one)."""
    _api_call(_client(server, api_key).cancel, video_id)
    Console().print(f"{video_id} cancelled", highlight=False)


@app.command("ls")
def list_videos(
    project: Annotated[str | None, typer.Option(help="Only this project's videos.")] = None,
    state: Annotated[
        str | None, typer.Option("--status", help="queued | in_progress | completed | failed | cancelled.")
    ] = None,
    limit: Annotated[int, typer.Option(help="How many (newest first).")] = 20,
    server: ServerOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """List videos, newest first."""
    page = _api_call(_client(server, api_key).list, project=project, status=state, limit=limit)
    table = Table("id", "project", "status", "progress", "size", "seconds", "prompt")
    for video in page["data"]:
        table.add_row(
            video["id"],
            video["project"],
            video["status"],
            f"{video['progress']}%",
            video["size"],
            video["seconds"],
            video["prompt"][:48],
        )
    Console(width=200).print(table)


# -- admin commands: projects and API keys (an admin key) ----------------------------------------------

admin_app = typer.Typer(help="Projects and API keys (needs an admin key).", no_args_is_help=True)
project_app = typer.Typer(help="Create and list projects.", no_args_is_help=True)
key_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
admin_app.add_typer(project_app, name="project")
admin_app.add_typer(key_app, name="key")
app.add_typer(admin_app, name="admin")
UrlOption = Annotated[
    str, typer.Option("--url", "--server", envvar="PREVIZ_SERVER", help="Previz server URL.")
]
stdout = Console()


def _date(unix: int | None) -> str:
    from datetime import UTC, datetime

    return "" if unix is None else datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M")


@project_app.command("create")
def project_create(
    name: Annotated[str, typer.Argument(help="Lower-case slug: letters, digits, '.', '_', '-'.")],
    max_queued_jobs: Annotated[int | None, typer.Option(help="Most queued videos at once.")] = None,
    gpu_seconds_per_day: Annotated[float | None, typer.Option(help="GPU seconds per UTC day.")] = None,
    burn_label: Annotated[
        bool, typer.Option(help="Burn 'AI-generated draft' into every clip (--no-burn-label allows off).")
    ] = True,
    admin_key: Annotated[bool, typer.Option(help="Also create a first admin key of the project.")] = False,
    url: UrlOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Create a project; prints its webhook secret (shown once)."""
    settings = {
        "max_queued_jobs": max_queued_jobs,
        "gpu_seconds_per_day": gpu_seconds_per_day,
        "burn_label": burn_label,
    }
    created = _api_call(_client(url, api_key).create_project, name, settings, admin_key=admin_key)
    stdout.print(f"project {created['name']}", highlight=False)
    stdout.print(f"webhook_secret {created['webhook_secret']}", highlight=False)
    if created.get("api_key"):
        stdout.print(f"admin key {created['api_key']['id']}: {created['api_key']['key']}", highlight=False)
    console.print("save the secret (and key): they are not shown again")


@project_app.command("list")
def project_list(url: UrlOption = DEFAULT_SERVER, api_key: ApiKeyOption = None) -> None:
    """Every project and its quotas."""
    page = _api_call(_client(url, api_key).list_projects)
    table = Table("project", "created", "max queued", "GPU s/day", "burn label", box=None)
    for project in page["data"]:
        settings = project["settings"]
        table.add_row(
            project["name"],
            _date(project["created_at"]),
            str(settings["max_queued_jobs"] or "-"),
            f"{settings['gpu_seconds_per_day']:g}" if settings["gpu_seconds_per_day"] else "-",
            "yes" if settings["burn_label"] else "no",
        )
    Console(width=200).print(table)


@key_app.command("create")
def key_create(
    project: Annotated[str, typer.Option(help="The key's project.")],
    role: Annotated[str, typer.Option(help="member | admin.")] = "member",
    name: Annotated[str | None, typer.Option(help="Whose key it is.")] = None,
    url: UrlOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Create a key; prints it once (only its hash is stored)."""
    created = _api_call(_client(url, api_key).create_key, project, role, name)
    stdout.print(created["key"], highlight=False)
    console.print(f"{created['role']} key {created['id']} of project {created['project']} (not shown again)")


@key_app.command("list")
def key_list(
    project: Annotated[str, typer.Option(help="Whose keys.")],
    url: UrlOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """A project's keys (ids, roles, names; never the keys)."""
    page = _api_call(_client(url, api_key).list_keys, project)
    table = Table("key id", "role", "name", "created", "last used", "revoked", box=None)
    for key in page["data"]:
        table.add_row(
            key["id"],
            key["role"],
            key["name"] or "",
            _date(key["created_at"]),
            _date(key["last_used_at"]),
            _date(key["revoked_at"]),
        )
    Console(width=200).print(table)


@key_app.command("revoke")
def key_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (`keyid` of pvz_<keyid>_...).")],
    url: UrlOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Revoke a key at once: its next request gets 401."""
    revoked = _api_call(_client(url, api_key).revoke_key, key_id)
    stdout.print(f"revoked {revoked['id']} ({revoked['role']} key of {revoked['project']})", highlight=False)


def main() -> None:
    """Entry point: usage and input errors are one line on stderr and a non-zero exit."""
    try:
        app(standalone_mode=False)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except click_exceptions.UsageError as error:
        console.print(f"previz: error: {error.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except CliError as error:
        console.print(f"previz: error: {error}", highlight=False, soft_wrap=True, markup=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
