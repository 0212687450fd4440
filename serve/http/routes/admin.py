"""`/v1/admin`: projects, their settings (quotas, label policy) and API keys. Admin keys only (403
`forbidden` for member keys). An `admin` key manages its own project's keys and reads its settings;
other projects are 404 to it, as their videos are. A `studio_admin` key manages every project (S below).

    POST   /v1/admin/projects                  S  create (409 `project_exists`); its webhook secret, once
    GET    /v1/admin/projects                     list (an admin key: its own project)
    GET    /v1/admin/projects/{name}              one project and its settings
    PATCH  /v1/admin/projects/{name}           S  change settings (only the fields sent)
    POST   /v1/admin/projects/{name}/keys         a new key: the key is in this answer only
    GET    /v1/admin/projects/{name}/keys         its keys (ids, roles, names; never the keys)
    POST   /v1/admin/keys/{key_id}/rotate         a new key of the same project, role and name; the old
                                                  one revoked at once (the bootstrap key's rotation)
    DELETE /v1/admin/keys/{key_id}                revoke a key (at once: its next request is 401); 409
                                                  `last_admin_key` for the last admin key of a project
                                                  or the last studio_admin key
"""

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from serve.auth import ADMIN_ROLES, PROJECT_NAME, ApiKeyRecord, Caller, Role
from serve.http.deps import StateDep, authenticated_caller
from serve.http.errors import ApiError
from serve.jobs import JobStore
from serve.jobs.models import unix
from serve.jobs.projects import LastAdminKey, PositiveSeconds, ProjectExists, ProjectRecord, ProjectSettings
from serve.jobs.request import FrameRate
from serve.numbers import whole_number


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=PROJECT_NAME.pattern,
        description="Lower-case slug: letters, digits, '.', '_', '-'; at most 64 characters.",
    )
    settings: ProjectSettings = Field(default_factory=ProjectSettings, description="Quotas and policy.")
    admin_key: StrictBool = Field(
        False, description="Also create a first admin key of the project (shown once)."
    )


class ProjectSettingsUpdate(BaseModel):
    """The settings to change; fields left out keep their value (`null` clears a quota)."""

    model_config = ConfigDict(extra="forbid")

    max_queued_jobs: whole_number(ge=1) | None = None
    gpu_seconds_per_day: PositiveSeconds | None = None
    retention_days: whole_number(ge=1, le=3650) | None = None
    # not nullable: the label policy is on or off, it has no "unset"
    burn_label: StrictBool = Field(None, description="Burn the draft label into every clip.")  # type: ignore[assignment]
    default_quality: Literal["draft", "final"] | None = Field(
        None,
        description="Tier of videos that name none; `null`: by priority (interactive draft, batch final).",
    )
    default_fps: FrameRate | None = Field(None, description="Frame rate when a request names none.")


class Project(BaseModel):
    object: str = "project"
    name: str
    created_at: int = Field(description="Unix seconds.")
    settings: ProjectSettings


class ApiKey(BaseModel):
    object: str = "api_key"
    id: str = Field(description="The key's public id (the `keyid` of `pvz_<keyid>_<secret>`).")
    project: str
    role: Role
    name: str | None
    created_at: int
    revoked_at: int | None
    last_used_at: int | None


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role = Field(
        "member",
        description="`member` (videos), `admin` (also the project's keys) or `studio_admin` (every "
        "project; only a studio_admin key creates one).",
    )
    name: str | None = Field(None, max_length=200, description="Whose key it is, for people.")


class ApiKeyCreated(ApiKey):
    key: str = Field(description="The key itself. It is not stored and is never shown again.")


class ProjectCreated(Project):
    webhook_secret: str = Field(description="HMAC-SHA256 secret of the project's webhooks; shown once.")
    api_key: ApiKeyCreated | None = Field(None, description="The first admin key, when asked for.")


class ProjectList(BaseModel):
    object: str = "list"
    data: list[Project]


class ApiKeyList(BaseModel):
    object: str = "list"
    data: list[ApiKey]


def _project(record: ProjectRecord) -> Project:
    return Project(name=record.name, created_at=unix(record.created_at), settings=record.settings)


def _key(record: ApiKeyRecord) -> ApiKey:
    return ApiKey(
        id=record.id,
        project=record.project,
        role=record.role,
        name=record.name,
        created_at=unix(record.created_at),
        revoked_at=unix(record.revoked_at),
        last_used_at=unix(record.last_used_at),
    )


def _no_project(name: str) -> ApiError:
    return ApiError(404, "not_found", f"no project named {name!r}", "name")


async def _admin(who: Annotated[Caller, Depends(authenticated_caller)]) -> Caller:
    if who.role not in ADMIN_ROLES:
        raise ApiError(403, "forbidden", f"this needs an admin key; key {who.key_id} is a member key")
    return who


Admin = Annotated[Caller, Depends(_admin)]


def _studio_admin(who: Admin) -> Caller:
    if not who.is_studio_admin:
        raise ApiError(
            403,
            "forbidden",
            f"this needs a studio_admin key; key {who.key_id} is an admin key of {who.project!r}",
        )
    return who


StudioAdmin = Annotated[Caller, Depends(_studio_admin)]


