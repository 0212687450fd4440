"""The `previz` command line, by audience: `generate` (one process), `up` (a local cluster), the client
commands of artists (`submit`, `status`, `fetch`, `cancel`, `ls`), editors (`takes`, `cut`) and `admin`
(projects and keys)."""

from __future__ import annotations

import sys

import typer

from serve._compat import click_exceptions
from serve.cli import admin, cluster, editorial, generate, k8s, videos  # noqa: F401  (each registers its commands)
from serve.cli.cluster import bootstrap_default_project
from serve.cli.common import CliError, app, console

__all__ = ["app", "bootstrap_default_project", "main"]


def main() -> None:
    """Entry point: usage and input errors are one line on stderr and a non-zero exit."""
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(n) comes back as n here
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except click_exceptions.UsageError as error:
        console.print(f"previz: error: {error.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except CliError as error:
        console.print(f"previz: error: {error}", highlight=False, soft_wrap=True, markup=False)
        sys.exit(2)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
