"""The client commands of artists and pipelines: submit, status, fetch, cancel, ls (a running server)."""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from serve.cli.common import (
    DEFAULT_SERVER,
    ApiKeyOption,
    CliError,
    ServerOption,
    api_call,
    app,
    client_for,
    console,
    file_name,
    follow,
    labels_of,
    read_mapping,
    target_in,
)


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
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the tier's).")] = None,
    quality: Annotated[
        str | None,
        typer.Option(help="draft (4-step distilled) | final (40 steps); default by priority or project."),
    ] = None,
    lora: Annotated[
        list[str] | None, typer.Option(help="LoRA NAME or NAME=WEIGHT (repeatable): style/character.")
    ] = None,
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
        "quality": quality,
        "loras": loras_of(lora) if lora else None,
    }
    settings = {key: value for key, value in settings.items() if value is not None}
    if not label:
        settings["label"] = False
    common = {
        key: value for key, value in (("project", project), ("priority", priority)) if value is not None
    }
    labels = labels_of(tag or [])
    client = client_for(server, api_key)
    if storyboard is not None:
        if prompt is not None or shot is not None:
            raise CliError("give a PROMPT/--shot or a --storyboard, not both")
        board = {**read_mapping(storyboard, "storyboard"), **common}
        if settings:  # command-line settings apply to every shot that does not set them itself
            board["shots"] = [
                {**settings, **entry} for entry in board.get("shots", []) if isinstance(entry, dict)
            ]
        if labels:
            board["labels"] = {**board.get("labels", {}), **labels}
        created = api_call(client.create_storyboard, board, idempotency_key=idempotency_key)
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
    video = api_call(client.create, body, idempotency_key=idempotency_key)
    console.print(
        f"video {video['id']} {video['status']} ({video['size']}, {video['seconds']} s)", highlight=False
    )
    Console().print(video["id"])
    if wait or output is not None:
        video = follow(client, video["id"])
        if video["status"] != "completed":
            raise CliError(
                f"video {video['id']} {video['status']}: {(video.get('error') or {}).get('message')}"
            )
        if output is not None:
            path = api_call(client.download, video["id"], target_in(output, f"{video['id']}.mp4"))
            console.print(f"saved {path}", highlight=False)


