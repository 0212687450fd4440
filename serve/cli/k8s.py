"""`previz k8s render OVERLAY`: the generated parts of k8s/ from deploy/ (k8s_render.py);
`previz weights pull`: mirror s3:// prefixes into a local weights cache (the GPU pods' init container)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from serve.cli.common import CliError, app, console

k8s_app = typer.Typer(help="Kubernetes manifests (KubeRay) generated from deploy/.", no_args_is_help=True)
weights_app = typer.Typer(help="Model weights in a local cache.", no_args_is_help=True)
app.add_typer(k8s_app, name="k8s")
app.add_typer(weights_app, name="weights")


@k8s_app.command("render")
def render(
    overlay: Annotated[str, typer.Argument(help="dev, gpu-node or studio.")],
    check: Annotated[
        bool, typer.Option(help="Write nothing; exit 1 if a generated file is stale (for CI).")
    ] = False,
) -> None:
    """Write k8s/overlays/OVERLAY/generated/ and k8s/base/generated/ from deploy/."""
    from serve.cli import k8s_render

    try:
        paths = k8s_render.stale(overlay) if check else k8s_render.write(overlay)
    except (FileNotFoundError, ValueError) as error:
        raise CliError(str(error)) from None
    for path in paths:
        console.print(f"{'stale' if check else 'wrote'} {path.relative_to(k8s_render.ROOT)}", highlight=False)
    if check and paths:
        raise typer.Exit(1)
    if not paths:
        console.print(f"{overlay}: up to date")


@weights_app.command("pull")
def pull(
    uris: Annotated[list[str], typer.Argument(help="s3://bucket/prefix of each model or weights folder.")],
    cache_dir: Annotated[Path, typer.Option(help="The cache (what `model_cache_dir` names).")],
) -> None:
    """Mirror each prefix into CACHE_DIR/<bucket>/<prefix>/ (resumable, checksummed; free when current)."""
    from pipeline.s3sync import S3SyncError, sync_s3_prefix

    for uri in uris:
        if not uri.startswith("s3://"):
            raise CliError(f"{uri!r} is not an s3:// URI")
        try:
            folder = sync_s3_prefix(uri, cache_dir)
        except (S3SyncError, FileNotFoundError, ValueError) as error:
            raise CliError(f"{uri}: {error}") from None
        console.print(f"{uri} -> {folder}", highlight=False)
