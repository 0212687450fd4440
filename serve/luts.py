"""Registering a project's .cube LUT looks: checked (pipeline.lut), stored in the artifact store under a
name that carries its sha256, and recorded in the job store. The admin API's upload and the `luts:` of
the app config (a path or s3:// URI, registered when the Ingress starts) both come here."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from pipeline.grade import LOOK_PATTERN, LOOKS
from pipeline.lut import Interpolation, check_cube
from pipeline.s3 import make_s3_client
from serve.config import LutSource
from serve.jobs import JobStore
from serve.jobs.luts import LutRecord
from serve.storage import ArtifactStore, StorageSettings, artifact_key

logger = logging.getLogger("ray.serve")
LUT_FOLDER = "luts"  # <project>/luts/<name>-<sha12>.cube


class ReservedLookName(ValueError):
    """`none` and `film` are built-in looks."""


def register_lut(
    store: JobStore,
    artifacts: ArtifactStore,
    project: str,
    name: str,
    text: str,
    interpolation: Interpolation = "tetrahedral",
) -> tuple[LutRecord, bool]:
    """Check `text` (CubeError names the bad line), store it and record it as `project`'s look `name`:
    `(record, created)`. ReservedLookName for `none` and `film`."""
    if name in LOOKS:
        raise ReservedLookName(f"`{name}` is a built-in look; give the LUT another name")
    if not re.match(LOOK_PATTERN, name):
        raise ValueError(f"a look's name must match {LOOK_PATTERN} but is {name!r}")
    size = check_cube(text)
    data = text.encode("utf-8")
    sha256 = hashlib.sha256(data).hexdigest()
    key = artifact_key(project, LUT_FOLDER, f"{name}-{sha256[:12]}.cube")
    artifacts.put_bytes(key, data, "text/plain")
    return store.put_lut(project, name, key=key, sha256=sha256, size=size, interpolation=interpolation)


def read_source(source: str, storage: StorageSettings) -> str:
    """The text of a configured LUT: a local path, or `s3://bucket/key` read with the store's S3 settings."""
    if source.startswith("s3://"):
        bucket, _, key = source.removeprefix("s3://").partition("/")
        client = make_s3_client(storage.s3_endpoint_url, storage.s3_region)
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        return body.read().decode("utf-8")
    return Path(source).read_text(encoding="utf-8")


def register_configured(
    store: JobStore, artifacts: ArtifactStore, sources: list[LutSource], storage: StorageSettings
) -> None:
    """Register every configured LUT whose content is not registered under its name already."""
    for lut in sources:
        text = read_source(lut.source, storage)
        current = store.get_lut(lut.project, lut.name)
        sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if current is not None and (current.sha256, current.interpolation) == (sha256, lut.interpolation):
            continue
        if store.get_project(lut.project) is None:
            store.create_project(lut.project)
        register_lut(store, artifacts, lut.project, lut.name, text, lut.interpolation)
        logger.info("registered LUT look %r of project %r from %s", lut.name, lut.project, lut.source)
