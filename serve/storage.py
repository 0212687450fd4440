"""The artifact store for finished clips: an mp4 (1-300 MB) and a JPEG poster per clip.

Two backends behind one interface, chosen by `StorageSettings.kind`:

    local   files under `local_root`, written atomically (temp file in the same folder, fsync,
            os.replace) and served by the Ingress as signed `/v1/artifacts/<key>` links
            (`local_path` hands the HTTP layer the file, so FileResponse can answer range requests);
    s3      objects under `s3_uri` (boto3, multipart for big files, the content's SHA-256 stored as
            `x-amz-meta-sha256`), handed out as presigned GET URLs.

Keys are "/"-separated relative paths, `<project>/<job_id>/<name>` by convention (`artifact_key`),
of letters, digits, '.', '_' and '-' only; anything else raises ValueError naming the key, before
any file or request is touched. Failures of the storage itself raise `StorageError` naming the key
and the cause; a key with nothing stored raises its subclass `ArtifactNotFoundError`.

S3 endpoint and region come from the settings; credentials from boto3's usual chain
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, instance or pod roles). Every S3 request is retried
by botocore ("standard" mode: connection errors, timeouts, 5xx and throttling, with capped
exponential backoff) before it is reported.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import mimetypes
import os
import re
import secrets
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, Self
from urllib.parse import quote

from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.s3 import make_s3_client
from pipeline.s3sync import S3Location, parse_s3_uri

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
CHUNK_BYTES = 1 * MiB  # read/hash/stream granularity: memory per open artifact stays at one chunk
LOCAL_URL_PREFIX = "/v1/artifacts"  # the Ingress route that serves a LocalArtifactStore's signed links
DEFAULT_LINK_TTL_S = 3600  # lifetime of a local link when the caller names none
MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600  # SigV4 presigned URLs cannot live longer than 7 days
SHA256_METADATA_KEY = "sha256"  # sent as the `x-amz-meta-sha256` header
# Multipart above 8 MiB in 8 MiB parts, 4 at a time: a 300 MB clip goes up as 36 parts, and one
# failed part is retried alone.
DEFAULT_TRANSFER_CONFIG = TransferConfig(
    multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=4, use_threads=True
)

_KEY_FORM = "'/'-separated names of letters, digits, '.', '_' and '-', such as 'project/job-id/clip.mp4'"
_KEY_CHARS_RE = re.compile(r"[A-Za-z0-9._/-]+")
_MAX_KEY_CHARS = 1024  # S3's limit on a key (bytes; keys are ASCII here)
_MAX_SEGMENT_CHARS = 255  # file name limit of common file systems
_TMP_SUFFIX = ".tmp"  # local uploads in progress: `.<random>.tmp` beside the final file
_S3_NOT_FOUND_CODES = ("404", "NoSuchKey", "NotFound")


class StorageError(RuntimeError):
    """The artifact store could not do what was asked; the message names the key and the cause."""


class ArtifactNotFoundError(StorageError):
    """Nothing is stored under the key (the HTTP layer answers 404)."""


# --- settings -----------------------------------------------------------------------------------


class StorageSettings(BaseModel):
    """Where finished clips and posters are kept and how links to them are made."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "s3"] = Field(
        default="local",
        description="`local`: a folder on this machine, served by the Ingress as signed /v1/artifacts links. "
        "`s3`: an S3 bucket (AWS, SeaweedFS, MinIO), handed out as presigned URLs.",
    )
    local_root: Path = Field(
        default=Path("previz-artifacts"),
        description="Folder of the local store (relative paths are relative to the working directory).",
    )
    s3_uri: str | None = Field(
        default=None,
        description="Bucket and key prefix of the S3 store, `s3://bucket/prefix`; required when kind is s3.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint for non-AWS servers (e.g. `http://seaweedfs:8333`); None means AWS. "
        "Presigned URLs point at this endpoint, so clients must be able to reach it.",
    )
    s3_region: str | None = Field(
        default=None, description="S3 region; None takes boto3's default (AWS_REGION, ~/.aws/config)."
    )
    presign_expiry_s: int = Field(
        default=3600,
        ge=60,
        le=MAX_PRESIGN_EXPIRY_S,
        description="Lifetime of presigned S3 URLs in seconds (60 s to 7 days).",
    )
    public_base_url: str | None = Field(
        default=None,
        description="Scheme and host that local-store links start with (e.g. `https://previz.studio`); "
        "None gives host-relative links (`/v1/artifacts/<key>?...`).",
    )

    @field_validator("s3_uri")
    @classmethod
    def _check_s3_uri(cls, value: str | None) -> str | None:
        if value is not None:
            parse_s3_uri(value)  # raises ValueError naming the value and the expected form
        return value

    @field_validator("s3_endpoint_url", "public_base_url")
    @classmethod
    def _check_http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value.rstrip("/") if value is not None else None

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> Self:
        if self.kind == "s3" and self.s3_uri is None:
            raise ValueError(
                "storage kind 's3' needs `s3_uri` (e.g. s3://previz-clips/prod): set it, "
                "or use kind 'local' to keep clips in a folder"
            )
        return self


