"""Per-project retention: finished videos older than their project's `retention_days` are deleted.

The Scheduler runs one RetentionSweeper. Each pass looks at every project with a retention and deletes
what expired, oldest first, as `DELETE /v1/videos/{id}` does: the clip and poster leave the artifact store
first, then the record is marked deleted (event `deleted`, reason `expired`), so a failed store leaves the
video whole and the next pass tries again. A video's `expires_at` (its finish time plus the retention)
says when; changing a project's retention moves every expiry of that project at once.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from serve.jobs.models import utcnow
from serve.jobs.store import JobStore
from serve.storage import ArtifactStore, StorageError

logger = logging.getLogger(__name__)

SWEEP_BATCH = 100  # most videos one pass deletes per project; a backlog goes on at the next pass


class RetentionSweeper:
    """Deletes the finished videos whose project's retention has run out."""

    def __init__(self, store: JobStore, artifacts: ArtifactStore, interval_s: float = 300.0) -> None:
        self.store = store
        self.artifacts = artifacts
        self.interval_s = interval_s

    async def run_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sweep_once)
            except Exception:  # e.g. the store is unreachable: the next pass tries again
                logger.warning("retention pass failed; retrying", exc_info=True)
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
                    for key in (job.artifact_uri, job.poster_uri):
                        if key is not None:
                            self.artifacts.delete(key)
                except StorageError:
                    logger.warning("video %s expired but its artifacts could not be deleted", job.id)
                    continue
                if self.store.mark_deleted(job.id, project=project.name, reason="expired") is not None:
                    deleted += 1
        if deleted:
            logger.info("retention deleted %d expired videos", deleted)
        return deleted
