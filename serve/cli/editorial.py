"""`previz takes`, `previz cut`, `previz timeline`, `previz review` and `previz delete-storyboard`: a
storyboard's selected takes and shot order, its first cut (`previz fetch --storyboard ID -o DIR` downloads
the cut, its clips and its timeline), an edited timeline read back, a take's review, and deleting a board."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from serve.cli.common import (
    DEFAULT_SERVER,
    ApiKeyOption,
    CliError,
    ServerOption,
    api_call,
    app,
    client_for,
    progress_bar,
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
    progress = progress_bar(24)
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


TIMELINE_SUFFIXES = {".otio": "otio", ".edl": "edl", ".xml": "fcpxml", ".aaf": "aaf"}
REVIEW_STATUSES = ("pending", "approved", "rejected", "needs-changes")


@app.command()
def timeline(
    storyboard_id: Annotated[str, typer.Argument(help="The storyboard (`sb_…`).")],
    path: Annotated[Path, typer.Argument(help="The edited timeline: .otio, .edl, .xml (FCP 7) or .aaf.")],
    rate: Annotated[int | None, typer.Option(help="The rate an EDL counts at (default: the cut's).")] = None,
    server: ServerOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Read an edited timeline exported from the board's cut back: its clip order, takes and trims become
    the board's (all or nothing); prints the new order with each shot's take and trim."""
    fmt = TIMELINE_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise CliError(f"{path.name}: a timeline is a .otio, .edl, .xml (FCP 7) or .aaf file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CliError(f"cannot read {path}: {error.strerror}") from None
    applied = api_call(client_for(server, api_key).put_timeline, storyboard_id, data, fmt, rate=rate)
    out = Console()
    for shot in applied["order"]:
        trim = applied["trims"].get(str(shot))
        kept = f"frames {trim['start']}+{trim['num_frames']} at {trim['fps']} fps" if trim else "whole take"
        out.print(f"{shot}\t{applied['takes'].get(str(shot), '-')}\t{kept}", highlight=False)
    if applied["dropped"]:
        out.print(f"dropped shots: {', '.join(str(shot) for shot in applied['dropped'])}", highlight=False)


@app.command()
def review(
    video_id: Annotated[str, typer.Argument(help="The take (`vid_…`).")],
    status: Annotated[
        str | None, typer.Option(help="Set its status: pending, approved, rejected or needs-changes.")
    ] = None,
    note: Annotated[str | None, typer.Option(help="Add a note (as this API key's name).")] = None,
    frame: Annotated[int | None, typer.Option(help="The note's frame, at the take's own rate.")] = None,
    server: ServerOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """A take's review: set its status and/or add a note, then print its status and notes."""
    if status is not None and status not in REVIEW_STATUSES:
        raise CliError(f"`--status` is one of {', '.join(REVIEW_STATUSES)}, not {status!r}")
    if frame is not None and note is None:
        raise CliError("`--frame` goes with `--note`")
    client = client_for(server, api_key)
    if status is not None:
        api_call(client.set_review, video_id, status)
    if note is not None:
        api_call(client.add_note, video_id, note, frame=frame)
    current = api_call(client.get_review, video_id)
    out = Console()
    by = f" by {current['review_by']}" if current["review_by"] else ""
    out.print(f"{video_id} {current['status']}{by}", highlight=False)
    for item in api_call(client.notes, video_id):
        at = f" @{item['frame']}" if item["frame"] is not None else ""
        out.print(f"  {item['author']}{at}: {item['text']}", highlight=False)


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