# --- signed links of the local store -------------------------------------------------------------

SIGNING_KEY_FILE = ".url-signing-key"  # in the local artifact root; a hidden name is never an artifact key


class ArtifactSigner:
    """Signs `/v1/artifacts/{key}?expires=..&signature=..` links with a secret shared by every Ingress
    replica that serves the same artifact folder."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def for_folder(cls, root: Path) -> ArtifactSigner:
        """The signer whose secret lives in `root` (created once, mode 0600; concurrent replicas agree)."""
        return cls(_shared_secret(Path(root) / SIGNING_KEY_FILE))

    def signature(self, key: str, expires: int) -> str:
        return hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, key: str, ttl_s: int, *, now: float | None = None) -> str:
        expires = int(now if now is not None else datetime.now(UTC).timestamp()) + ttl_s
        return f"{LOCAL_URL_PREFIX}/{quote(key)}?expires={expires}&signature={self.signature(key, expires)}"

    def check(self, key: str, expires: int, signature: str) -> Literal["bad_signature", "url_expired"] | None:
        """None for a genuine, unexpired link; else what is wrong with it."""
        if not hmac.compare_digest(self.signature(key, expires).encode(), signature.encode()):
            return "bad_signature"
        if datetime.now(UTC).timestamp() > expires:
            return "url_expired"
        return None


def _shared_secret(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return bytes.fromhex(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        pass
    # Write a candidate under a private name, then link it into place: the first replica's link wins and
    # every replica reads the winner.
    candidate = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
        out.flush()
        os.fsync(out.fileno())
    try:
        os.link(candidate, path)
    except FileExistsError:
        pass
    finally:
        candidate.unlink()
    return bytes.fromhex(path.read_text().strip())


# --- what is stored -----------------------------------------------------------------------------


class StoredArtifact(BaseModel):
    """One file as the store holds it, returned by `put_file`."""

    model_config = ConfigDict(frozen=True)

    uri: str = Field(
        description="Where it lives: `file:///...` for the local store, `s3://bucket/key` for S3."
    )
    key: str = Field(description="Store key, `<project>/<job_id>/<name>`.")
    size_bytes: int = Field(ge=0, description="Size of the stored file in bytes.")
    sha256: str = Field(description="SHA-256 of the content, lowercase hex.")
    content_type: str = Field(description="MIME type, e.g. `video/mp4` or `image/jpeg`.")


@dataclass(frozen=True, slots=True)
class ListedArtifact:
    """One stored artifact as `ArtifactStore.list` reports it."""

    key: str  # the artifact's key, as put_file was given it
    size_bytes: int
    modified_at: datetime  # when it was last written (UTC): the orphan sweep leaves young ones alone


class ArtifactStream:
    """The bytes of one stored artifact, read in chunks; iterating it closes it at the end.

    Usable directly as a StreamingResponse body: `StreamingResponse(stream, media_type=stream.content_type)`.
    Errors while reading raise StorageError naming the key.
    """

    def __init__(
        self,
        raw: BinaryIO,
        *,
        key: str,
        size: int,
        content_type: str | None,
        read_errors: tuple[type[Exception], ...],
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.key = key
        self.size = size  # bytes the whole artifact has (Content-Length)
        self.content_type = content_type  # None where the store does not know it
        self._raw = raw
        self._read_errors = read_errors  # backend errors that become StorageError
        self._chunk_bytes = chunk_bytes

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (all the rest when negative); b"" at the end."""
        try:
            return self._raw.read(size) if size >= 0 else self._raw.read()
        except self._read_errors as error:
            raise StorageError(f"reading artifact {self.key!r} broke off: {error}") from error

    def __iter__(self) -> Iterator[bytes]:
        try:
            while chunk := self.read(self._chunk_bytes):
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --- keys ---------------------------------------------------------------------------------------


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative key, else raise ValueError naming it and the problem."""
    problem = _key_problem(key)
    if problem is not None:
        raise ValueError(f"invalid artifact key {key!r}: {problem}; expected {_KEY_FORM}")
    return key


@dataclass(frozen=True, slots=True)
class JobArtifacts:
    """Where one job's files live: the one home of the key layout (`<project>/<job_id>/<name>`).

    The attempt is in the clip's and the poster's names, so a stale run of a job never overwrites the
    winning clip; the checkpoint is one per job, overwritten by each attempt. The Finisher writes the clip
    and the poster here, the job row records both keys, and readers use the recorded keys."""

    project: str
    job_id: str

    def clip(self, attempt: int) -> str:
        return artifact_key(self.project, self.job_id, f"clip-a{attempt}.mp4")

    def poster(self, attempt: int) -> str:
        return artifact_key(self.project, self.job_id, f"poster-a{attempt}.jpg")

    @property
    def checkpoint(self) -> str:
        return artifact_key(self.project, self.job_id, "checkpoint-boundary.npz")

    def keyframe(self, which: Literal["first", "last"]) -> str:
        """A keyframe the job was admitted with (PNG, already fitted to the job's size); shared by every
        attempt, so a retry conditions on the same image."""
        return artifact_key(self.project, self.job_id, f"keyframe-{which}.png")

    @property
    def condition(self) -> str:
        """An I2V job's condition latents (`.npz`), made from its keyframes by the first attempt's VAEEncoder
        and read by each retry instead of encoding again (serve.jobs.keyframes); goes when the job ends."""
        return artifact_key(self.project, self.job_id, "condition.npz")

    @property
    def last_frame(self) -> str:
        """The last decoded frame of the job's clip (PNG), written before label, LUT and conform: what a
        chained shot starts from."""
        return artifact_key(self.project, self.job_id, "last-frame.png")

    @property
    def folder(self) -> str:
        """The prefix of every file of the job (every attempt's clip and poster, its checkpoint)."""
        return artifact_key(self.project, self.job_id, "x")[:-1]  # built by artifact_key: parts checked


@dataclass(frozen=True, slots=True)
class CutArtifacts:
    """Where a storyboard's cuts live: `<project>/<storyboard_id>/<cut_id>-a<attempt>.mp4` and one clip per
    shot, `<cut_id>-a<attempt>-<index>-shot<shot>.mp4` (cuts rendered before cuts were jobs have no
    `-a<attempt>`). A new cut id per cut and a new name per attempt of its job, so a render never
    overwrites a served cut, and a stale or lost attempt's files can be deleted without touching the
    attempt that runs now."""

    project: str
    storyboard_id: str

    def cut(self, cut_id: str, attempt: int | None = None) -> str:
        return artifact_key(self.project, self.storyboard_id, f"{_cut_name(cut_id, attempt)}.mp4")

    def clip(self, cut_id: str, index: int, shot: int, attempt: int | None = None) -> str:
        name = f"{_cut_name(cut_id, attempt)}-{index:03d}-shot{shot}.mp4"
        return artifact_key(self.project, self.storyboard_id, name)

    @property
    def folder(self) -> str:
        return artifact_key(self.project, self.storyboard_id, "x")[:-1]


def _cut_name(cut_id: str, attempt: int | None) -> str:
    return cut_id if attempt is None else f"{cut_id}-a{attempt}"


def key_owner(key: str) -> tuple[str, str] | None:
    """(project, owner id) of a key of the `<project>/<id>/<name>` layout, None for any other key."""
    parts = key.split("/")
    return (parts[0], parts[1]) if len(parts) == 3 else None


def artifact_key(project: str, job_id: str, name: str) -> str:
    """`<project>/<job_id>/<name>`; each part must be one key segment (no '/')."""
    for what, part in (("project", project), ("job_id", job_id), ("name", name)):
        problem = "contains '/'" if isinstance(part, str) and "/" in part else _key_problem(part)
        if problem is not None:
            raise ValueError(
                f"invalid {what} {part!r} for an artifact key: {problem}; expected one name of "
                "letters, digits, '.', '_' and '-' not starting with '.'"
            )
    return f"{project}/{job_id}/{name}"


def _key_problem(key: object) -> str | None:
    if not isinstance(key, str):
        return f"expected a string, got {type(key).__name__}"
    if key == "":
        return "it is empty"
    bad_chars = sorted(set(_KEY_CHARS_RE.sub("", key)))
    if bad_chars:
        return f"it contains {', '.join(repr(char) for char in bad_chars)}"
    if len(key) > _MAX_KEY_CHARS:
        return f"it is {len(key)} characters long, more than {_MAX_KEY_CHARS}"
    if key.startswith("/"):
        return "it is an absolute path"
    segments = key.split("/")
    if "" in segments:
        return "it has an empty segment ('//' or a trailing '/')"
    if ".." in segments or "." in segments:
        return "it has a '.' or '..' segment"
    if any(segment.startswith(".") for segment in segments):
        return "a segment starts with '.' (hidden names are kept for uploads in progress)"
    if any(len(segment) > _MAX_SEGMENT_CHARS for segment in segments):
        return f"a segment is longer than {_MAX_SEGMENT_CHARS} characters"
    return None


def _check_prefix(prefix: str) -> str:
    if prefix != "" and (not prefix.endswith("/") or _key_problem(prefix[:-1]) is not None):
        raise ValueError(f"invalid artifact prefix {prefix!r}: expected '' or a folder such as 'project/'")
    return prefix


def _check_expiry(expires_in_s: int) -> int:
    if not 1 <= expires_in_s <= MAX_PRESIGN_EXPIRY_S:
        raise ValueError(
            f"expires_in_s must be between 1 and {MAX_PRESIGN_EXPIRY_S} (7 days), got {expires_in_s}"
        )
    return expires_in_s


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for chunk in iter(lambda: source.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_source(key: str, path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot store artifact {key!r}: {path} is not a file")
    return path


# --- the interface ------------------------------------------------------------------------------


class ArtifactStore(ABC):
    """Where finished clips go. Every method validates the key first (ValueError naming it)."""

    @abstractmethod
    def put_file(self, key: str, path: Path, content_type: str) -> StoredArtifact:
        """Store `path` under `key`, replacing what was there; readers see old or new bytes, never a mix."""

    @abstractmethod
    def open(self, key: str) -> ArtifactStream:
        """The stored bytes, for streaming; ArtifactNotFoundError if nothing is stored under `key`."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether something is stored under `key`."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes; ArtifactNotFoundError if nothing is stored under `key`."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove what is stored under `key`; nothing stored is not an error."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ListedArtifact]:
        """Every artifact whose key starts with `prefix` ('' for all, else a folder ending in '/', such as
        `JobArtifacts.folder`), in no set order; uploads in progress are not listed."""

    @abstractmethod
    def url(self, key: str, *, expires_in_s: int | None = None) -> str:
        """A link clients can GET (S3: presigned for `expires_in_s`, default from settings)."""

    @abstractmethod
    def local_path(self, key: str) -> Path | None:
        """The file on this machine (local store), None where bytes must be streamed or linked (S3)."""

    def put_bytes(self, key: str, data: bytes, content_type: str) -> StoredArtifact:
        """Store `data` under `key` (small artifacts such as denoise checkpoints), as `put_file` does."""
        validate_key(key)
        with tempfile.TemporaryDirectory(prefix="previz-put-") as scratch:
            path = Path(scratch) / "artifact"
            path.write_bytes(data)
            return self.put_file(key, path, content_type)

    def read_bytes(self, key: str) -> bytes:
        """The whole stored content (small artifacts only); ArtifactNotFoundError if nothing is stored."""
        with self.open(key) as stream:
            return stream.read()


# --- local folder -------------------------------------------------------------------------------


class LocalArtifactStore(ArtifactStore):
    """Files under `root`; `root/<key>` is the artifact. Links are signed and expire:
    `<public_base_url>/v1/artifacts/<key>?expires=..&signature=..`, the Ingress route that serves them
    (checking the signature with `signer`, whose secret every replica on the same folder shares)."""

    def __init__(self, root: Path | str, *, public_base_url: str | None = None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._base_url = public_base_url.rstrip("/") if public_base_url else ""
        self._signer: ArtifactSigner | None = None

    @property
    def signer(self) -> ArtifactSigner:
        """The link signer; its secret file is made on first use, so a store that hands out no link
        leaves its folder untouched."""
        if self._signer is None:
            self._signer = ArtifactSigner.for_folder(self.root)
        return self._signer

    def path_for(self, key: str) -> Path:
        """Where `key` lives (whether or not it exists); the key is validated, so it stays under root."""
        return self.root.joinpath(*validate_key(key).split("/"))

    def put_file(self, key: str, path: Path, content_type: str) -> StoredArtifact:
        target = self.path_for(key)
        source = _check_source(key, path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            sha256, size = self._write_atomically(source, target)
        except OSError as error:
            raise StorageError(f"could not store artifact {key!r} in {self.root}: {error}") from error
        logger.info("stored artifact %s (%d bytes) at %s", key, size, target)
        return StoredArtifact(
            uri=target.as_uri(), key=key, size_bytes=size, sha256=sha256, content_type=content_type
        )

    @staticmethod
    def _write_atomically(source: Path, target: Path) -> tuple[str, int]:
        """Copy to a hidden temp file beside `target`, fsync, rename it over `target`; (sha256, size)."""
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=_TMP_SUFFIX)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                os.fchmod(
                    out.fileno(), 0o644
                )  # mkstemp makes 0600; other readers (a web server) may serve it
                for chunk in iter(lambda: src.read(CHUNK_BYTES), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)  # make the rename itself durable
        return digest.hexdigest(), size

    def open(self, key: str) -> ArtifactStream:
        path = self.path_for(key)
        try:
            raw = path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
            raise ArtifactNotFoundError(f"no artifact {key!r} in {self.root}") from error
        except OSError as error:
            raise StorageError(f"could not open artifact {key!r} in {self.root}: {error}") from error
        return ArtifactStream(
            raw,
            key=key,
            size=os.fstat(raw.fileno()).st_size,
            content_type=mimetypes.guess_type(path.name)[0],
            read_errors=(OSError,),
        )

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def size(self, key: str) -> int:
        return self._existing(key).stat().st_size

    def delete(self, key: str) -> None:
        path = self.path_for(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            raise StorageError(f"could not delete artifact {key!r} in {self.root}: {error}") from error

    def list(self, prefix: str = "") -> Iterator[ListedArtifact]:
        folder = self.root.joinpath(*_check_prefix(prefix).split("/"))
        for parent, folders, files in os.walk(folder):
            folders[:] = [name for name in folders if not name.startswith(".")]
            for name in files:
                if name.startswith("."):  # uploads in progress and the signing key
                    continue
                path = Path(parent) / name
                try:
                    stat = path.stat()
                except FileNotFoundError:  # deleted meanwhile
                    continue
                yield ListedArtifact(
                    key=path.relative_to(self.root).as_posix(),
                    size_bytes=stat.st_size,
                    modified_at=datetime.fromtimestamp(stat.st_mtime, UTC),
                )

    def url(self, key: str, *, expires_in_s: int | None = None) -> str:
        validate_key(key)
        ttl_s = _check_expiry(expires_in_s) if expires_in_s is not None else DEFAULT_LINK_TTL_S
        return f"{self._base_url}{self.signer.url(key, ttl_s)}"

    def local_path(self, key: str) -> Path:
        """The artifact's file; ArtifactNotFoundError if nothing is stored under `key`."""
        return self._existing(key)

    def _existing(self, key: str) -> Path:
        path = self.path_for(key)
        if not path.is_file():
            raise ArtifactNotFoundError(f"no artifact {key!r} in {self.root}")
        return path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- S3 -----------------------------------------------------------------------------------------


class S3ArtifactStore(ArtifactStore):
    """Objects under `settings.s3_uri`: key `k` is `s3://<bucket>/<prefix>/k`."""

    def __init__(
        self,
        settings: StorageSettings,
        client: BaseClient | None = None,
        *,
        transfer_config: TransferConfig = DEFAULT_TRANSFER_CONFIG,
    ) -> None:
        if settings.s3_uri is None:
            raise ValueError("S3ArtifactStore needs settings with `s3_uri` (s3://bucket/prefix)")
        self.settings = settings
        self.location = S3Location.from_uri(settings.s3_uri)
        self.client = (
            client if client is not None else make_s3_client(settings.s3_endpoint_url, settings.s3_region)
        )
        self.transfer_config = transfer_config

    def object_key(self, key: str) -> str:
        """The full S3 key of artifact `key` (prefix included); the key is validated."""
        return self.location.folder_prefix + validate_key(key)

    def object_uri(self, key: str) -> str:
        return f"s3://{self.location.bucket}/{self.object_key(key)}"

    def put_file(self, key: str, path: Path, content_type: str) -> StoredArtifact:
        object_key = self.object_key(key)
        source = _check_source(key, path)
        sha256 = _sha256_of(source)
        extra_args = {"ContentType": content_type, "Metadata": {SHA256_METADATA_KEY: sha256}}
        with self._errors("upload", key):
            self.client.upload_file(
                str(source),
                self.location.bucket,
                object_key,
                ExtraArgs=extra_args,
                Config=self.transfer_config,
            )
            size = self.client.head_object(Bucket=self.location.bucket, Key=object_key)["ContentLength"]
        local_size = source.stat().st_size
        if size != local_size:
            raise StorageError(
                f"upload of artifact {key!r} to {self.object_uri(key)} stored {size} bytes, "
                f"but {source} has {local_size}"
            )
        logger.info("stored artifact %s (%d bytes) at %s", key, size, self.object_uri(key))
        return StoredArtifact(
            uri=self.object_uri(key), key=key, size_bytes=size, sha256=sha256, content_type=content_type
        )

    def open(self, key: str) -> ArtifactStream:
        object_key = self.object_key(key)
        with self._errors("download", key):
            response = self.client.get_object(Bucket=self.location.bucket, Key=object_key)
        return ArtifactStream(
            response["Body"],
            key=key,
            size=response["ContentLength"],
            content_type=response.get("ContentType"),
            read_errors=(BotoCoreError,),  # connection dropped or timed out mid-body
        )

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ArtifactNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return self._head(key)["ContentLength"]

    def delete(self, key: str) -> None:
        object_key = self.object_key(key)
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.location.bucket, Key=object_key)  # missing: still 204

    def list(self, prefix: str = "") -> Iterator[ListedArtifact]:
        start = self.location.folder_prefix + _check_prefix(prefix)
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.location.bucket, Prefix=start
        )
        try:
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"][len(self.location.folder_prefix) :]
                    if _key_problem(key) is None:  # not one of ours: never touched
                        yield ListedArtifact(
                            key=key, size_bytes=item["Size"], modified_at=item["LastModified"]
                        )
        except (ClientError, BotoCoreError) as error:
            where = f"s3://{self.location.bucket}/{start}"
            raise StorageError(f"S3 listing of artifacts under {where} failed: {error}") from error

    def url(self, key: str, *, expires_in_s: int | None = None) -> str:
        """A presigned GET URL on the configured endpoint, valid `expires_in_s` (default: settings)."""
        object_key = self.object_key(key)
        expiry = _check_expiry(expires_in_s if expires_in_s is not None else self.settings.presign_expiry_s)
        with self._errors("presigning", key):
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.location.bucket, "Key": object_key}, ExpiresIn=expiry
            )

    def local_path(self, key: str) -> None:
        validate_key(key)
        return None

    def _head(self, key: str) -> dict[str, Any]:
        object_key = self.object_key(key)
        with self._errors("HEAD", key):
            return self.client.head_object(Bucket=self.location.bucket, Key=object_key)

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Turn what boto3 raises (after botocore's retries) into StorageError naming the key and cause."""
        try:
            yield
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in _S3_NOT_FOUND_CODES:
                raise ArtifactNotFoundError(f"no artifact {key!r} at {self.object_uri(key)}") from error
            raise StorageError(
                f"S3 {action} of artifact {key!r} ({self.object_uri(key)}) failed: {error}"
            ) from error
        except (BotoCoreError, S3UploadFailedError) as error:
            raise StorageError(
                f"S3 {action} of artifact {key!r} ({self.object_uri(key)}) failed: {error}"
            ) from error


# --- choosing one -------------------------------------------------------------------------------


def make_store(settings: StorageSettings) -> ArtifactStore:
    """The store the settings describe."""
    if settings.kind == "s3":
        return S3ArtifactStore(settings)
    return LocalArtifactStore(settings.local_root, public_base_url=settings.public_base_url)
