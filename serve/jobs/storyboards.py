"""The job store's storyboards: a board row and its videos (jobs with its `storyboard_id`), created in one
transaction; the editor's choices and the board's last cut, stored on the row."""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, insert, select, update

from serve.jobs.bounds import check_room
from serve.jobs.cuts import cancel_unfinished_cuts
from serve.jobs.database import Database
from serve.jobs.models import PRIORITIES, Priority, utcnow
from serve.jobs.request import JobRequest
from serve.jobs.rows import check_limit, create_once, log_event, new_job_row
from serve.jobs.schema import jobs, storyboards
from serve.jobs.storyboard import CutRecord, StoryboardEdit, StoryboardRecord, StoryboardRequest
from serve.jobs.takes import next_takes, shot_of


class StoryboardRepository:
    """Storyboards: create (with their videos), read, edit, cut, delete."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(
        self,
        storyboard_id: str,
        project: str,
        title: str | None,
        request: StoryboardRequest,
        videos: builtins.list[tuple[Priority, JobRequest, dict[str, Any]]],
        *,
        idempotency_key: str | None = None,
        max_queued: int | None = None,
        max_queued_per_project: int | None = None,
        gpu_seconds_per_day: float | None = None,
        job_ids: builtins.list[str | None] | None = None,
    ) -> tuple[StoryboardRecord, bool]:
        """Store a storyboard and queue all its `videos` (priority, request, labels) in ONE
        transaction, as jobs of `project` with this `storyboard_id`; return `(storyboard, True)`.
        `job_ids`: per video, an id drawn beforehand (its keyframes are stored under it) or None.

        All or nothing: when the jobs would push a queue past `max_queued` / `max_queued_per_project`,
        raise QueueFull and write nothing. An `idempotency_key` already used for a storyboard of this
        project returns `(existing storyboard, False)` and writes nothing.
        """
        if not videos:
            raise ValueError("A storyboard needs at least one video.")
        for priority, *_ in videos:
            if priority not in PRIORITIES:
                raise ValueError(f"`priority` must be 'interactive' or 'batch' but is {priority!r}.")
        now = utcnow()
        board = {
            "id": storyboard_id,
            "project": project,
            "title": title,
            "request": request.to_stored(),
            "num_jobs": len(videos),
            "idempotency_key": idempotency_key,
            "created_at": now,
        }

        def write(conn: Connection) -> StoryboardRecord:
            bounds = (max_queued, max_queued_per_project, gpu_seconds_per_day)
            check_room(self._db, conn, project, len(videos), now, *bounds)
            record = StoryboardRecord.from_row(
                conn.execute(insert(storyboards).values(board).returning(storyboards)).one()._asdict()
            )
            takes = next_takes(conn, storyboard_id, [shot_of(job_request) for _, job_request, _ in videos])
            ids = job_ids if job_ids is not None else [None] * len(videos)
            for (priority, job_request, labels), take, job_id in zip(videos, takes, ids, strict=True):
                row = new_job_row(project, priority, job_request, labels, now, job_id)
                conn.execute(insert(jobs).values({**row, "storyboard_id": storyboard_id, "take": take}))
                log_event(conn, row["id"], "created", {"priority": priority, "bucket": row["bucket"]}, now)
            return record

        return create_once(self._db, project, idempotency_key, _by_idempotency_key, write)

    def list(
        self, project: str, *, after: str | None = None, limit: int = 50
    ) -> builtins.list[StoryboardRecord]:
        """One page of the project's storyboards, newest first; `after`: the last id of the previous page."""
        check_limit(limit)
        query = select(storyboards).where(storyboards.c.project == project)
        if after is not None:
            query = query.where(storyboards.c.id < after)
        query = query.order_by(storyboards.c.id.desc()).limit(limit)
        with self._db.read() as conn:
            return [StoryboardRecord.from_row(row._asdict()) for row in conn.execute(query)]

    def get(self, storyboard_id: str) -> StoryboardRecord | None:
        with self._db.read() as conn:
            row = conn.execute(select(storyboards).where(storyboards.c.id == storyboard_id)).one_or_none()
        return None if row is None else StoryboardRecord.from_row(row._asdict())

    def update(
        self, storyboard_id: str, *, edit: StoryboardEdit | None = None, cut: CutRecord | None = None
    ) -> StoryboardRecord | None:
        """Store the board's edit (selected takes, shot order) and/or its latest cut; None if no board."""
        changes = {
            name: value.model_dump(mode="json")
            for name, value in (("edit", edit), ("cut", cut))
            if value is not None
        }
        with self._db.write() as conn:
            if changes:
                conn.execute(update(storyboards).where(storyboards.c.id == storyboard_id).values(changes))
            row = conn.execute(select(storyboards).where(storyboards.c.id == storyboard_id)).one_or_none()
        return None if row is None else StoryboardRecord.from_row(row._asdict())

    def save_cut(self, storyboard_id: str, cut: CutRecord, video_ids: Iterable[str]) -> bool:
        """Store a freshly rendered cut of the takes `video_ids` as the board's cut, unless one of those
        takes was deleted meanwhile (or the board was): then False and nothing changes. The takes' rows are
        share-locked, so a delete of one commits either before (this refuses) or after (it finds the cut)."""
        ids = sorted(set(video_ids))
        with self._db.write() as conn:
            alive = conn.execute(
                select(jobs.c.id)
                .where(jobs.c.id.in_(ids), jobs.c.deleted_at.is_(None))
                .with_for_update(read=True)
            ).all()
            if len(alive) != len(ids):
                return False
            done = conn.execute(
                update(storyboards)
                .where(storyboards.c.id == storyboard_id)
                .values(cut=cut.model_dump(mode="json"))
            ).rowcount
        return bool(done)

    def replace_cut(self, storyboard_id: str, cut_id: str, cut: CutRecord | None) -> bool:
        """Replace the board's cut `cut_id` by `cut` (None: the board has no cut any more): marking it
        stale, or deleting it. False, nothing changed, when the board's cut is not `cut_id` any more."""
        with self._db.write() as conn:
            current = conn.execute(
                select(storyboards.c.cut).where(storyboards.c.id == storyboard_id).with_for_update()
            ).one_or_none()
            if current is None or current.cut is None or current.cut.get("id") != cut_id:
                return False
            stored = None if cut is None else cut.model_dump(mode="json")
            conn.execute(update(storyboards).where(storyboards.c.id == storyboard_id).values(cut=stored))
        return True

    def delete(self, storyboard_id: str, *, project: str) -> StoryboardRecord | None:
        """Remove the board of `project` (its cut's files are the caller's to remove); the videos it still
        has become videos of no board, and a cut of it queued or rendering is cancelled (its run stops at
        its next progress write and deletes what it stored). The board as it was, or None when there is no
        such board."""
        with self._db.write() as conn:
            row = conn.execute(
                select(storyboards)
                .where(storyboards.c.id == storyboard_id, storyboards.c.project == project)
                .with_for_update()
            ).one_or_none()
            if row is None:
                return None
            conn.execute(update(jobs).where(jobs.c.storyboard_id == storyboard_id).values(storyboard_id=None))
            cancel_unfinished_cuts(conn, storyboard_id, now=utcnow())
            conn.execute(storyboards.delete().where(storyboards.c.id == storyboard_id))
        return StoryboardRecord.from_row(row._asdict())


def _by_idempotency_key(conn: Connection, project: str, key: str) -> StoryboardRecord | None:
    query = select(storyboards).where(storyboards.c.project == project, storyboards.c.idempotency_key == key)
    row = conn.execute(query).one_or_none()
    return None if row is None else StoryboardRecord.from_row(row._asdict())
