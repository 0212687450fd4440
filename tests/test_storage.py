"""serve.storage: the artifact store for finished clips, on a local folder and on a real S3 server
(SeaweedFS on loopback, one bucket for this module)."""

from __future__ import annotations

import datetime
import errno
import hashlib
import os
import random
import re
import socket
import time
import uuid
from pathlib import Path
from unittest import mock
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from pydantic import ValidationError

from pipeline.s3 import S3_MAX_ATTEMPTS, make_s3_client
from serve.luts import read_source
from serve.storage import (
    LOCAL_URL_PREFIX,
    ArtifactNotFoundError,
    ArtifactStore,
    JobArtifacts,
    LocalArtifactStore,
    S3ArtifactStore,
    StorageError,
    StorageSettings,
    artifact_key,
    make_store,
)
from tests.support.servers.seaweedfs import S3Server

MiB = 1024 * 1024
CLIP_KEY = "shot-library/job-0001/clip.mp4"
POSTER_KEY = "shot-library/job-0001/poster.jpg"
BAD_KEYS = [
    "../x",
    "a/../b",
    "/abs",
    "a//b",
    "a/",
    "",
    "has space.mp4",
    "a/./b",
    "a/.hidden",
    "a\\b",
    "é.mp4",
]


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.fixture
def clip(tmp_path: Path) -> bytes:
    return random.Random(7).randbytes(2 * MiB + 123)  # several read chunks, not a whole number of them


@pytest.fixture
def local(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


def _read_all(store: ArtifactStore, key: str) -> bytes:
    stream = store.open(key)
    chunks = list(stream)
    assert all(len(chunk) <= 1 * MiB for chunk in chunks)  # streamed, not read whole
    return b"".join(chunks)


# --- keys -------------------------------------------------------------------------------------


def test_artifact_key_joins_project_job_and_name() -> None:
    assert artifact_key("shot-library", "job-0001", "clip.mp4") == CLIP_KEY


@pytest.mark.parametrize(
    ("project", "job_id", "name", "named"),
    [
        ("a/b", "job", "clip.mp4", "invalid project 'a/b'"),
        ("proj", "..", "clip.mp4", "invalid job_id '..'"),
        ("proj", "job", "", "invalid name ''"),
        ("proj", "job", "my clip.mp4", "invalid name 'my clip.mp4'"),
    ],
)
def test_artifact_key_rejects_a_part_that_is_not_one_plain_name(
    project: str, job_id: str, name: str, named: str
) -> None:
    with pytest.raises(ValueError, match="^" + named.replace(".", r"\.")):
        artifact_key(project, job_id, name)


@pytest.mark.parametrize("key", BAD_KEYS)
@pytest.mark.parametrize("method", ["put_file", "open", "exists", "size", "delete", "url", "local_path"])
def test_bad_keys_are_rejected_naming_the_key_before_touching_the_disk(
    local: LocalArtifactStore, tmp_path: Path, key: str, method: str
) -> None:
    source = _write(tmp_path / "clip.mp4", b"mp4")
    args = (key, source, "video/mp4") if method == "put_file" else (key,)
    with pytest.raises(ValueError, match="^" + re.escape(f"invalid artifact key {key!r}: ")):
        getattr(local, method)(*args)
    assert sorted(tmp_path.rglob("*")) == sorted(
        [local.root, source]
    )  # nothing written, outside root or in it


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("../x", "'.' or '..' segment"),
        ("/abs", "absolute path"),
        ("a//b", "empty segment"),
        ("", "empty"),
        ("has space.mp4", "contains ' '"),
    ],
)
def test_bad_key_message_says_what_is_wrong_and_what_is_expected(
    local: LocalArtifactStore, key: str, problem: str
) -> None:
    with pytest.raises(ValueError) as error:
        local.exists(key)
    assert problem in str(error.value)
    assert "such as 'project/job-id/clip.mp4'" in str(error.value)


# --- settings ---------------------------------------------------------------------------------


def test_settings_default_to_a_local_folder() -> None:
    settings = StorageSettings()
    assert (settings.kind, settings.local_root, settings.presign_expiry_s) == (
        "local",
        Path("previz-artifacts"),
        3600,
    )


