"""pipeline.s3sync against a real S3 server (SeaweedFS on loopback): mirror, resume, verify, skip."""

from __future__ import annotations

import os
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.client import BaseClient
from botocore.exceptions import ResponseStreamingError
from botocore.stub import Stubber

from pipeline.s3sync import (
    LOCK_NAME,
    MANIFEST_NAME,
    ChecksumMismatchError,
    S3Location,
    S3SyncError,
    candidate_part_sizes,
    list_objects,
    parse_s3_uri,
    sync_s3_prefix,
    upload_folder,
)
from tests.support.servers.seaweedfs import S3Server

MiB = 1024 * 1024
PREFIX = "models/wan22"
BIG = "transformer/diffusion_pytorch_model.safetensors"  # uploaded multipart: 2 parts of 8 MiB
SMALL = "vae/diffusion_pytorch_model.safetensors"
CRASH_AT = 3 * MiB


# --- a folder shaped like a (very small) Diffusers repo, published to its own bucket -----------


def _model_files() -> dict[str, bytes]:  # rel path -> content
    rng = random.Random(22)
    return {
        "model_index.json": b'{"_class_name": "WanPipeline"}',
        "scheduler/scheduler_config.json": b'{"flow_shift": 12.0}',
        BIG: rng.randbytes(11 * MiB + 12345),
        SMALL: rng.randbytes(300_000),
        "tokenizer/nested/deeper/spiece.model": rng.randbytes(10_000),
        "tokenizer/empty.txt": b"",
    }


def _write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel_path, content in files.items():
        (root / rel_path).parent.mkdir(parents=True, exist_ok=True)
        (root / rel_path).write_bytes(content)


def _tree(root: Path) -> dict[str, bytes]:
    """Everything under root except the manifest and lock (so leftover .part files show up)."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and path.name not in (MANIFEST_NAME, LOCK_NAME)
    }


@dataclass
class Published:
    bucket: str
    uri: str  # s3://<bucket>/models/wan22/
    files: dict[str, bytes]  # rel path -> content, as uploaded

    def key(self, rel_path: str) -> str:
        return f"{PREFIX}/{rel_path}"


@pytest.fixture
def client(s3_server: S3Server) -> BaseClient:
    return s3_server.client()  # a fresh client per test, so event hooks never leak between tests


@pytest.fixture
def published(client: BaseClient, tmp_path: Path) -> Published:
    bucket = f"previz-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    files = _model_files()
    _write_tree(tmp_path / "source", files)
    uri = f"s3://{bucket}/{PREFIX}/"
    multipart = TransferConfig(multipart_threshold=5 * MiB)
    assert upload_folder(tmp_path / "source", uri, client=client, transfer_config=multipart) == len(files)
    return Published(bucket=bucket, uri=uri, files=files)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# --- watching and tampering with the wire -----------------------------------------------------


@dataclass
class Call:
    operation: str  # "GetObject", "HeadObject", "ListObjectsV2"
    key: str | None
    range: str | None  # the Range header of a GetObject
    num_bytes: int | None = None  # GetObject: ContentLength of the response


@dataclass
class Spy:
    """Records S3 calls through botocore's event hooks; can wrap GetObject bodies for chosen keys."""

    client: BaseClient
    calls: list[Call] = field(default_factory=list)
    _tampers: dict[str, tuple[Callable[[Any], Any], int | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        events = self.client.meta.events
        for operation in ("GetObject", "HeadObject", "ListObjectsV2"):
            events.register(f"provide-client-params.s3.{operation}", self._on_request)
        events.register("after-call.s3.GetObject", self._on_get_response)

    def gets(self, key: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.operation == "GetObject" and key in (None, c.key)]

    def operations(self) -> set[str]:
        return {c.operation for c in self.calls}

    def tamper(self, key: str, wrap: Callable[[Any], Any], times: int | None = None) -> None:
        """Wrap the body of the next `times` GETs of `key` (every GET when None)."""
        self._tampers[key] = (wrap, times)

    def _on_request(self, params: dict[str, Any], model: Any, context: dict[str, Any], **_: Any) -> None:
        call = Call(model.name, params.get("Key"), params.get("Range"))
        context["spy_call"] = call
        self.calls.append(call)

    def _on_get_response(self, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        call: Call = context["spy_call"]
        call.num_bytes = parsed.get("ContentLength")
        wrap, times = self._tampers.get(call.key or "", (None, 0))
        if wrap is not None and times != 0 and "Body" in parsed:
            parsed["Body"] = wrap(parsed["Body"])
            self._tampers[call.key or ""] = (wrap, None if times is None else times - 1)


class FlipByte:
    """A response body with one byte flipped: corruption in flight."""

    def __init__(self, body: Any, at: int = 1000) -> None:
        self._body, self._at, self._pos = body, at, 0

    def read(self, amt: int | None = None) -> bytes:
        data = bytearray(self._body.read(amt))
        if self._pos <= self._at < self._pos + len(data):
            data[self._at - self._pos] ^= 0xFF
        self._pos += len(data)
        return bytes(data)

    def close(self) -> None:
        self._body.close()


class BreakAfter:
    """A response body that raises `error` once `limit` bytes have been read."""

    def __init__(self, body: Any, limit: int, error: Exception) -> None:
        self._body, self._left, self._error = body, limit, error

    def read(self, amt: int | None = None) -> bytes:
        if self._left == 0:
            raise self._error
        data = self._body.read(self._left if amt is None else min(amt, self._left))
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._body.close()


class SimulatedCrash(Exception):
    """Stands for the process dying mid-download."""


def _crash_big_download(spy: Spy, published: Published, cache: Path, client: BaseClient) -> Path:
    """Run a sync that dies CRASH_AT bytes into BIG; returns BIG's .part path."""
    spy.tamper(published.key(BIG), lambda body: BreakAfter(body, CRASH_AT, SimulatedCrash()), times=1)
    with pytest.raises(SimulatedCrash):
        sync_s3_prefix(published.uri, cache, client=client)
    part = cache / published.bucket / PREFIX / (BIG + ".part")
    assert part.stat().st_size == CRASH_AT
    return part


# --- URIs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://weights/wan22/", ("weights", "wan22/")),
        ("s3://weights/models/wan22", ("weights", "models/wan22")),
        ("s3://weights/", ("weights", "")),
        ("s3://weights", ("weights", "")),
    ],
)
def test_parse_s3_uri_splits_bucket_and_prefix(uri: str, expected: tuple[str, str]) -> None:
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize(
    "uri", ["weights/wan22", "s3:/weights/wan22", "s3://", "s3:///wan22", "https://weights/wan22", "s3://a/x"]
)
def test_parse_s3_uri_rejects_anything_else_naming_value_and_form(uri: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(uri))) as error:
        parse_s3_uri(uri)
    assert "s3://bucket/prefix" in str(error.value)


