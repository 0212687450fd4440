"""Mirror an S3 prefix (a Diffusers-format Wan2.2 folder, tens of GB) into a local cache: resumable,
checksummed, atomic, and free when the cache is already current.

Cache layout for `s3://weights/wan22/` under `cache_dir`:

    cache_dir/weights/wan22/
        .previz-manifest.json     # rel path -> {etag, size, mtime_ns} of every verified file
        .previz-sync.lock         # flock: one sync of this prefix at a time on this machine
        model_index.json
        transformer/diffusion_pytorch_model-00001-of-00006.safetensors
        transformer/diffusion_pytorch_model-00002-of-00006.safetensors.part       # interrupted download
        transformer/diffusion_pytorch_model-00002-of-00006.safetensors.part.json  # ETag the .part belongs to

Per object, in order:
1. trusted: the manifest records the listed ETag and size and the file still has that size and mtime
   -> nothing is requested;
2. a local file of the right size that is not trusted (edited, manifest lost) is hashed against the
   object's checksum and kept when it matches;
3. otherwise it is downloaded into `<file>.part` (continuing an earlier `.part` of the same ETag with a
   ranged GET), hashed while streaming, and moved into place with `os.replace` once verified.

Verification prefers a full-object ChecksumSHA256 (HEAD with ChecksumMode=ENABLED); else the ETag:
the MD5 of the content for single-part uploads, the MD5 of the part MD5s ("<hex>-<N>") for multipart
uploads, recomputed for the part sizes that could have produced N parts. A mismatch deletes the
download and starts over once, then raises `ChecksumMismatchError` naming the key.

Endpoint, region and credentials come from boto3's usual chain (AWS_ENDPOINT_URL, AWS_REGION,
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, instance roles) unless a client or endpoint is given.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from boto3.s3.transfer import TransferConfig
from botocore.client import BaseClient
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    FlexibleChecksumError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from pipeline.s3 import make_s3_client

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
CHUNK_BYTES = 8 * MiB  # read/write/hash granularity: memory per download stays at one chunk
MANIFEST_NAME = ".previz-manifest.json"
LOCK_NAME = ".previz-sync.lock"
PART_SUFFIX = ".part"
SIDECAR_SUFFIX = ".part.json"
NUM_DOWNLOAD_ATTEMPTS = 2  # a checksum mismatch is retried once from scratch, then raised
NUM_STREAM_RESUMES = 3  # a connection dropped mid-body is continued with a ranged GET this often
DEFAULT_MAX_WORKERS = 4  # files downloaded at once (Wan2.2 experts are sharded into many files)
# Part sizes uploaders commonly use (boto3/aws-cli default, the S3 minimum, larger tool defaults);
# only those that produce the ETag's part count are hashed.
COMMON_PART_SIZES = (8 * MiB, 5 * MiB, 16 * MiB, 64 * MiB)

ProgressFn = Callable[[int, int], None]  # (bytes_done, bytes_total) over the whole prefix

_URI_FORM = "s3://bucket/prefix"
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")
_MD5_HEX_RE = re.compile(r"[0-9a-f]{32}")
_MULTIPART_ETAG_RE = re.compile(r"([0-9a-f]{32})-([1-9][0-9]*)")
_STREAM_ERRORS = (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError)


class S3SyncError(RuntimeError):
    """A sync could not produce a verified mirror (object changed mid-sync, unsafe key, ...)."""


class ChecksumMismatchError(S3SyncError):
    """Downloaded bytes do not match the object's checksum, even after one fresh retry."""


class _Stopped(S3SyncError):
    """Raised in a worker when another worker failed and the sync is being abandoned."""