def test_s3_settings_without_a_bucket_uri_say_what_to_set() -> None:
    with pytest.raises(ValidationError) as error:
        StorageSettings(kind="s3")
    assert "storage kind 's3' needs `s3_uri` (e.g. s3://previz-clips/prod)" in str(error.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("s3_uri", "previz-clips/prod", "s3://bucket/prefix"),
        ("presign_expiry_s", 59, "greater than or equal to 60"),
        ("presign_expiry_s", 7 * 24 * 3600 + 1, "less than or equal to 604800"),
        ("public_base_url", "previz.studio", "expected an http:// or https:// URL"),
        ("s3_endpoint_url", "seaweedfs:8333", "expected an http:// or https:// URL"),
        ("s3_bukket", "x", "Extra inputs are not permitted"),
    ],
)
def test_settings_refuse_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        StorageSettings(**{field: value})


def test_every_settings_field_is_documented() -> None:
    assert all(field.description for field in StorageSettings.model_fields.values())


def test_make_store_builds_the_kind_the_settings_name(tmp_path: Path) -> None:
    local = make_store(StorageSettings(local_root=tmp_path / "clips", public_base_url="https://previz.test/"))
    assert isinstance(local, LocalArtifactStore) and local.root == tmp_path / "clips"
    assert local.url(CLIP_KEY).startswith(f"https://previz.test/v1/artifacts/{CLIP_KEY}?expires=")
    s3 = make_store(StorageSettings(kind="s3", s3_uri="s3://previz-clips/prod", s3_region="us-east-1"))
    assert isinstance(s3, S3ArtifactStore)
    assert s3.object_uri(CLIP_KEY) == f"s3://previz-clips/prod/{CLIP_KEY}"


# --- local folder -----------------------------------------------------------------------------


def test_local_round_trip_keeps_bytes_and_reports_size_and_sha256(
    local: LocalArtifactStore, tmp_path: Path, clip: bytes
) -> None:
    stored = local.put_file(CLIP_KEY, _write(tmp_path / "out.mp4", clip), "video/mp4")

    final = local.root / "shot-library" / "job-0001" / "clip.mp4"
    assert stored.key == CLIP_KEY
    assert stored.uri == final.as_uri()
    assert stored.size_bytes == len(clip)
    assert stored.sha256 == hashlib.sha256(clip).hexdigest()
    assert stored.content_type == "video/mp4"
    assert local.exists(CLIP_KEY) and local.size(CLIP_KEY) == len(clip)
    assert _read_all(local, CLIP_KEY) == clip
    assert local.local_path(CLIP_KEY) == final and final.read_bytes() == clip
    with local.open(CLIP_KEY) as stream:
        assert (stream.size, stream.content_type) == (len(clip), "video/mp4")
        assert stream.read(10) == clip[:10]

    local.delete(CLIP_KEY)
    assert not local.exists(CLIP_KEY) and not final.exists()
    local.delete(CLIP_KEY)  # idempotent


def test_local_put_replaces_an_existing_artifact(local: LocalArtifactStore, tmp_path: Path) -> None:
    local.put_file(POSTER_KEY, _write(tmp_path / "v1.jpg", b"old poster"), "image/jpeg")
    stored = local.put_file(POSTER_KEY, _write(tmp_path / "v2.jpg", b"new"), "image/jpeg")
    assert _read_all(local, POSTER_KEY) == b"new" and stored.size_bytes == 3
    assert sorted(p.name for p in local.path_for(POSTER_KEY).parent.iterdir()) == ["poster.jpg"]


def test_failed_local_put_leaves_the_previous_version_and_no_partial_file(
    local: LocalArtifactStore, tmp_path: Path, clip: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    local.put_file(CLIP_KEY, _write(tmp_path / "v1.mp4", b"version 1"), "video/mp4")
    folder = local.path_for(CLIP_KEY).parent

    def disk_full(fd: int) -> None:  # the copy is written, then the flush to disk fails
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StorageError, match=f"^could not store artifact {CLIP_KEY!r} in .*No space left"):
        local.put_file(CLIP_KEY, _write(tmp_path / "v2.mp4", clip), "video/mp4")
    with pytest.raises(StorageError):
        local.put_file("shot-library/job-0002/clip.mp4", tmp_path / "v2.mp4", "video/mp4")
    monkeypatch.undo()

    assert local.path_for(CLIP_KEY).read_bytes() == b"version 1"
    assert [p.name for p in folder.iterdir()] == ["clip.mp4"]  # no temp file left beside it
    assert not local.exists("shot-library/job-0002/clip.mp4")
    assert list(local.path_for("shot-library/job-0002/clip.mp4").parent.iterdir()) == []


