"""Per-project retention, and the sweep of files nothing owns.

RetentionSweeper: finished videos older than their project's `retention_days` are deleted. The Scheduler
runs one. Each pass looks at every project with a retention and deletes what expired, oldest first, as
`DELETE /v1/videos/{id}` does (serve.jobs.deletion.delete_video): the video's files leave the artifact
store first, then the record is marked deleted (event `deleted`, reason `expired`), so a failed store
leaves the video whole and the next pass tries again; a cut holding the take goes stale with it. A video's
`expires_at` (its finish time plus the retention) says when; changing a project's retention moves every
expiry of that project at once.

OrphanSweeper: what a crash (or a store that failed half way) left behind. It walks the files of the key
layout, `<project>/<vid_…|sb_…>/<name>`, and deletes those no live video or cut owns: a deleted or unknown
video's files, a finished video's files other than its recorded clip, poster and checkpoint (a cancelled
run's upload, an older attempt's clip), a board's files other than its current cut's. A video not finished
yet owns every file in its folder (its run may be writing them), and any file younger than `grace` is left
alone (a cut job stores its clips before it records the cut), so the sweep never races in-flight work.
Superseded cut files (a replaced cut whose delete failed, a lost or stopped attempt of a cut job) are such
orphans. LUT files under `<project>/luts/` are orphans once no registered look names them and no unfinished
job of the project was admitted with them (an unregistered or replaced look's old version). Other keys
are never touched. A pass deletes at most `batch` files.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta

from serve.jobs.deletion import delete_video
from serve.jobs.models import JobRecord, utcnow
from serve.jobs.store import JobStore
from serve.jobs.storyboard import StoryboardRecord
from serve.luts import LUT_FOLDER
from serve.storage import ArtifactStore, ListedArtifact, StorageError, key_owner

logger = logging.getLogger(__name__)

SWEEP_BATCH = 100  # most videos one pass deletes per project; a backlog goes on at the next pass
ORPHAN_GRACE = timedelta(hours=24)  # files younger than this are never orphans: far above any render
ORPHAN_BATCH = 1000  # most orphan files one pass deletes; the rest go at the next pass
ORPHAN_INTERVAL_S = 3600.0  # an orphan pass lists the whole store: hourly, not at every retention pass
OWNER_PREFIXES = ("vid_", "sb_")  # owner ids of the key layout: videos and storyboards
_LOOKUP_CHUNK = 500  # files whose owners one store query looks up


class RetentionSweeper:
    """Deletes the finished videos whose project's retention has run out."""

    def __init__(
        self,
        store: JobStore,
        artifacts: ArtifactStore,
        interval_s: float = 300.0,
        orphans: OrphanSweeper | None = None,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.interval_s = interval_s
        self.orphans = orphans if orphans is not None else OrphanSweeper(store, artifacts)

    async def run_forever(self) -> None:
        last_orphan_pass = float("-inf")
        while True:
            try:
                await asyncio.to_thread(self.sweep_once)
            except Exception:  # e.g. the store is unreachable: the next pass tries again
                logger.warning("retention pass failed; retrying", exc_info=True)
            if time.monotonic() - last_orphan_pass >= self.orphans.interval_s:
                last_orphan_pass = time.monotonic()
                try:
                    await asyncio.to_thread(self.orphans.sweep_once)
                except Exception:
                    logger.warning("orphan sweep failed; retrying at the next one", exc_info=True)
            await asyncio.sleep(self.interval_s)

    def sweep_once(self, now: datetime | None = None) -> int:
        """One pass: delete what expired by `now`. Returns how many videos were deleted."""
        now = now or utcnow()
        deleted = 0
        for project in self.store.list_projects():
            days = project.settings.retention_days
            if days is None:
                continue
            for job in self.store.expired(project.name, now - timedelta(days=days), SWEEP_BATCH):
                try:
                    if delete_video(self.store, self.artifacts, job, reason="expired") is not None:
                        deleted += 1
                except StorageError:
                    logger.warning("video %s expired but its artifacts could not be deleted", job.id)
        if deleted:
            logger.info("retention deleted %d expired videos", deleted)
        return deleted


class OrphanSweeper:
    """Deletes the files of the key layout that no live video or cut owns (see the module docstring)."""

    def __init__(
        self,
        store: JobStore,
        artifacts: ArtifactStore,
        *,
        grace: timedelta = ORPHAN_GRACE,
        batch: int = ORPHAN_BATCH,
        interval_s: float = ORPHAN_INTERVAL_S,
    ) -> None:
        if batch < 1:
            raise ValueError(f"`batch` must be >= 1 but is {batch}.")
        self.store = store
        self.artifacts = artifacts
        self.grace = grace
        self.batch = batch
        self.interval_s = interval_s

    def sweep_once(self, now: datetime | None = None) -> int:
        """One pass over the store: delete up to `batch` orphans older than the grace period at `now`.
        Returns how many files were deleted."""
        cutoff = (now or utcnow()) - self.grace
        deleted = 0
        chunk: list[ListedArtifact] = []
        luts: dict[str, list[str]] = {}  # project -> its LUT files old enough to go
        for item in self.artifacts.list():
            owner = key_owner(item.key)
            if owner is None or item.modified_at > cutoff:
                continue
            if owner[1] == LUT_FOLDER:
                luts.setdefault(owner[0], []).append(item.key)
                continue
            if not owner[1].startswith(OWNER_PREFIXES):
                continue
            chunk.append(item)
            if len(chunk) == _LOOKUP_CHUNK:
                deleted += self._delete_orphans(chunk, self.batch - deleted)
                chunk = []
                if deleted >= self.batch:
                    break
        if chunk and deleted < self.batch:
            deleted += self._delete_orphans(chunk, self.batch - deleted)
        for project, keys in luts.items():
            if deleted >= self.batch:
                break
            in_use = self.store.lut_keys_in_use(project)
            deleted += self._delete_keys([key for key in keys if key not in in_use], self.batch - deleted)
        if deleted:
            logger.info("orphan sweep deleted %d files no video or cut owns", deleted)
        return deleted

    def _delete_orphans(self, items: list[ListedArtifact], most: int) -> int:
        jobs, boards = self.store.artifact_owners(key_owner(item.key)[1] for item in items)
        return self._delete_keys([item.key for item in items if is_orphan(item.key, jobs, boards)], most)

    def _delete_keys(self, keys: list[str], most: int) -> int:
        deleted = 0
        for key in keys[:most]:
            try:
                self.artifacts.delete(key)
            except StorageError:
                logger.warning("orphan %s could not be deleted; the next pass tries again", key)
                continue
            deleted += 1
        return deleted


def is_orphan(key: str, jobs: dict[str, JobRecord], boards: dict[str, StoryboardRecord]) -> bool:
    """Whether no live video or cut owns `key` (`<project>/<owner id>/<name>`), given its owner's record."""
    project, owner_id = key_owner(key)
    job = jobs.get(owner_id)
    if owner_id.startswith("vid_"):
        if job is None or job.project != project or job.deleted_at is not None:
            return True
        if not job.is_finished:
            return False  # its run may be writing any file of its folder
        return key not in (job.artifact_uri, job.poster_uri, job.checkpoint_uri)
    board = boards.get(owner_id)
    if board is None or board.project != project or board.cut is None:
        return True
    cut = board.cut
    return cut.stale is not None or key not in cut.keys