def _job_store(state: StateDep) -> JobStore:
    return state.store


Store = Annotated[JobStore, Depends(_job_store)]
router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(_admin)])


async def managed_project(name: str, who: Caller, store: JobStore) -> ProjectRecord:
    """The project `name` if `who` manages it; another project's existence is not told (404)."""
    record = await asyncio.to_thread(store.get_project, name) if who.manages(name) else None
    if record is None:
        raise _no_project(name)
    return record


async def _managed_key(key_id: str, who: Caller, store: JobStore) -> ApiKeyRecord:
    record = await asyncio.to_thread(store.get_key, key_id)
    if record is None or not who.manages(record.project):
        raise ApiError(404, "not_found", f"no API key with id {key_id!r}", "key_id")
    return record


@router.post("/projects", status_code=201, response_model=ProjectCreated, summary="Create a project")
async def create_project(body: ProjectCreate, store: Store, who: StudioAdmin) -> ProjectCreated:
    try:
        record = await asyncio.to_thread(store.create_project, body.name, body.settings)
    except ProjectExists:
        raise ApiError(409, "project_exists", f"project {body.name!r} exists already", "name") from None
    created = None
    if body.admin_key:
        key, secret = await asyncio.to_thread(store.create_key, record.name, "admin", "first admin key")
        created = ApiKeyCreated(**_key(key).model_dump(exclude={"object"}), key=secret)
    return ProjectCreated(
        **_project(record).model_dump(exclude={"object"}),
        webhook_secret=record.webhook_secret,
        api_key=created,
    )


@router.get("/projects", response_model=ProjectList, summary="List projects")
async def list_projects(store: Store, who: Admin) -> ProjectList:
    records = await asyncio.to_thread(store.list_projects)
    return ProjectList(data=[_project(record) for record in records if who.manages(record.name)])


@router.get("/projects/{name}", response_model=Project, summary="Retrieve a project")
async def get_project(name: str, store: Store, who: Admin) -> Project:
    return _project(await managed_project(name, who, store))


@router.patch("/projects/{name}", response_model=Project, summary="Change a project's settings")
async def update_project(name: str, body: ProjectSettingsUpdate, store: Store, who: StudioAdmin) -> Project:
    changes = body.model_dump(exclude_unset=True)
    record = await asyncio.to_thread(store.update_project, name, changes)
    if record is None:
        raise _no_project(name)
    return _project(record)


@router.post(
    "/projects/{name}/keys", status_code=201, response_model=ApiKeyCreated, summary="Create an API key"
)
async def create_key(name: str, body: ApiKeyCreate, store: Store, who: Admin) -> ApiKeyCreated:
    await managed_project(name, who, store)
    if body.role == "studio_admin" and not who.is_studio_admin:
        raise ApiError(403, "forbidden", "only a studio_admin key creates studio_admin keys", "role")
    record, key = await asyncio.to_thread(store.create_key, name, body.role, body.name)
    return ApiKeyCreated(**_key(record).model_dump(exclude={"object"}), key=key)


@router.get("/projects/{name}/keys", response_model=ApiKeyList, summary="List a project's API keys")
async def list_keys(name: str, store: Store, who: Admin) -> ApiKeyList:
    await managed_project(name, who, store)
    return ApiKeyList(data=[_key(record) for record in await asyncio.to_thread(store.list_keys, name)])


@router.post(
    "/keys/{key_id}/rotate", status_code=201, response_model=ApiKeyCreated, summary="Rotate an API key"
)
async def rotate_key(key_id: str, store: Store, who: Admin) -> ApiKeyCreated:
    """A new key with the old one's project, role and name; the old key is revoked in the same transaction
    (its next request is 401). The new key is in this answer only."""
    old = await _managed_key(key_id, who, store)
    if old.role == "studio_admin" and not who.is_studio_admin:
        raise ApiError(403, "forbidden", "only a studio_admin key rotates a studio_admin key", "key_id")
    rotated = await asyncio.to_thread(store.rotate_key, key_id)
    if rotated is None:
        raise ApiError(
            409, "key_revoked", f"API key {key_id!r} is revoked; create a new one instead", "key_id"
        )
    record, key = rotated
    return ApiKeyCreated(**_key(record).model_dump(exclude={"object"}), key=key)


@router.delete("/keys/{key_id}", response_model=ApiKey, summary="Revoke an API key")
async def revoke_key(key_id: str, store: Store, who: Admin) -> ApiKey:
    old = await _managed_key(key_id, who, store)
    if old.role == "studio_admin" and not who.is_studio_admin:
        raise ApiError(403, "forbidden", "only a studio_admin key revokes a studio_admin key", "key_id")
    try:
        record = await asyncio.to_thread(store.revoke_key, key_id)
    except LastAdminKey as refused:
        raise ApiError(
            409,
            "last_admin_key",
            f"key {key_id} is the last usable {'studio_admin' if refused.scope == 'the studio' else 'admin'} "
            f"key of {refused.scope}; create another one first, or rotate this one",
            "key_id",
        ) from None
    if record is None:
        raise ApiError(404, "not_found", f"no API key with id {key_id!r}", "key_id")
    return _key(record)