@app.command()
def promote(
    video_id: Annotated[str, typer.Argument(help="A draft video (vid_…), or a storyboard (sb_…).")],
    take: Annotated[
        list[str] | None, typer.Option(help="With a storyboard: a draft video of it to promote (repeatable).")
    ] = None,
    size: Annotated[str | None, typer.Option(help="A new WxH (default: the draft's).")] = None,
    upscale: Annotated[str | None, typer.Option(help="none | 720p | 1080p (default: the draft's).")] = None,
    look: Annotated[str | None, typer.Option(help="none | film (default: the draft's).")] = None,
    priority: Annotated[str | None, typer.Option(help="interactive | batch (default batch).")] = None,
    wait: Annotated[bool, typer.Option(help="Follow progress until the final take finishes.")] = False,
    server: ServerOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Queue the final take of a draft (same seed, prompt, shot and size, the full 40-step recipe); with a
    storyboard id and --take ids, the final takes of those drafts, all or none."""
    fields = {"upscale": upscale, "look": look, "priority": priority}
    fields = {key: value for key, value in fields.items() if value is not None}
    client = client_for(server, api_key)
    if video_id.startswith("sb_"):
        if not take:
            raise CliError("name the storyboard's drafts to promote with --take VIDEO_ID")
        if size is not None:
            raise CliError("--size promotes one video; a storyboard's takes keep their sizes")
        promoted = api_call(client.promote_takes, video_id, take, **fields)["data"]
    else:
        if take:
            raise CliError("--take goes with a storyboard id (sb_…)")
        if size is not None:
            fields["size"] = size
        promoted = [api_call(client.promote, video_id, **fields)]
    for video in promoted:
        console.print(
            f"video {video['id']} {video['status']}: final take of {video['promoted_from']}", highlight=False
        )
        Console().print(video["id"])
    if wait:
        for video in promoted:
            follow(client, video["id"])


def loras_of(values: list[str]) -> list[dict[str, object]]:
    """`noir` or `noir=0.8` -> {"name": "noir", "weight": 0.8}."""
    loras = []
    for value in values:
        name, _, weight = value.partition("=")
        try:
            loras.append({"name": name.strip(), "weight": float(weight) if weight else 1.0})
        except ValueError:
            raise CliError(f"--lora {value!r}: the weight must be a number, e.g. noir=0.8") from None
    return loras


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
            board = api_call(client.get_storyboard, storyboard_id)
            for shot in board["shots"]:
                for video in shot["videos"]:
                    shot_name = shot["name"] or f"shot {shot['index'] + 1}"
                    name = f"{shot_name} take {video['take']}"
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
                    shot_name = file_name(shot["name"] or "", "shot")  # a name may say `../` or `a/b`
                    name = f"{shot['index'] + 1:02d}-{shot_name}-take{video['take']}.mp4"
                    api_call(client.download, video["video_id"], target_in(output, name))
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
    client = client_for(server, api_key)
    out = Console()
    if video_id.startswith("sb_"):
        board = api_call(client.get_storyboard, video_id)
        out.print(f"{board['id']} {board['status']} {board['progress']}% {board['counts']}", highlight=False)
        table = Table("shot", "take", "video", "status", "progress", "content")
        for shot in board["shots"]:
            for video in shot["videos"]:
                table.add_row(
                    shot["name"] or str(shot["index"] + 1),
                    str(video["take"]),
                    video["video_id"],
                    video["status"],
                    f"{video['progress']}%",
                    video["content_url"] or "",
                )
        out.print(table)
        return
    video = api_call(client.get, video_id)
    out.print(
        f"{video['id']} {video['status']} ({video['stage']}) {video['progress']}%  "
        f"project {video['project']}, {video['size']}, {video['seconds']} s, seed {video['seed']}, "
        f"{video['quality']}",
        highlight=False,
    )
    for link in ("promoted_from", "promoted_to"):
        if video.get(link):
            out.print(f"{link.replace('_', ' ')}: {video[link]}", highlight=False)
    if video.get("eta_seconds") is not None:
        out.print(f"about {video['eta_seconds']:.0f} s left", highlight=False)
    if video.get("error"):
        out.print(f"error: {video['error']['code']}: {video['error']['message']}", highlight=False)
    if video.get("content_url"):
        out.print(f"content: {client.base_url}{video['content_url']}", highlight=False)


@app.command()
def fetch(
    video_id: Annotated[str | None, typer.Argument(help="A completed video's id.")] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="File to write (default ID.mp4); with --storyboard a folder."),
    ] = None,
    thumbnail: Annotated[bool, typer.Option(help="Fetch the JPEG poster frame instead.")] = False,
    storyboard: Annotated[
        str | None,
        typer.Option(help="Fetch this storyboard's last cut, its shots' clips and its timeline instead."),
    ] = None,
    timeline_format: Annotated[
        str, typer.Option("--format", help="Timeline of --storyboard: otio | edl | fcpxml.")
    ] = "otio",
    server: ServerOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Download a completed video's mp4 (or its poster frame), or a storyboard's cut with its clips and
    timeline (`--storyboard ID -o DIR`)."""
    client = client_for(server, api_key)
    if storyboard is not None:
        if video_id is not None:
            raise CliError("give a video id or `--storyboard`, not both")
        folder = fetch_storyboard(
            client, storyboard, output or target_in(Path(), storyboard), timeline_format
        )
        Console().print(str(folder), highlight=False)
        return
    if video_id is None:
        raise CliError("give the id of a video to fetch, or `--storyboard ID`")
    path = output or target_in(Path(), f"{video_id}.{'jpg' if thumbnail else 'mp4'}")
    api_call(client.download, video_id, path, variant="thumbnail" if thumbnail else "video")
    Console().print(str(path), highlight=False)


@app.command()
def cancel(
    video_id: Annotated[str, typer.Argument(help="A queued or running video's id.")],
    server: ServerOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Cancel a queued or running video (its slot goes to the next queued one)."""
    api_call(client_for(server, api_key).cancel, video_id)
    Console().print(f"{video_id} cancelled", highlight=False)


@app.command()
def delete(
    video_id: Annotated[str, typer.Argument(help="The video's id.")],
    server: ServerOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Delete a finished video with its clip and poster (a queued or running one is cancelled)."""
    answer = api_call(client_for(server, api_key).delete, video_id)
    Console().print(
        f"{video_id} {'deleted' if answer['status'] != 'cancelled' else 'cancelled'}", highlight=False
    )


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
    page = api_call(client_for(server, api_key).list, project=project, status=state, limit=limit)
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


def fetch_storyboard(client, storyboard_id: str, folder: Path, timeline_format: str) -> Path:
    """The board's package unpacked into `folder` (made once the package arrived): cut.mp4, clips/ and
    timeline.<otio|edl|xml>; a member's path is the package's own, never one out of the folder."""
    with tempfile.TemporaryDirectory() as scratch:
        archive = api_call(
            client.download_package, storyboard_id, Path(scratch) / "package.zip", format=timeline_format
        )
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(archive) as package:
            prefix = f"{storyboard_id}/"
            for member in package.infolist():
                if member.is_dir():
                    continue
                target = target_in(folder, *PurePosixPath(member.filename.removeprefix(prefix)).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with package.open(member) as source, target.open("wb") as out:
                    shutil.copyfileobj(source, out)
    return folder
