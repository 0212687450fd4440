"""`previz up`: a local Ray instance with the Previz app, the bootstrap of project `default`, the demo."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.status import Status

from serve.cli.common import CliError, app, console, follow

if TYPE_CHECKING:
    from serve.cli.launch import DeploymentProgress

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

    from serve.cli import launch

    started = time.monotonic()
    overrides = {"model": model} if model is not None else None
    try:
        cluster_config = launch.load_config(config, port=port, args_overrides=overrides)
    except (FileNotFoundError, ValidationError) as error:
        raise CliError(str(error).splitlines()[0]) from None
    api_key = bootstrap_default_project(cluster_config["applications"][0]["args"]["database_url"])
    with console.status("starting Ray and the Previz deployments …") as status:
        url = launch.deploy(cluster_config)
        launch.wait_ready(url, on_wait=StartProgress(status, started).update)
    console.print(f"Previz is ready at [bold]{url}[/] ({time.monotonic() - started:.1f} s after start)")
    prometheus = None
    if with_monitoring:
        from serve._compat import ray_session_dir
        from serve.cli.monitoring import start_prometheus

        prometheus = start_prometheus(ray_session_dir(), prometheus_port)
        console.print(f"Prometheus is at [bold]{prometheus.url}[/]")
    if demo is not None:
        from serve.cli.client import PrevizClient

        database_url = cluster_config["applications"][0]["args"]["database_url"]
        client = PrevizClient(url, api_key=api_key or _demo_key(database_url))
        try:
            job = client.create(
                {"prompt": DEMO_PROMPT, "duration": 1, "steps": 8, "upscale": "720p", "look": "film"}
            )
            job = follow(client, job["id"])
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
        console.print("serving; Ctrl-C (or SIGTERM) stops the cluster")
        # Ray's own handler would kill this process on SIGTERM without stopping Serve: stop as on Ctrl-C.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    if prometheus is not None:
        prometheus.stop()
    launch.shutdown()
    console.print("Previz stopped")


class StartProgress:
    """What `previz up` shows while the cluster starts: a line per deployment once it is ready (so a log
    shows it too) and, in the spinner, those still starting with their replicas up."""

    def __init__(self, status: Status, started: float) -> None:
        self.status = status
        self.started = started
        self.ready: set[str] = set()

    def update(self, state: str, deployments: list[DeploymentProgress]) -> None:
        import time

        elapsed = time.monotonic() - self.started
        for deployment in deployments:
            if deployment.is_ready and deployment.name not in self.ready:
                self.ready.add(deployment.name)
                console.print(f"  {deployment.name} ready ({elapsed:.0f} s)", highlight=False)
        waiting = [deployment.describe() for deployment in deployments if not deployment.is_ready]
        if deployments:
            summary = f"{len(self.ready)}/{len(deployments)} deployments ready"
            self.status.update(
                f"deploying Previz: {summary}; waiting for {', '.join(waiting) or 'the routes'} …"
            )
        else:
            self.status.update(f"deploying Previz ({state.lower()}) …")


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def bootstrap_default_project(database_url: str) -> str | None:
    """Before the first deploy: make sure the job store has project `default` with an admin key. The key
    is PREVIZ_API_KEY when set (stored unless it is already); otherwise one is generated, once, and shown
    in a panel. Returns the key when it is known here (from the environment or just generated)."""
    import os

    from rich.panel import Panel

    from serve.webhooks import open_job_store

    env_key = os.environ.get("PREVIZ_API_KEY") or None
    store = open_job_store(database_url)
    try:
        store.create_schema()
        generated = store.ensure_default_project("default", env_key)
    finally:
        store.close()
    if generated is not None:
        console.print(
            Panel(
                f"[bold]{generated}[/]\n\nSave this key, it is not shown again.\n"
                "It is the studio admin key (role studio_admin: every project, its keys and quotas), "
                "made with project [bold]default[/].\n"
                "Use it as `export PREVIZ_API_KEY=...` or `Authorization: Bearer ...`.",
                title="Previz API key",
            )
        )
    return env_key or generated


def _demo_key(database_url: str) -> str:
    """A member key of project `default` for the demo shot, when no key is at hand."""
    from serve.webhooks import open_job_store

    store = open_job_store(database_url)
    try:
        return store.create_key("default", "member", "previz up --demo")[1]
    finally:
        store.close()


def _revoke_demo_key(database_url: str, key: str) -> None:
    from serve.auth import key_id_of
    from serve.webhooks import open_job_store

    store = open_job_store(database_url)
    try:
        store.revoke_key(key_id_of(key))
    finally:
        store.close()
