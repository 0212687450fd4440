"""Deleting a video, a storyboard or a cut with every copy the studio serves from them.

A video's copies: every file under its folder (each attempt's clip and poster, its boundary checkpoint),
and the cut of its board that holds it as a take (the cut's mp4 and per-shot clips, which the signed links
and the timeline packages serve). The order keeps a failing store from losing track of anything:

1. the video's own files (a StorageError here changes nothing in the store: the caller answers 503),
2. the record (`mark_deleted`): from now on the video is 404,
3. the cut that holds the take is marked stale (compare-and-set on its id, so a render that lands
   meanwhile is not touched: `JobStore.save_cut` refuses a cut of a deleted take) and its files deleted;
   a store failing here leaves files that no live cut owns, which the orphan sweep
   (serve.jobs.retention.OrphanSweeper) removes.

A running video is cancelled by the caller first (the Scheduler's run removes what it stored when it
stops: serve.scheduling.scheduler). The Ingress's DELETE routes and the retention sweeper both use this.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from serve.jobs.models import CancelResult, JobRecord
from serve.jobs.store import MAX_PAGE, JobStore
from serve.jobs.storyboard import CutRecord, StoryboardRecord
from serve.storage import ArtifactStore, JobArtifacts, StorageError

logger = logging.getLogger(__name__)


def delete_video(
    store: JobStore,
    artifacts: ArtifactStore,
    job: JobRecord,
    *,
    reason: Literal["deleted", "expired"] = "deleted",
) -> JobRecord | None:
    """Delete the finished `job` everywhere (see the module docstring); the job as it was, or None when
    it was deleted meanwhile. StorageError, with the record untouched, when its files cannot be deleted."""
    delete_keys(artifacts, [item.key for item in artifacts.list(JobArtifacts(job.project, job.id).folder)])
    deleted = store.mark_deleted(job.id, project=job.project, reason=reason)
    if deleted is not None and deleted.storyboard_id is not None:
        stale_cut_holding(store, artifacts, deleted.storyboard_id, deleted.id)
    return deleted


def stale_cut_holding(store: JobStore, artifacts: ArtifactStore, storyboard_id: str, video_id: str) -> None:
    """Mark the board's cut stale and delete its files when `video_id` is one of its takes."""
    board = store.get_storyboard(storyboard_id)
    if board is None or board.cut is None:
        return
    cut = board.cut
    if cut.stale is not None or video_id not in {clip.video_id for clip in cut.clips}:
        return
    stale = cut.model_copy(update={"stale": f"its take {video_id} was deleted"})
    if store.replace_cut(board.id, cut.id, stale):
        delete_keys_or_leave_to_sweep(artifacts, cut.keys, f"stale cut {cut.id} of {board.id}")


def delete_cut(store: JobStore, artifacts: ArtifactStore, board: StoryboardRecord) -> CutRecord | None:
    """Delete the board's cut: its files, then the record. The cut as it was, or None when the board has
    no cut (any more). StorageError, with the cut still recorded, when its files cannot be deleted."""
    if board.cut is None:
        return None
    cut = board.cut
    delete_keys(artifacts, cut.keys)
    return cut if store.replace_cut(board.id, cut.id, None) else None


@dataclass
class BoardDeleted:
    """What deleting a board did."""

    board: StoryboardRecord
    deleted_videos: builtins.list[str] = field(default_factory=list)  # video ids, creation order
    cancelled: builtins.list[str] = field(default_factory=list)  # of those, the ones that were running


def delete_storyboard(
    store: JobStore, artifacts: ArtifactStore, board: StoryboardRecord, *, delete_videos: bool
) -> BoardDeleted | None:
    """Delete the board and its cut; with `delete_videos`, its videos too (queued and running ones are
    cancelled, then deleted: the caller stops their runs), else they stay as videos of no board. None when
    the board was deleted meanwhile. StorageError when the store fails: what was deleted so far stays
    deleted, the board stays, and deleting it again goes on."""
    outcome = BoardDeleted(board)
    if delete_videos:
        for job in videos_of(store, board):
            if not job.is_finished:
                if store.cancel(job.id, project=board.project) == CancelResult.CANCELLED:
                    outcome.cancelled.append(job.id)
                job = store.get(job.id, project=board.project)
                if job is None:
                    continue
            if delete_video(store, artifacts, job) is not None:
                outcome.deleted_videos.append(job.id)
    current = store.get_storyboard(board.id)
    if current is not None and current.cut is not None:
        delete_keys(artifacts, current.cut.keys)
    return outcome if store.delete_storyboard(board.id, project=board.project) is not None else None


def videos_of(store: JobStore, board: StoryboardRecord) -> builtins.list[JobRecord]:
    """Every video of the board, in creation order (page after page)."""
    found: builtins.list[JobRecord] = []
    while True:
        after = found[-1].id if found else None
        page = store.list(
            project=board.project, storyboard_id=board.id, order="asc", after=after, limit=MAX_PAGE
        )
        found += page
        if len(page) < MAX_PAGE:
            return found


def delete_keys(artifacts: ArtifactStore, keys: Iterable[str]) -> None:
    """Delete every key (a missing one is fine); StorageError on the first the store fails."""
    for key in keys:
        artifacts.delete(key)


def delete_keys_or_leave_to_sweep(artifacts: ArtifactStore, keys: Iterable[str], what: str) -> None:
    """Delete keys that nothing owns any more; a failing store leaves them to the orphan sweep."""
    try:
        delete_keys(artifacts, keys)
    except StorageError:
        logger.warning("the files of %s could not be deleted; the orphan sweep will", what, exc_info=True)