def test_local_put_of_a_missing_source_file_names_key_and_path(
    local: LocalArtifactStore, tmp_path: Path
) -> None:
    with pytest.raises(
        FileNotFoundError, match=f"cannot store artifact {CLIP_KEY!r}: .*nope.mp4 is not a file"
    ):
        local.put_file(CLIP_KEY, tmp_path / "nope.mp4", "video/mp4")


@pytest.mark.parametrize("method", ["open", "size", "local_path"])
def test_reading_a_missing_local_artifact_raises_not_found_naming_the_key(
    local: LocalArtifactStore, method: str
) -> None:
    with pytest.raises(ArtifactNotFoundError, match=f"^no artifact {CLIP_KEY!r} in "):
        getattr(local, method)(CLIP_KEY)
    assert not local.exists(CLIP_KEY)


def test_local_urls_are_signed_links_to_the_ingress_artifact_route(tmp_path: Path) -> None:
    local = LocalArtifactStore(tmp_path)
    link = urlsplit(local.url(CLIP_KEY, expires_in_s=60))
    query = dict(parse_qsl(link.query))
    assert link.path == f"{LOCAL_URL_PREFIX}/{CLIP_KEY}" == f"/v1/artifacts/{CLIP_KEY}"
    assert local.signer.check(CLIP_KEY, int(query["expires"]), query["signature"]) is None
    assert int(query["expires"]) - time.time() <= 60
    hosted = LocalArtifactStore(tmp_path, public_base_url="https://previz.studio/")
    assert hosted.url(CLIP_KEY).startswith(f"https://previz.studio/v1/artifacts/{CLIP_KEY}?expires=")


# --- S3 (SeaweedFS) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    name = f"previz-storage-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_credentials(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's keys through boto3's environment chain, as a pod would get them; no ~/.aws."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


@pytest.fixture
def s3_settings(s3_server: S3Server, bucket: str) -> StorageSettings:
    return StorageSettings(
        kind="s3",
        s3_uri=f"s3://{bucket}/clips",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region=s3_server.region,
    )


@pytest.fixture
def s3(s3_settings: StorageSettings, s3_credentials: None) -> S3ArtifactStore:
    store = make_store(s3_settings)
    assert isinstance(store, S3ArtifactStore)
    return store


@pytest.fixture(scope="module")
def big_clip() -> bytes:
    return random.Random(12).randbytes(12 * MiB + 4321)  # over the 8 MiB multipart threshold: 2 parts


def test_s3_client_retries_in_standard_mode_five_times(s3: S3ArtifactStore) -> None:
    assert s3.client.meta.config.retries == {"mode": "standard", "total_max_attempts": S3_MAX_ATTEMPTS}
    assert S3_MAX_ATTEMPTS == 5


def test_a_configured_lut_is_read_from_s3_with_the_stores_endpoint_and_region(
    s3: S3ArtifactStore, s3_settings: StorageSettings, bucket: str
) -> None:
    cube = "LUT_3D_SIZE 2\n" + "0 0 0\n1 0 0\n0 1 0\n1 1 0\n0 0 1\n1 0 1\n0 1 1\n1 1 1\n"
    s3.client.put_object(Bucket=bucket, Key="looks/noir.cube", Body=cube.encode("utf-8"))
    assert read_source(f"s3://{bucket}/looks/noir.cube", s3_settings) == cube


