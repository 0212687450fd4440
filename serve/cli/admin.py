"""`previz admin`: projects and API keys, over HTTP with an admin key."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from serve.cli.common import (
    DEFAULT_SERVER,
    ApiKeyOption,
    CliError,
    UrlOption,
    api_call,
    app,
    client_for,
    console,
    date_of,
    stdout,
)

admin_app = typer.Typer(help="Projects and API keys (needs an admin key).", no_args_is_help=True)
project_app = typer.Typer(help="Create, list and change projects.", no_args_is_help=True)
key_app = typer.Typer(help="Create, list, rotate and revoke API keys.", no_args_is_help=True)
admin_app.add_typer(project_app, name="project")
admin_app.add_typer(key_app, name="key")
lut_app = typer.Typer(help="A project's .cube LUT looks.", no_args_is_help=True)
admin_app.add_typer(lut_app, name="lut")
app.add_typer(admin_app, name="admin")


@project_app.command("create")
def project_create(
    name: Annotated[str, typer.Argument(help="Lower-case slug: letters, digits, '.', '_', '-'.")],
    max_queued_jobs: Annotated[int | None, typer.Option(help="Most queued videos at once.")] = None,
    gpu_seconds_per_day: Annotated[float | None, typer.Option(help="GPU seconds per UTC day.")] = None,
    retention_days: Annotated[
        int | None, typer.Option(help="Delete finished videos this many days after they finish.")
    ] = None,
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
        "retention_days": retention_days,
        "burn_label": burn_label,
    }
    created = api_call(client_for(url, api_key).create_project, name, settings, admin_key=admin_key)
    stdout.print(f"project {created['name']}", highlight=False)
    stdout.print(f"webhook_secret {created['webhook_secret']}", highlight=False)
    if created.get("api_key"):
        stdout.print(f"admin key {created['api_key']['id']}: {created['api_key']['key']}", highlight=False)
    console.print("save the secret (and key): they are not shown again")


@project_app.command("update")
def project_update(
    name: Annotated[str, typer.Argument(help="The project to change.")],
    max_queued_jobs: Annotated[int | None, typer.Option(help="Most queued videos at once.")] = None,
    gpu_seconds_per_day: Annotated[float | None, typer.Option(help="GPU seconds per UTC day.")] = None,
    burn_label: Annotated[
        bool | None,
        typer.Option(help="Burn 'AI-generated draft' into every clip (--no-burn-label allows off)."),
    ] = None,
    retention_days: Annotated[
        int | None, typer.Option(help="Delete finished videos this many days after they finish.")
    ] = None,
    default_fps: Annotated[
        int | None, typer.Option(help="Frame rate of videos that name none: 16, 24 or 25.")
    ] = None,
    clear_max_queued_jobs: Annotated[bool, typer.Option(help="Remove the queued-videos bound.")] = False,
    clear_gpu_seconds_per_day: Annotated[bool, typer.Option(help="Remove the GPU-seconds quota.")] = False,
    clear_retention_days: Annotated[bool, typer.Option(help="Keep finished videos until deleted.")] = False,
    default_quality: Annotated[
        str | None, typer.Option(help="draft | final: tier of videos that name none.")
    ] = None,
    clear_default_quality: Annotated[
        bool, typer.Option(help="Tier by priority again (interactive draft, batch final).")
    ] = False,
    url: UrlOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Change a project's quotas and label policy (needs a studio_admin key); options left out keep
    their value."""
    changes: dict[str, object] = {}
    for field, value, clear in (
        ("max_queued_jobs", max_queued_jobs, clear_max_queued_jobs),
        ("gpu_seconds_per_day", gpu_seconds_per_day, clear_gpu_seconds_per_day),
        ("retention_days", retention_days, clear_retention_days),
        ("default_quality", default_quality, clear_default_quality),
    ):
        if clear and value is not None:
            option = field.replace("_", "-")
            raise CliError(f"--{option} and --clear-{option} contradict each other")
        if clear or value is not None:
            changes[field] = value
    if burn_label is not None:
        changes["burn_label"] = burn_label
    if default_fps is not None:
        changes["default_fps"] = default_fps
    if not changes:
        raise CliError("nothing to change: give at least one option (see --help)")
    updated = api_call(client_for(url, api_key).update_project, name, changes)
    settings = updated["settings"]
    stdout.print(
        f"project {updated['name']}: max queued {settings['max_queued_jobs'] or '-'}, GPU s/day "
        f"{settings['gpu_seconds_per_day'] or '-'}, retention {settings['retention_days'] or '-'} days, burn "
        f"label {'yes' if settings['burn_label'] else 'no'}, default quality "
        f"{settings.get('default_quality') or 'by priority'}",
        highlight=False,
    )