def test_the_prefix_is_a_folder_not_a_string_prefix(
    published: Published, client: BaseClient, cache: Path, tmp_path: Path
) -> None:
    client.put_object(Bucket=published.bucket, Key=f"{PREFIX}-old/model_index.json", Body=b"{}")
    folder = sync_s3_prefix(f"s3://{published.bucket}/{PREFIX}", cache, client=client)
    assert folder == cache / published.bucket / "models" / "wan22"
    assert _tree(folder) == published.files
    assert not (cache / published.bucket / f"{PREFIX}-old").exists()


# --- mirroring ----------------------------------------------------------------------------------


def test_sync_mirrors_every_object_byte_for_byte_nested_folders_included(
    published: Published, client: BaseClient, cache: Path
) -> None:
    head = client.head_object(Bucket=published.bucket, Key=published.key(BIG))
    assert head["ETag"].endswith('-2"'), "BIG must be a multipart upload to exercise multipart ETags"

    folder = sync_s3_prefix(published.uri, cache, client=client)

    assert folder == cache / published.bucket / PREFIX
    assert _tree(folder) == published.files  # no .part or sidecar left behind either


def test_second_sync_sends_no_get_or_head_requests(
    published: Published, client: BaseClient, cache: Path
) -> None:
    sync_s3_prefix(published.uri, cache, client=client)
    spy = Spy(client)

    folder = sync_s3_prefix(published.uri, cache, client=client)

    assert spy.operations() == {"ListObjectsV2"}
    assert _tree(folder) == published.files


def test_listing_follows_every_page(published: Published, client: BaseClient) -> None:
    spy = Spy(client)
    objects = list_objects(client, S3Location.from_uri(published.uri), page_size=2)
    assert sorted(obj.rel_path for obj in objects) == sorted(published.files)
    assert len([c for c in spy.calls if c.operation == "ListObjectsV2"]) >= 3


def test_progress_goes_from_zero_to_total_and_never_back(
    published: Published, client: BaseClient, cache: Path
) -> None:
    total = sum(len(content) for content in published.files.values())
    downloading: list[tuple[int, int]] = []
    already_current: list[tuple[int, int]] = []

    sync_s3_prefix(published.uri, cache, client=client, progress=lambda *seen: downloading.append(seen))
    sync_s3_prefix(published.uri, cache, client=client, progress=lambda *seen: already_current.append(seen))

    for seen in (downloading, already_current):
        assert seen[0] == (0, total)
        assert seen[-1] == (total, total)
        assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert len(downloading) > len(published.files)  # reported while streaming, not only per file


# --- resuming -----------------------------------------------------------------------------------


