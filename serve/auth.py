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
from datetime import datetime
from typing import Literal

Role = Literal["member", "admin", "studio_admin"]
ROLES: tuple[Role, ...] = ("member", "admin", "studio_admin")
ADMIN_ROLES: tuple[Role, ...] = ("admin", "studio_admin")
PROJECT_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"  # a project's name: a lower-case slug, everywhere
PROJECT_NAME = re.compile(PROJECT_PATTERN)
KEY_FORM = re.compile(r"^pvz_([0-9a-f]{12})_([A-Za-z0-9_-]{16,})$")


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