@project_app.command("list")
def project_list(url: UrlOption = DEFAULT_SERVER, api_key: ApiKeyOption = None) -> None:
    """Every project and its quotas."""
    page = api_call(client_for(url, api_key).list_projects)
    table = Table("project", "created", "max queued", "GPU s/day", "retention", "burn label", box=None)
    for project in page["data"]:
        settings = project["settings"]
        table.add_row(
            project["name"],
            date_of(project["created_at"]),
            str(settings["max_queued_jobs"] or "-"),
            f"{settings['gpu_seconds_per_day']:g}" if settings["gpu_seconds_per_day"] else "-",
            f"{settings['retention_days']} d" if settings.get("retention_days") else "-",
            "yes" if settings["burn_label"] else "no",
        )
    Console(width=200).print(table)


@key_app.command("create")
def key_create(
    project: Annotated[str, typer.Option(help="The key's project.")],
    role: Annotated[str, typer.Option(help="member | admin | studio_admin.")] = "member",
    name: Annotated[str | None, typer.Option(help="Whose key it is.")] = None,
    url: UrlOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Create a key; prints it once (only its hash is stored)."""
    created = api_call(client_for(url, api_key).create_key, project, role, name)
    stdout.print(created["key"], highlight=False)
    console.print(f"{created['role']} key {created['id']} of project {created['project']} (not shown again)")


@key_app.command("list")
def key_list(
    project: Annotated[str, typer.Option(help="Whose keys.")],
    url: UrlOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """A project's keys (ids, roles, names; never the keys)."""
    page = api_call(client_for(url, api_key).list_keys, project)
    table = Table("key id", "role", "name", "created", "last used", "revoked", box=None)
    for key in page["data"]:
        table.add_row(
            key["id"],
            key["role"],
            key["name"] or "",
            date_of(key["created_at"]),
            date_of(key["last_used_at"]),
            date_of(key["revoked_at"]),
        )
    Console(width=200).print(table)


@key_app.command("revoke")
def key_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (`keyid` of pvz_<keyid>_...).")],
    url: UrlOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Revoke a key at once: its next request gets 401."""
    revoked = api_call(client_for(url, api_key).revoke_key, key_id)
    stdout.print(f"revoked {revoked['id']} ({revoked['role']} key of {revoked['project']})", highlight=False)


@key_app.command("rotate")
def key_rotate(
    key_id: Annotated[str, typer.Argument(help="The key's id (`keyid` of pvz_<keyid>_...).")],
    url: UrlOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Replace a key by a new one (same project, role and name) and revoke the old one at once; prints the
    new key once. Rotating the bootstrap key: set PREVIZ_API_KEY to the new key afterwards."""
    rotated = api_call(client_for(url, api_key).rotate_key, key_id)
    stdout.print(rotated["key"], highlight=False)
    console.print(
        f"{rotated['role']} key {rotated['id']} of project {rotated['project']} replaces {key_id}, now "
        "revoked (the new key is not shown again)"
    )


@lut_app.command("add")
def lut_add(
    project: Annotated[str, typer.Argument(help="The project that may use it.")],
    name: Annotated[str, typer.Argument(help="The look's name in requests (`look`).")],
    cube: Annotated[Path, typer.Argument(help="The .cube file.", exists=True, dir_okay=False)],
    interpolation: Annotated[str, typer.Option(help="tetrahedral | trilinear.")] = "tetrahedral",
    url: UrlOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Register (or replace) a LUT look; a malformed file is refused naming its line."""
    lut = api_call(
        client_for(url, api_key).put_lut, project, name, cube.read_text(encoding="utf-8"), interpolation
    )
    stdout.print(
        f"look {lut['name']} of {lut['project']}: {lut['size']}³, {lut['interpolation']}", highlight=False
    )


@lut_app.command("list")
def lut_list(
    project: Annotated[str, typer.Argument(help="The project.")],
    url: UrlOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """The project's LUT looks."""
    table = Table("name", "size", "interpolation", "registered")
    for lut in api_call(client_for(url, api_key).list_luts, project)["data"]:
        table.add_row(lut["name"], str(lut["size"]), lut["interpolation"], date_of(lut["created_at"]))
    Console(width=160).print(table)


@lut_app.command("remove")
def lut_remove(
    project: Annotated[str, typer.Argument(help="The project.")],
    name: Annotated[str, typer.Argument(help="The look.")],
    url: UrlOption = DEFAULT_SERVER,
    api_key: ApiKeyOption = None,
) -> None:
    """Unregister a LUT look (videos admitted with it keep their version)."""
    api_call(client_for(url, api_key).delete_lut, project, name)
    stdout.print(f"look {name} of {project} removed", highlight=False)
