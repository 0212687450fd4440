"""What every `previz` command shares: the Typer app, the consoles, the one-line CLI error, the client
options and the calls that turn API and connection errors into CLI errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(
    name="previz",
    help="Previz: studio text-to-video drafts on Wan2.2.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)  # progress, notes and errors
stdout = Console()  # what a script may capture: ids, keys, secrets


@app.callback()
def root() -> None:
    """Previz: studio text-to-video drafts on Wan2.2."""


class CliError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""


ServerOption = Annotated[str, typer.Option("--server", envvar="PREVIZ_SERVER", help="Previz server URL.")]
UrlOption = Annotated[
    str, typer.Option("--url", "--server", envvar="PREVIZ_SERVER", help="Previz server URL.")
]
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


def client_for(server: str, api_key: str | None):
    from serve.cli.client import PrevizClient

    return PrevizClient(server, api_key=api_key, timeout_s=60)


def api_call(call, *args, **kwargs):
    """Run one client call; API and connection errors become one-line CLI errors."""
    import httpx

    from serve.cli.client import PrevizApiError

    try:
        return call(*args, **kwargs)
    except PrevizApiError as error:
        where = f" ({error.param})" if error.param else ""
        raise CliError(f"{error.code}{where}: {error.message}") from None
    except httpx.HTTPError as error:
        raise CliError(f"cannot reach the Previz server: {error}") from None


def read_mapping(path: Path, what: str) -> dict:
    from serve.documents import DocumentError, load_mapping

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CliError(f"cannot read {what} {str(path)!r}: {error.strerror}") from None
    try:
        return load_mapping(text, "json" if path.suffix.lower() == ".json" else "yaml")
    except DocumentError as error:
        raise CliError(f"{what} {str(path)!r} is {error}") from None


MAX_NAME_BYTES = 120  # of a name part in a file name (ext4, APFS, NTFS: 255 for the whole name)
WINDOWS_DEVICES = frozenset(
    {"con", "prn", "aux", "nul", *(f"com{n}" for n in range(1, 10)), *(f"lpt{n}" for n in range(1, 10))}
)


def file_name(text: str, fallback: str) -> str:
    """`text` (a shot name, a title, an id: anything a file or the server chose) as one file name part
    that names a file in the folder it is joined to: each run of characters other than letters, digits,
    `-`, `_` and `.` becomes `_` (so no `/`, `\\`, `:` or control character), leading and trailing `.`
    and `_` go (no `..`, no hidden file), at most MAX_NAME_BYTES of UTF-8, and `fallback` when nothing is
    left. `../../etc/passwd` -> `etc_passwd`, `a/b` -> `a_b`, `..` -> fallback."""
    name = re.sub(r"[^\w.-]+", "_", text).strip("._")
    name = name.encode()[:MAX_NAME_BYTES].decode(errors="ignore").rstrip("._")
    if name.split(".")[0].lower() in WINDOWS_DEVICES:  # `NUL.mp4` is the null device on Windows
        name = f"_{name}"
    return name or fallback


def target_in(folder: Path, *names: str) -> Path:
    """Where the CLI writes `folder/names…`: every name made a file name part (file_name, fallback `_`),
    and CliError when the path still lands outside `folder` (a symlink inside it pointing elsewhere).
    Every file the CLI writes under a folder, or under the working folder by default, goes through here;
    an explicit `-o FILE` is the user's own choice and is not."""
    target = folder.joinpath(*(file_name(name, "_") for name in names))
    if not target.resolve().is_relative_to(folder.resolve()):
        raise CliError(f"refusing to write {str(target)!r}: it resolves outside {str(folder)!r}")
    return target


def labels_of(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"`--tag` must be KEY=VALUE but is {pair!r}")
        labels[key] = value
    return labels


def progress_bar(description_width: int) -> Progress:
    """The CLI's progress bar for a job or a cut: description, bar, percent, time so far and the ETA the
    server gave (the task field `eta`)."""
    return Progress(
        TextColumn(f"{{task.description:<{description_width}}}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
        console=console,
    )


def follow(client, job_id: str) -> dict:
    """Poll a job with a progress bar until it finishes."""
    import time

    progress = progress_bar(28)
    with progress:
        task = progress.add_task(job_id, total=100, eta="")
        while True:
            job = client.get(job_id)
            eta = job.get("eta_seconds")
            progress.update(
                task,
                completed=job["progress"],
                description=f"{job_id[:12]} {job['stage']}",
                eta=f"about {eta:.0f} s left" if eta is not None else "",
            )
            if job["status"] in FINISHED_STATES:
                return job
            time.sleep(0.5)


def date_of(unix: int | None) -> str:
    from datetime import UTC, datetime

    return "" if unix is None else datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M")
