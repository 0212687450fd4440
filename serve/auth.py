"""Who is calling: projects, their API keys and roles, and signed links to stored artifacts.

A key looks like `pvz_<keyid>_<secret>`: `keyid` (12 hex) is its public name (shown in listings, safe to
log), `secret` is `secrets.token_urlsafe(32)`. The store keeps only the key's sha256, so a key is shown
once, when it is created. Every key belongs to one project and has a role:

    member        the project's videos, storyboards and artifacts (and nothing of other projects)
    admin         the same, plus its own project's keys in /v1/admin (create, list, rotate, revoke) and
                  a read of its settings; other projects do not exist for it (404)
    studio_admin  every project: creating projects, changing settings (quotas, label policy), keys of
                  any role in any project. The bootstrap key of project `default` is one.

No revocation may leave a project without a usable admin key (`admin` or `studio_admin`), nor the studio
without a usable `studio_admin` key: rotate a key (a new one, the old one revoked, in one transaction)
instead.

(Signed links to stored artifacts are the artifact store's: serve.storage.ArtifactSigner.)
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat

from pipeline.stages import accelerator_seconds
from serve.numbers import whole_number

Role = Literal["member", "admin", "studio_admin"]
# a number > 0 (each member carries the bound, so the JSON schema states it as exclusiveMinimum)
PositiveSeconds = Annotated[StrictFloat, Field(gt=0)] | whole_number(gt=0)
ROLES: tuple[Role, ...] = ("member", "admin", "studio_admin")
ADMIN_ROLES: tuple[Role, ...] = ("admin", "studio_admin")
PROJECT_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"  # a project's name: a lower-case slug, everywhere
PROJECT_NAME = re.compile(PROJECT_PATTERN)
KEY_FORM = re.compile(r"^pvz_([0-9a-f]{12})_([A-Za-z0-9_-]{16,})$")


class ProjectSettings(BaseModel):
    """A project's quotas and policy (`PATCH /v1/admin/projects/{name}` changes them)."""

    model_config = ConfigDict(extra="forbid")

    max_queued_jobs: whole_number(ge=1) | None = Field(
        None,
        description="Most queued videos of the project at once; beyond it 429 `project_queue_full`.",
    )
    gpu_seconds_per_day: PositiveSeconds | None = Field(
        None,
        description="Accelerator seconds the project's videos may use per UTC day; beyond it 429 "
        "`gpu_quota_exceeded` until midnight UTC.",
    )
    retention_days: whole_number(ge=1, le=3650) | None = Field(
        None,
        description="Finished videos are deleted (clip, poster and record) this many days after they "
        "finish; their `expires_at` says when. Unset: kept until deleted.",
    )
    burn_label: StrictBool = Field(
        True,
        description="Burn 'AI-generated draft' into every clip; while true, `label: false` is refused "
        "(400 `label_required`).",
    )
    default_quality: Literal["draft", "final"] | None = Field(
        None,
        description="The tier of a video that names no `quality`; unset: `draft` for `interactive` and "
        "`final` for `batch` priority.",
    )
    default_fps: Literal[16, 24, 25] | None = Field(
        None,
        description="Frame rate of the project's clips when a request names none (the edit's rate, e.g. "
        "24); unset: 16, the model's own.",
    )


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller of one request."""

    project: str  # every job it creates or sees is this project's
    role: Role
    key_id: str  # the key's public id (logs, revocation)

    @property
    def is_admin(self) -> bool:
        return self.role in ADMIN_ROLES

    @property
    def is_studio_admin(self) -> bool:
        return self.role == "studio_admin"

    def manages(self, project: str) -> bool:
        """Whether this caller administers `project` (its own project, or any as a studio admin)."""
        return self.is_studio_admin or (self.is_admin and project == self.project)


@dataclass(frozen=True, slots=True)
class ProjectRecord:
    name: str
    created_at: datetime
    settings: ProjectSettings
    webhook_secret: str  # HMAC-SHA256 key of the project's webhooks


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """One API key as stored: never the key itself, only its hash."""

    id: str  # the public `keyid` part of the key
    project: str
    role: Role
    name: str | None
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


AuthFailure = Literal["unknown", "revoked"]


def new_api_key() -> tuple[str, str]:
    """A fresh `(key_id, key)`."""
    key_id = secrets.token_hex(6)
    return key_id, f"pvz_{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str:
    """The id a key is stored under: the `keyid` of a `pvz_` key, else (a key chosen by an operator, e.g.
    PREVIZ_API_KEY) 12 hex of its sha256."""
    match = KEY_FORM.match(key)
    return match.group(1) if match else hash_key(key)[:12]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_match(key: str, key_hash: str) -> bool:
    return hmac.compare_digest(hash_key(key), key_hash)


def gpu_seconds(timings: dict[str, float]) -> float:
    """Accelerator seconds of one job's run, from its stage timings."""
    return accelerator_seconds(timings)


def seconds_to_utc_midnight(now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((midnight - now).total_seconds() + 0.999))