def test_s3_big_clip_goes_up_in_parts_and_streams_back_equal(
    s3: S3ArtifactStore, s3_server: S3Server, bucket: str, tmp_path: Path, big_clip: bytes
) -> None:
    stored = s3.put_file(CLIP_KEY, _write(tmp_path / "clip.mp4", big_clip), "video/mp4")

    sha256 = hashlib.sha256(big_clip).hexdigest()
    assert stored.model_dump() == {
        "uri": f"s3://{bucket}/clips/{CLIP_KEY}",
        "key": CLIP_KEY,
        "size_bytes": len(big_clip),
        "sha256": sha256,
        "content_type": "video/mp4",
    }
    head = s3_server.client().head_object(Bucket=bucket, Key=f"clips/{CLIP_KEY}")
    assert head["ETag"].strip('"').endswith("-2")  # multipart upload, two 8 MiB parts
    assert head["Metadata"] == {"sha256": sha256}  # x-amz-meta-sha256
    assert head["ContentType"] == "video/mp4"
    assert s3.exists(CLIP_KEY) and s3.size(CLIP_KEY) == len(big_clip)
    assert s3.local_path(CLIP_KEY) is None
    with s3.open(CLIP_KEY) as stream:
        assert (stream.size, stream.content_type) == (len(big_clip), "video/mp4")
    assert _read_all(s3, CLIP_KEY) == big_clip


def test_s3_poster_round_trip_in_one_request(
    s3: S3ArtifactStore, s3_server: S3Server, bucket: str, tmp_path: Path
) -> None:
    poster = random.Random(3).randbytes(40_000)
    stored = s3.put_file(POSTER_KEY, _write(tmp_path / "poster.jpg", poster), "image/jpeg")
    assert (stored.size_bytes, stored.sha256) == (len(poster), hashlib.sha256(poster).hexdigest())
    head = s3_server.client().head_object(Bucket=bucket, Key=f"clips/{POSTER_KEY}")
    assert "-" not in head["ETag"] and head["ContentType"] == "image/jpeg"
    assert _read_all(s3, POSTER_KEY) == poster


def test_presigned_url_downloads_the_exact_bytes_with_plain_http(
    s3: S3ArtifactStore, s3_server: S3Server, tmp_path: Path, big_clip: bytes
) -> None:
    s3.put_file(CLIP_KEY, _write(tmp_path / "clip.mp4", big_clip), "video/mp4")
    url = s3.url(CLIP_KEY)
    assert url.startswith(f"{s3_server.endpoint_url}/") and "X-Amz-Expires=3600" in url
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"] == "video/mp4"
    assert response.content == big_clip


def test_presigned_url_expiry_follows_settings(s3_settings: StorageSettings, s3_credentials: None) -> None:
    store = S3ArtifactStore(s3_settings.model_copy(update={"presign_expiry_s": 120}))
    assert "X-Amz-Expires=120" in store.url(POSTER_KEY)
    assert "X-Amz-Expires=600" in store.url(POSTER_KEY, expires_in_s=600)
    with pytest.raises(ValueError, match="expires_in_s must be between 1 and 604800"):
        store.url(POSTER_KEY, expires_in_s=0)


def test_expired_or_tampered_presigned_urls_are_refused(s3: S3ArtifactStore, tmp_path: Path) -> None:
    s3.put_file(POSTER_KEY, _write(tmp_path / "poster.jpg", b"\xff\xd8 poster"), "image/jpeg")
    assert httpx.get(s3.url(POSTER_KEY, expires_in_s=60)).status_code == 200
    # A URL signed two minutes ago for 60 s: expired, whatever the machine's load (no sleeping race).
    signed_earlier = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=120)
    with mock.patch("botocore.auth.get_current_datetime", return_value=signed_earlier):
        expired_url = s3.url(POSTER_KEY, expires_in_s=60)
    expired = httpx.get(expired_url)
    assert expired.status_code == 403 and "expired" in expired.text

    url = s3.url(POSTER_KEY)
    signature = url.rpartition("X-Amz-Signature=")[2]
    forged = url.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
    assert httpx.get(forged).status_code == 403
    assert httpx.get(url.partition("?")[0]).status_code == 403  # unsigned


def test_s3_delete_is_idempotent_and_then_nothing_is_there(s3: S3ArtifactStore, tmp_path: Path) -> None:
    key = "shot-library/job-0003/poster.jpg"
    s3.put_file(key, _write(tmp_path / "poster.jpg", b"poster"), "image/jpeg")
    s3.delete(key)
    assert not s3.exists(key)
    s3.delete(key)
    with pytest.raises(ArtifactNotFoundError, match=f"^no artifact {key!r} at s3://"):
        s3.size(key)
    with pytest.raises(ArtifactNotFoundError, match=f"^no artifact {key!r} at s3://"):
        s3.open(key)


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", ""])
def test_s3_store_rejects_bad_keys_without_a_request(s3: S3ArtifactStore, key: str) -> None:
    sent: list[object] = []
    s3.client.meta.events.register("before-send.s3", lambda **kwargs: sent.append(kwargs))
    for call in (s3.exists, s3.open, s3.url, s3.delete):
        with pytest.raises(ValueError, match="^invalid artifact key"):
            call(key)
    assert sent == []