def test_interrupted_download_resumes_with_a_range_request_for_the_rest_only(
    published: Published, client: BaseClient, cache: Path
) -> None:
    _crash_big_download(Spy(client), published, cache, client)
    spy = Spy(client)

    folder = sync_s3_prefix(published.uri, cache, client=client)

    size = len(published.files[BIG])
    assert [(c.range, c.num_bytes) for c in spy.gets(published.key(BIG))] == [
        (f"bytes={CRASH_AT}-", size - CRASH_AT)
    ]
    assert _tree(folder) == published.files


def test_dropped_connection_is_continued_within_the_same_sync(
    published: Published, client: BaseClient, cache: Path
) -> None:
    spy = Spy(client)
    dropped = ResponseStreamingError(error="connection reset by peer")
    spy.tamper(published.key(BIG), lambda body: BreakAfter(body, CRASH_AT, dropped), times=1)

    folder = sync_s3_prefix(published.uri, cache, client=client)

    assert [c.range for c in spy.gets(published.key(BIG))] == [None, f"bytes={CRASH_AT}-"]
    assert _tree(folder) == published.files


def test_part_of_an_older_version_is_discarded_and_downloaded_from_the_start(
    published: Published, client: BaseClient, cache: Path
) -> None:
    _crash_big_download(Spy(client), published, cache, client)
    new_big = random.Random(7).randbytes(len(published.files[BIG]))
    client.put_object(Bucket=published.bucket, Key=published.key(BIG), Body=new_big)
    spy = Spy(client)

    folder = sync_s3_prefix(published.uri, cache, client=client)

    assert [c.range for c in spy.gets(published.key(BIG))] == [None]
    assert _tree(folder) == {**published.files, BIG: new_big}


def test_corrupted_part_is_caught_after_resuming_and_downloaded_again(
    published: Published, client: BaseClient, cache: Path
) -> None:
    part = _crash_big_download(Spy(client), published, cache, client)
    with part.open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    spy = Spy(client)

    folder = sync_s3_prefix(published.uri, cache, client=client)

    assert [c.range for c in spy.gets(published.key(BIG))] == [f"bytes={CRASH_AT}-", None]
    assert _tree(folder) == published.files


# --- what is fetched again ----------------------------------------------------------------------


def test_truncated_local_file_is_fetched_again(published: Published, client: BaseClient, cache: Path) -> None:
    folder = sync_s3_prefix(published.uri, cache, client=client)
    (folder / BIG).write_bytes(published.files[BIG][:1000])
    spy = Spy(client)

    sync_s3_prefix(published.uri, cache, client=client)

    assert [c.key for c in spy.gets()] == [published.key(BIG)]
    assert _tree(folder) == published.files


def test_edited_local_file_of_the_same_size_is_fetched_again(
    published: Published, client: BaseClient, cache: Path
) -> None:
    folder = sync_s3_prefix(published.uri, cache, client=client)
    path = folder / SMALL
    with path.open("r+b") as handle:
        handle.write(b"edited")
    stat = path.stat()  # move mtime on explicitly: coarse filesystem clocks could hide a quick edit
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    spy = Spy(client)

    sync_s3_prefix(published.uri, cache, client=client)

    assert [c.key for c in spy.gets()] == [published.key(SMALL)]
    assert _tree(folder) == published.files


def test_local_files_matching_s3_are_kept_without_get_when_the_manifest_is_lost(
    published: Published, client: BaseClient, cache: Path
) -> None:
    folder = sync_s3_prefix(published.uri, cache, client=client)
    (folder / MANIFEST_NAME).unlink()
    spy = Spy(client)

    sync_s3_prefix(published.uri, cache, client=client)

    assert spy.gets() == []
    assert (folder / MANIFEST_NAME).exists()
    assert _tree(folder) == published.files


def test_object_changed_on_s3_is_fetched_again(published: Published, client: BaseClient, cache: Path) -> None:
    folder = sync_s3_prefix(published.uri, cache, client=client)
    new_small = b"a retrained VAE" * 1000
    client.put_object(Bucket=published.bucket, Key=published.key(SMALL), Body=new_small)
    spy = Spy(client)

    sync_s3_prefix(published.uri, cache, client=client)

    assert [c.key for c in spy.gets()] == [published.key(SMALL)]
    assert _tree(folder) == {**published.files, SMALL: new_small}


def test_object_deleted_on_s3_is_deleted_from_the_mirror(
    published: Published, client: BaseClient, cache: Path
) -> None:
    folder = sync_s3_prefix(published.uri, cache, client=client)
    client.delete_object(Bucket=published.bucket, Key=published.key(SMALL))

    sync_s3_prefix(published.uri, cache, client=client)

    assert _tree(folder) == {rel: data for rel, data in published.files.items() if rel != SMALL}


# --- verification -------------------------------------------------------------------------------