# --- where things are -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class S3Location:
    """A bucket and key prefix; the prefix is treated as a folder (`models/wan` == `models/wan/`)."""

    bucket: str
    prefix: str  # as written after the bucket in the URI; "" is the whole bucket

    @classmethod
    def from_uri(cls, uri: str) -> S3Location:
        bucket, prefix = parse_s3_uri(uri)
        return cls(bucket=bucket, prefix=prefix)

    @property
    def folder_prefix(self) -> str:
        """The key prefix that lists this folder's objects: "" or ending in "/"."""
        return self.prefix if self.prefix == "" or self.prefix.endswith("/") else self.prefix + "/"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/prefix/` into ("bucket", "prefix/"); anything else raises ValueError."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"expected an S3 URI of the form `{_URI_FORM}`, got {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not _BUCKET_RE.fullmatch(bucket):
        raise ValueError(
            f"expected an S3 URI of the form `{_URI_FORM}` with a bucket name of 3-255 letters, digits, "
            f"'.', '-' or '_', got {uri!r}"
        )
    return bucket, prefix


def mirror_dir(cache_dir: Path, location: S3Location) -> Path:
    """The local folder `sync_s3_prefix` fills: `cache_dir/<bucket>/<prefix>`."""
    root = Path(cache_dir) / location.bucket
    prefix = location.folder_prefix.rstrip("/")
    return _safe_join(root, prefix, location.uri) if prefix else root


def _safe_join(root: Path, rel_path: str, what: str) -> Path:
    """`root/rel_path` for a "/"-separated path that stays inside root; refuses "..", "." and "//"."""
    parts = rel_path.split("/")
    if any(part in ("", ".", "..") for part in parts) or "\\" in rel_path or "\0" in rel_path:
        raise ValueError(
            f"refusing to mirror {what}: {rel_path!r} is not a plain relative path and could escape "
            f"the cache dir {root}"
        )
    return root.joinpath(*parts)


# --- listing ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteObject:
    key: str  # full S3 key
    rel_path: str  # key below the folder prefix, "/"-separated; the local path below the mirror dir
    size: int
    etag: str  # without the surrounding quotes S3 puts on it


def list_objects(client: BaseClient, location: S3Location, *, page_size: int = 1000) -> list[RemoteObject]:
    """Every object under the folder prefix (all pages), folder-marker keys ending in "/" left out."""
    prefix = location.folder_prefix
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=location.bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
    )
    objects = []
    for page in pages:
        for item in page.get("Contents", []):
            rel_path = item["Key"][len(prefix) :]
            if rel_path and not rel_path.endswith("/"):
                etag = item["ETag"].strip('"')
                objects.append(RemoteObject(item["Key"], rel_path, item["Size"], etag))
    return objects


def _check_no_reserved_names(objects: list[RemoteObject]) -> None:
    """Keys must not land on the manifest, the lock, or another key's `.part`/`.part.json`."""
    rel_paths = {obj.rel_path for obj in objects}
    for obj in objects:
        clashes_with_part = any(
            obj.rel_path.endswith(suffix) and obj.rel_path[: -len(suffix)] in rel_paths
            for suffix in (PART_SUFFIX, SIDECAR_SUFFIX)
        )
        if obj.rel_path in (MANIFEST_NAME, LOCK_NAME) or clashes_with_part:
            raise S3SyncError(
                f"cannot mirror key {obj.key!r}: its local name is reserved for sync bookkeeping"
            )


# --- checksums --------------------------------------------------------------------------------


class _Hasher(Protocol):
    def update(self, chunk: bytes) -> None: ...

    def value(self) -> str: ...


class _DigestHasher:
    """A hashlib digest rendered the way S3 reports it (hex for ETags, base64 for Checksum*)."""

    def __init__(self, algorithm: str, *, base64_value: bool) -> None:
        self._hash = hashlib.new(algorithm)
        self._base64_value = base64_value

    def update(self, chunk: bytes) -> None:
        self._hash.update(chunk)

    def value(self) -> str:
        if self._base64_value:
            return base64.b64encode(self._hash.digest()).decode("ascii")
        return self._hash.hexdigest()


class _MultipartEtagHasher:
    """S3's multipart ETag for one guessed part size: md5(md5(part 1) + ... + md5(part N)) + "-N"."""

    def __init__(self, part_size: int) -> None:
        self._part_size = part_size
        self._part_md5s: list[bytes] = []
        self._current = hashlib.md5()
        self._current_bytes = 0

    def update(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            take = min(len(view), self._part_size - self._current_bytes)
            self._current.update(view[:take])
            self._current_bytes += take
            view = view[take:]
            if self._current_bytes == self._part_size:
                self._close_part()

    def value(self) -> str:
        part_md5s = list(self._part_md5s)
        if self._current_bytes or not part_md5s:
            part_md5s.append(self._current.digest())
        return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"

    def _close_part(self) -> None:
        self._part_md5s.append(self._current.digest())
        self._current = hashlib.md5()
        self._current_bytes = 0


@dataclass(frozen=True, slots=True)
class ChecksumSpec:
    """What a complete download must hash to."""

    algorithm: str  # "sha256" | "md5" | "multipart-md5" | "size-only" (nothing to check against)
    expected: str  # base64 for sha256, hex for md5, "<hex>-<N>" for multipart-md5
    part_sizes: tuple[int, ...] = ()  # multipart-md5: candidate part sizes, all hashed in one pass

    def new_verifier(self) -> _Verifier:
        if self.algorithm == "sha256":
            return _Verifier(self, [_DigestHasher("sha256", base64_value=True)])
        if self.algorithm == "md5":
            return _Verifier(self, [_DigestHasher("md5", base64_value=False)])
        if self.algorithm == "size-only":
            return _Verifier(self, [])
        return _Verifier(self, [_MultipartEtagHasher(size) for size in self.part_sizes])


class _Verifier:
    """Fed the bytes of a file in order; says whether they match the spec."""

    def __init__(self, spec: ChecksumSpec, hashers: Sequence[_Hasher]) -> None:
        self.spec = spec
        self._hashers = hashers

    def update(self, chunk: bytes) -> None:
        for hasher in self._hashers:
            hasher.update(chunk)

    def matches(self) -> bool:
        return not self._hashers or any(hasher.value() == self.spec.expected for hasher in self._hashers)

    def describe_mismatch(self) -> str:
        got = ", ".join(hasher.value() for hasher in self._hashers)
        return f"expected {self.spec.algorithm} {self.spec.expected}, got {got}"


def checksum_spec(client: BaseClient, bucket: str, obj: RemoteObject) -> ChecksumSpec:
    """How to verify `obj`: full-object SHA256 if S3 has one, else its ETag (single or multipart)."""
    head = _head(client, bucket, obj, ChecksumMode="ENABLED")
    sha256 = head.get("ChecksumSHA256")
    if sha256 and "-" not in sha256 and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
        return ChecksumSpec("sha256", sha256)
    # With SSE-KMS or SSE-C the ETag is not derived from the plaintext.
    kms = str(head.get("ServerSideEncryption", "")).startswith("aws:kms")
    etag_is_md5_based = not kms and not head.get("SSECustomerAlgorithm")
    if etag_is_md5_based and _MD5_HEX_RE.fullmatch(obj.etag):
        return ChecksumSpec("md5", obj.etag)
    multipart = _MULTIPART_ETAG_RE.fullmatch(obj.etag)
    if etag_is_md5_based and multipart:
        first_part = _first_part_size(client, bucket, obj)
        part_sizes = candidate_part_sizes(obj.size, int(multipart.group(2)), first_part)
        if part_sizes:
            return ChecksumSpec("multipart-md5", obj.etag, part_sizes)
    logger.warning(
        "s3://%s/%s: ETag %s is not an MD5 of the content and no SHA256 checksum is stored; "
        "only its size will be checked",
        bucket,
        obj.key,
        obj.etag,
    )
    return ChecksumSpec("size-only", obj.etag)


def candidate_part_sizes(size: int, num_parts: int, first_part_size: int | None) -> tuple[int, ...]:
    """Part sizes that split `size` bytes into exactly `num_parts` parts, most likely first.

    The size of part 1 (HEAD with PartNumber=1) is the real one when the server reports it; then
    size/N rounded up to a whole MiB, then common tool defaults.
    """
    implied = math.ceil(size / num_parts / MiB) * MiB
    guesses = (first_part_size, implied, *COMMON_PART_SIZES)
    return tuple(
        part_size
        for part_size in dict.fromkeys(guesses)
        if part_size and max(1, math.ceil(size / part_size)) == num_parts
    )


def _first_part_size(client: BaseClient, bucket: str, obj: RemoteObject) -> int | None:
    """Size of part 1 of a multipart object (HEAD with PartNumber=1), None where unsupported."""
    try:
        return _head(client, bucket, obj, PartNumber=1).get("ContentLength")
    except ClientError as error:
        logger.debug(
            "HEAD PartNumber=1 of s3://%s/%s failed (%s); guessing part sizes", bucket, obj.key, error
        )
        return None


def _head(client: BaseClient, bucket: str, obj: RemoteObject, **extra: Any) -> dict[str, Any]:
    try:
        return client.head_object(Bucket=bucket, Key=obj.key, IfMatch=_quoted(obj.etag), **extra)
    except ClientError as error:
        if _precondition_failed(error):
            raise _changed_error(bucket, obj) from error
        raise


def _quoted(etag: str) -> str:
    return f'"{etag}"'


def _precondition_failed(error: ClientError) -> bool:
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 412 or error.response.get("Error", {}).get("Code") == "PreconditionFailed"


def _changed_error(bucket: str, obj: RemoteObject) -> S3SyncError:
    return S3SyncError(
        f"s3://{bucket}/{obj.key} changed on S3 while it was being synced (ETag is no longer "
        f"{obj.etag}); run the sync again"
    )


# --- manifest, lock, progress -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    etag: str  # ETag of the object the file was verified against
    size: int
    mtime_ns: int  # of the local file when verified; a later edit makes the entry untrusted


class _Manifest:
    """rel path -> ManifestEntry, rewritten atomically after each verified file (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries = self._load(path)  # rel path -> ManifestEntry
        self._lock = threading.Lock()

    @staticmethod
    def _load(path: Path) -> dict[str, ManifestEntry]:
        if not path.exists():
            return {}
        try:
            files = json.loads(path.read_text())["files"]
            return {rel: ManifestEntry(**entry) for rel, entry in files.items()}
        except (ValueError, KeyError, TypeError) as error:
            logger.warning(
                "ignoring unreadable sync manifest %s (%s); local files will be re-hashed", path, error
            )
            return {}

    def is_current(self, obj: RemoteObject, local: Path) -> bool:
        entry = self.entries.get(obj.rel_path)
        if entry is None or (entry.etag, entry.size) != (obj.etag, obj.size):
            return False
        stat = _stat(local)
        return stat is not None and (stat.st_size, stat.st_mtime_ns) == (entry.size, entry.mtime_ns)

    def record(self, obj: RemoteObject, local: Path) -> None:
        entry = ManifestEntry(etag=obj.etag, size=obj.size, mtime_ns=local.stat().st_mtime_ns)
        with self._lock:
            self.entries[obj.rel_path] = entry
            self._save()

    def forget(self, rel_path: str) -> None:
        with self._lock:
            self.entries.pop(rel_path, None)
            self._save()

    def _save(self) -> None:
        files = {rel: asdict(entry) for rel, entry in sorted(self.entries.items())}
        _write_json_atomic(self.path, {"version": 1, "files": files})


class _Progress:
    """Bytes verified or on disk across the whole prefix; also the stop flag shared by workers."""

    def __init__(self, total: int, callback: ProgressFn | None) -> None:
        self.total = total
        self.done = 0
        self.stop = threading.Event()
        self._callback = callback
        self._lock = threading.Lock()

    def add(self, num_bytes: int) -> None:
        if self.stop.is_set():
            raise _Stopped("sync abandoned after an error in another download")
        with self._lock:
            self.done += num_bytes
            if self._callback is not None:
                self._callback(self.done, self.total)


class _FileProgress:
    """The share of `_Progress` one file has added, so a restarted download can take it back."""

    def __init__(self, progress: _Progress) -> None:
        self._progress = progress
        self.num_bytes = 0

    def add(self, num_bytes: int) -> None:
        self.num_bytes += num_bytes
        self._progress.add(num_bytes)

    def rewind(self) -> None:
        self._progress.add(-self.num_bytes)
        self.num_bytes = 0


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Serialise syncs of one prefix across processes (e.g. several replicas on one node)."""
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process syncing into %s", path.parent)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- the sync ---------------------------------------------------------------------------------


def sync_s3_prefix(
    uri: str,
    cache_dir: Path,
    *,
    client: BaseClient | None = None,
    endpoint_url: str | None = None,
    progress: ProgressFn | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
) -> Path:
    """Mirror every object under `uri` into `cache_dir/<bucket>/<prefix>/` and return that folder.

    `progress(bytes_done, bytes_total)` is called (from worker threads, one call at a time) as bytes
    land or files are found current; it ends at (total, total). Files this sync recorded earlier that
    are no longer on S3 are deleted.
    """
    location = S3Location.from_uri(uri)
    client = client if client is not None else make_s3_client(endpoint_url)
    objects = list_objects(client, location)
    if not objects:
        raise FileNotFoundError(f"no objects under s3://{location.bucket}/{location.folder_prefix}")
    root = mirror_dir(cache_dir, location)
    local_paths = {
        obj.rel_path: _safe_join(root, obj.rel_path, f"s3://{location.bucket}/{obj.key}") for obj in objects
    }
    _check_no_reserved_names(objects)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / LOCK_NAME):
        manifest = _Manifest(root / MANIFEST_NAME)
        _prune_deleted(root, manifest, objects)
        tracker = _Progress(sum(obj.size for obj in objects), progress)
        tracker.add(0)
        tasks = [
            partial(_sync_object, client, location.bucket, obj, local_paths[obj.rel_path], manifest, tracker)
            for obj in objects
        ]
        _run_all(tasks, max_workers, tracker.stop)
    return root


def _prune_deleted(root: Path, manifest: _Manifest, objects: list[RemoteObject]) -> None:
    """Delete files an earlier sync verified whose objects are gone from S3."""
    listed = {obj.rel_path for obj in objects}
    for rel_path in [rel for rel in manifest.entries if rel not in listed]:
        local = root.joinpath(*rel_path.split("/"))
        logger.info("removing %s: no longer on S3", local)
        local.unlink(missing_ok=True)
        manifest.forget(rel_path)


def _run_all(tasks: list[Callable[[], None]], max_workers: int, stop: threading.Event) -> None:
    """Run tasks on a thread pool; on the first error stop the others and raise that error."""
    with ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="s3sync") as pool:
        futures = [pool.submit(task) for task in tasks]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:
            stop.set()  # also on KeyboardInterrupt: running downloads end at their next chunk
            for future in futures:
                future.cancel()
    _raise_first_error(futures)


def _raise_first_error(futures: list[Future[None]]) -> None:
    """Raise the error that stopped the sync, not the `_Stopped` it caused in the other workers."""
    errors = [future.exception() for future in futures if not future.cancelled() and future.exception()]
    errors.sort(key=lambda error: isinstance(error, _Stopped))
    if errors:
        raise errors[0]


def _sync_object(
    client: BaseClient, bucket: str, obj: RemoteObject, dest: Path, manifest: _Manifest, progress: _Progress
) -> None:
    if manifest.is_current(obj, dest):
        progress.add(obj.size)
        return
    spec = checksum_spec(client, bucket, obj)
    if _local_copy_matches(dest, obj, spec):
        logger.info("keeping %s: it matches s3://%s/%s", dest, bucket, obj.key)
        progress.add(obj.size)
    else:
        _download(client, bucket, obj, dest, spec, _FileProgress(progress))
    manifest.record(obj, dest)


def _local_copy_matches(dest: Path, obj: RemoteObject, spec: ChecksumSpec) -> bool:
    stat = _stat(dest)
    if stat is None or stat.st_size != obj.size:
        return False
    verifier = spec.new_verifier()
    _feed_file(dest, verifier)
    return verifier.matches()


def _download(
    client: BaseClient,
    bucket: str,
    obj: RemoteObject,
    dest: Path,
    spec: ChecksumSpec,
    progress: _FileProgress,
) -> None:
    """Download with one fresh retry after a checksum mismatch."""
    for attempt in range(1, NUM_DOWNLOAD_ATTEMPTS + 1):
        try:
            _download_once(client, bucket, obj, dest, spec, progress)
            return
        except ChecksumMismatchError as error:
            progress.rewind()
            if attempt == NUM_DOWNLOAD_ATTEMPTS:
                raise
            logger.warning("%s; downloading it again from the start", error)


def _download_once(
    client: BaseClient,
    bucket: str,
    obj: RemoteObject,
    dest: Path,
    spec: ChecksumSpec,
    progress: _FileProgress,
) -> None:
    """Continue or start `<dest>.part`, verify it, then move it into place."""
    part, sidecar = _part_paths(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = _resume_offset(part, sidecar, obj)
    verifier = spec.new_verifier()
    if offset:
        logger.info("resuming s3://%s/%s at byte %d of %d", bucket, obj.key, offset, obj.size)
        _feed_file(part, verifier)
        progress.add(offset)
    try:
        _stream_rest(client, bucket, obj, part, verifier, progress)
    except FlexibleChecksumError as error:  # botocore's own CRC check of a whole-object GET
        _discard(part, sidecar)
        raise ChecksumMismatchError(f"checksum mismatch for s3://{bucket}/{obj.key}: {error}") from error
    size = part.stat().st_size
    if size != obj.size or not verifier.matches():
        _discard(part, sidecar)
        found = f"{size} bytes, expected {obj.size}" if size != obj.size else verifier.describe_mismatch()
        raise ChecksumMismatchError(f"checksum mismatch for s3://{bucket}/{obj.key}: {found}")
    os.replace(part, dest)
    sidecar.unlink(missing_ok=True)


def _part_paths(dest: Path) -> tuple[Path, Path]:
    return dest.with_name(dest.name + PART_SUFFIX), dest.with_name(dest.name + SIDECAR_SUFFIX)


def _resume_offset(part: Path, sidecar: Path, obj: RemoteObject) -> int:
    """Bytes of `part` that can be kept: all of it if the sidecar says it is this ETag, else none."""
    stat = _stat(part)
    if stat is not None and stat.st_size <= obj.size and _read_sidecar_etag(sidecar) == obj.etag:
        return stat.st_size
    if stat is not None:
        logger.info("discarding %s: it belongs to another version of the object", part)
    part.unlink(missing_ok=True)
    _write_json_atomic(sidecar, {"key": obj.key, "etag": obj.etag, "size": obj.size})
    part.touch()
    return 0


def _read_sidecar_etag(sidecar: Path) -> str | None:
    try:
        return json.loads(sidecar.read_text())["etag"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stream_rest(
    client: BaseClient,
    bucket: str,
    obj: RemoteObject,
    part: Path,
    verifier: _Verifier,
    progress: _FileProgress,
) -> None:
    """Append the object's remaining bytes to `part`, continuing after dropped connections."""
    for num_gets in range(1, NUM_STREAM_RESUMES + 2):
        offset = part.stat().st_size
        if offset >= obj.size:
            return
        try:
            _append_body(_open_body(client, bucket, obj, offset), part, verifier, progress)
        except _STREAM_ERRORS as error:
            if num_gets > NUM_STREAM_RESUMES:
                raise S3SyncError(
                    f"download of s3://{bucket}/{obj.key} kept breaking off: {error}"
                ) from error
            logger.warning(
                "s3://%s/%s broke off (%s); continuing from byte %d", bucket, obj.key, error, offset
            )


def _open_body(client: BaseClient, bucket: str, obj: RemoteObject, offset: int) -> BinaryIO:
    """GET the object from `offset` on, only if it is still the listed version."""
    request: dict[str, Any] = {"Bucket": bucket, "Key": obj.key, "IfMatch": _quoted(obj.etag)}
    if offset:
        request["Range"] = f"bytes={offset}-"
    try:
        return client.get_object(**request)["Body"]
    except ClientError as error:
        if _precondition_failed(error):
            raise _changed_error(bucket, obj) from error
        raise


def _append_body(body: BinaryIO, part: Path, verifier: _Verifier, progress: _FileProgress) -> None:
    """Stream `body` onto the end of `part` chunk by chunk, hashing what is written."""
    try:
        with part.open("ab") as out:
            for chunk in iter(lambda: body.read(CHUNK_BYTES), b""):
                out.write(chunk)
                verifier.update(chunk)
                progress.add(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    finally:
        body.close()


def _feed_file(path: Path, verifier: _Verifier) -> None:
    with path.open("rb") as source:
        for chunk in iter(lambda: source.read(CHUNK_BYTES), b""):
            verifier.update(chunk)


def _discard(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


# --- publishing -------------------------------------------------------------------------------


def upload_folder(
    folder: Path, uri: str, *, client: BaseClient | None = None, transfer_config: TransferConfig | None = None
) -> int:
    """Upload every file under `folder` to `uri` (keys keep the relative paths); returns the count.

    Sync bookkeeping files (manifest, lock, `.part`, `.part.json`) are left out, so a mirror folder can
    be republished. `transfer_config` sets boto3's multipart threshold and part size.
    """
    location = S3Location.from_uri(uri)
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot upload {folder}: not a directory")
    client = client if client is not None else make_s3_client()
    files = sorted(path for path in folder.rglob("*") if path.is_file() and not _is_bookkeeping(path))
    for path in files:
        key = location.folder_prefix + path.relative_to(folder).as_posix()
        client.upload_file(str(path), location.bucket, key, Config=transfer_config)
    return len(files)


def _is_bookkeeping(path: Path) -> bool:
    name = path.name
    return name in (MANIFEST_NAME, LOCK_NAME) or name.endswith((PART_SUFFIX, SIDECAR_SUFFIX, ".tmp"))