def test_access_denied_surfaces_as_storage_error_naming_key_and_cause(
    s3_settings: StorageSettings, s3_credentials: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = S3ArtifactStore(s3_settings)
    with pytest.raises(StorageError, match=f"^S3 upload of artifact {POSTER_KEY!r} .*SignatureDoesNotMatch"):
        store.put_file(POSTER_KEY, _write(tmp_path / "poster.jpg", b"poster"), "image/jpeg")
    with pytest.raises(StorageError, match=f"^S3 HEAD of artifact {POSTER_KEY!r} .*403") as error:
        store.exists(POSTER_KEY)
    assert not isinstance(error.value, ArtifactNotFoundError)  # refused is not "not there"


def _unused_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_is_retried_then_raised_naming_the_key(
    s3_credentials: None, tmp_path: Path
) -> None:
    settings = StorageSettings(
        kind="s3",
        s3_uri="s3://previz-clips/prod",
        s3_endpoint_url=f"http://127.0.0.1:{_unused_loopback_port()}",
        s3_region="us-east-1",
    )
    client = make_s3_client(
        settings.s3_endpoint_url, settings.s3_region, max_attempts=2, connect_timeout_s=0.5
    )
    attempts: list[str] = []
    client.meta.events.register("before-send.s3", lambda **kwargs: attempts.append(kwargs["request"].url))
    store = S3ArtifactStore(settings, client=client)

    started = time.monotonic()
    with pytest.raises(StorageError, match=f"^S3 upload of artifact {CLIP_KEY!r} .*Could not connect"):
        store.put_file(CLIP_KEY, _write(tmp_path / "clip.mp4", b"mp4"), "video/mp4")
    assert len(attempts) == 2  # retried, then given up
    with pytest.raises(StorageError, match=f"^S3 HEAD of artifact {CLIP_KEY!r} .*Could not connect"):
        store.exists(CLIP_KEY)
    assert time.monotonic() - started < 10


# --- listing (what deletes and the orphan sweep walk) -----------------------------------------


def _list_case(store: ArtifactStore, tmp_path: Path) -> None:
    source = _write(tmp_path / "bytes", b"0123456789")
    job = JobArtifacts("dune", "vid_0001")
    for key in (
        job.clip(1),
        job.poster(1),
        job.checkpoint,
        "dune/vid_0002/clip-a1.mp4",
        "noir/vid_0003/x.mp4",
    ):
        store.put_file(key, source, "video/mp4")
    before = datetime.datetime.now(datetime.UTC)
    listed = {item.key: item for item in store.list(job.folder)}
    assert set(listed) == {job.clip(1), job.poster(1), job.checkpoint}
    assert all(item.size_bytes == 10 and item.modified_at <= before for item in listed.values())
    assert {item.key for item in store.list("dune/")} == set(listed) | {"dune/vid_0002/clip-a1.mp4"}
    assert len(list(store.list())) == 5 and list(store.list("nothing/")) == []
    with pytest.raises(ValueError, match="invalid artifact prefix 'dune'"):
        list(store.list("dune"))


def test_local_listing_names_every_artifact_under_a_folder_and_no_upload_in_progress(
    local: LocalArtifactStore, tmp_path: Path
) -> None:
    _list_case(local, tmp_path)
    (local.root / "dune" / "vid_0001" / ".x1.tmp").write_bytes(b"half")  # an upload in progress
    assert len(list(local.list("dune/vid_0001/"))) == 3


def test_s3_listing_names_every_artifact_under_a_folder(
    s3_server: S3Server, s3_credentials: None, tmp_path: Path
) -> None:
    name = f"previz-list-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    s3_server.client().put_object(Bucket=name, Key="elsewhere/dune/vid_0001/x.mp4", Body=b"not ours")
    settings = StorageSettings(
        kind="s3",
        s3_uri=f"s3://{name}/clips",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region=s3_server.region,
    )
    _list_case(make_store(settings), tmp_path)