@pytest.mark.parametrize("rel_path", [BIG, SMALL], ids=["multipart-etag", "md5-etag"])
def test_corruption_in_flight_is_retried_once_then_raises_naming_the_key(
    published: Published, client: BaseClient, cache: Path, rel_path: str
) -> None:
    spy = Spy(client)
    spy.tamper(published.key(rel_path), FlipByte)

    with pytest.raises(ChecksumMismatchError, match=re.escape(published.key(rel_path))):
        sync_s3_prefix(published.uri, cache, client=client)

    assert len(spy.gets(published.key(rel_path))) == 2
    dest = cache / published.bucket / PREFIX / rel_path
    assert not dest.exists()
    assert not dest.with_name(dest.name + ".part").exists()


def test_one_corrupted_download_is_healed_by_the_automatic_retry(
    published: Published, client: BaseClient, cache: Path
) -> None:
    spy = Spy(client)
    spy.tamper(published.key(BIG), FlipByte, times=1)

    folder = sync_s3_prefix(published.uri, cache, client=client)

    assert len(spy.gets(published.key(BIG))) == 2
    assert _tree(folder) == published.files


def test_a_stored_sha256_checksum_is_preferred_over_the_etag(
    published: Published, client: BaseClient, cache: Path
) -> None:
    key = published.key("text_encoder/model.safetensors")
    client.put_object(Bucket=published.bucket, Key=key, Body=b"umt5" * 5000, ChecksumAlgorithm="SHA256")
    Spy(client).tamper(key, FlipByte)

    with pytest.raises(ChecksumMismatchError, match=rf"{re.escape(key)}: expected sha256 "):
        sync_s3_prefix(published.uri, cache, client=client)


def test_candidate_part_sizes_split_the_object_into_the_etags_part_count() -> None:
    size = 11 * MiB + 12345
    assert 8 * MiB in candidate_part_sizes(size, 2, None)
    assert candidate_part_sizes(size, 3, 5 * MiB)[0] == 5 * MiB
    for num_parts in (1, 2, 3, 100):
        for part_size in candidate_part_sizes(size, num_parts, None):
            assert -(-size // part_size) == num_parts


def test_object_replaced_between_listing_and_download_raises_instead_of_mixing_versions(
    published: Published,
    client: BaseClient,
    cache: Path,
    s3_server: S3Server,  # noqa: F811
) -> None:
    other_writer = s3_server.client()
    key = published.key(SMALL)

    def replace_after_listing(params: dict[str, Any], **_: Any) -> None:
        if params.get("Key") == key:
            other_writer.put_object(Bucket=published.bucket, Key=key, Body=b"a newer VAE")

    client.meta.events.register("provide-client-params.s3.HeadObject", replace_after_listing)

    with pytest.raises(S3SyncError, match=rf"{re.escape(key)} changed on S3 while it was being synced"):
        sync_s3_prefix(published.uri, cache, client=client)
    assert not (cache / published.bucket / PREFIX / SMALL).exists()


# --- refusals -----------------------------------------------------------------------------------


def test_empty_prefix_raises_naming_it(published: Published, client: BaseClient, cache: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"no objects under s3://{published.bucket}/nothing/")
    ):
        sync_s3_prefix(f"s3://{published.bucket}/nothing", cache, client=client)


def test_keys_that_would_escape_the_cache_dir_are_refused_before_any_download(tmp_path: Path) -> None:
    # Real S3 servers refuse such keys on upload, so the listing is stubbed.
    offline = boto3.client("s3", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s")
    listing = {
        "Contents": [
            {"Key": "models/model_index.json", "Size": 2, "ETag": '"99914b932bd37a50b983c5e7c90ae93b"'},
            {"Key": "models/../../evil.sh", "Size": 1, "ETag": '"0cc175b9c0f1b6a831c399e269772661"'},
        ],
        "IsTruncated": False,
    }
    with Stubber(offline) as stub:
        stub.add_response("list_objects_v2", listing)
        with pytest.raises(ValueError, match=r"models/\.\./\.\./evil\.sh.*escape"):
            sync_s3_prefix("s3://weights/models", tmp_path / "cache", client=offline)
        stub.assert_no_pending_responses()
    assert not (tmp_path / "evil.sh").exists()


# --- publishing ---------------------------------------------------------------------------------


def test_upload_folder_republishes_a_mirror_without_its_bookkeeping(
    published: Published, client: BaseClient, cache: Path
) -> None:
    folder = sync_s3_prefix(published.uri, cache, client=client)
    (folder / (BIG + ".part")).write_bytes(b"leftover")
    copy_uri = f"s3://{published.bucket}/copies/wan22"

    assert upload_folder(folder, copy_uri, client=client) == len(published.files)
    assert _tree(sync_s3_prefix(copy_uri, cache, client=client)) == published.files
