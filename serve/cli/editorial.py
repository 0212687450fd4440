"""`previz takes`, `previz cut` and `previz delete-storyboard`: a storyboard's selected takes and shot
order, its first cut (`previz fetch --storyboard ID -o DIR` downloads the cut, its clips and its timeline),
and deleting a board."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from serve.cli.common import (
    DEFAULT_SERVER,
    ApiKeyOption,
    CliError,
    ServerOption,
    api_call,
    app,
    client_for,
    console,
)


@app.command()
def takes(
    storyboard_id: Annotated[str, typer.Argument(help="The storyboard (`sb_…`).")],
    select: Annotated[
        list[str] | None,
        typer.Option(
            help="SHOT=VIDEO: the selected take of a shot (its index); SHOT= clears it. Repeatable."
        ),
    ] = None,
    order: Annotated[str | None, typer.Option(help="Shot indices in cut order, e.g. 2,0,1.")] = None,
    server: ServerOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Select takes and order shots; prints each shot of the cut with its take."""
    chosen: dict[int, str | None] = {}
    for pair in select or []:
        shot, sep, video = pair.partition("=")
        if not sep or not shot.strip().isdigit():
            raise CliError(f"`--select` takes SHOT=VIDEO such as 0=vid_…, not {pair!r}")
        chosen[int(shot)] = video.strip() or None
    shot_order = None
    if order is not None:
        try:
            shot_order = [int(part) for part in order.split(",")]
        except ValueError:
            raise CliError(f"`--order` takes shot indices such as 2,0,1, not {order!r}") from None
    board = api_call(
        client_for(server, api_key).update_storyboard, storyboard_id, order=shot_order, takes=chosen
    )
    out = Console()
    for index in board["order"]:
        shot = board["shots"][index]
        out.print(
            f"{index}\t{shot['name'] or '-'}\t{shot['selected_video_id'] or '(first completed)'}",
            highlight=False,
        )


@app.command()
def cut(
    storyboard_id: Annotated[str, typer.Argument(help="The storyboard (`sb_…`).")],
    fps: Annotated[
        int | None, typer.Option(help="16, 24 or 25 (default: the board's, the project's, or 24).")
    ] = None,
    size: Annotated[str | None, typer.Option(help="480p, 720p or 1080p (default: the first take's).")] = None,
    slates: Annotated[bool, typer.Option(help="A slate before each shot.")] = False,
    slate_seconds: Annotated[float, typer.Option(help="How long each slate shows.")] = 1.0,
    server: ServerOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Render the storyboard's first cut: a job of the cluster, followed with a progress bar until it is done;
    prints its id, rate, size and length."""
    client = client_for(server, api_key)
    queued = api_call(
        client.create_cut,
        storyboard_id,
        fps=fps,
        size=size,
        slates=slates,
        slate_seconds=slate_seconds if slates else None,
    )
    progress = Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
        console=console,
    )
    with progress:
        bar = progress.add_task(f"{queued['id']} queued", total=100, eta="")

        def show(cut: dict) -> None:
            eta = cut.get("eta_seconds")
            progress.update(
                bar,
                completed=cut["progress"],
                description=f"{cut['id']} {cut['status']}",
                eta=f"about {eta:.0f} s left" if eta is not None else "",
            )

        answer = api_call(client.wait_for_cut, storyboard_id, on_poll=show)
    if answer["status"] != "completed":
        why = f": {answer['error']['message']}" if answer.get("error") else ""
        raise CliError(f"the cut {answer['id']} is {answer['status']}{why}")
    Console().print(
        f"{answer['id']} {answer['fps']} fps {answer['size']} {answer['num_frames']} frames "
        f"({answer['seconds']:.2f} s), {len(answer['clips'])} shots",
        highlight=False,
    )


@app.command("delete-storyboard")
def delete_storyboard(
    storyboard_id: Annotated[str, typer.Argument(help="The storyboard (`sb_…`).")],
    delete_videos: Annotated[
        bool, typer.Option(help="Delete its videos too (running ones are cancelled); default: keep them.")
    ] = False,
    server: ServerOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Delete a storyboard and its cut; its videos are kept as videos of no board unless --delete-videos."""
    client = client_for(server, api_key)
    num_videos = api_call(client.get_storyboard, storyboard_id)["num_videos"]
    answer = api_call(client.delete_storyboard, storyboard_id, delete_videos=delete_videos)
    fate = f"{len(answer['deleted_videos'])} videos deleted" if delete_videos else f"{num_videos} videos kept"
    Console().print(f"{storyboard_id} deleted; its {fate}", highlight=False)
