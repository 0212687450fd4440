"""Review of takes: notes (text, an optional frame, who wrote them and when) and one review status per take.

A take's status is `pending` until someone sets another; it is stored on the job's row (`review`,
`review_by`, `review_at`; NULL means pending, so rows of earlier versions read as pending), each change is
logged as a `review` event of the job, and a change queues a `video.review_changed` webhook in the same
transaction, when the take asked for webhooks. Notes live in `take_notes` and go with their take's row.

Who may read or write a take's review is the caller's business (the HTTP layer checks the project); every
method here takes the take's project, so a take of another project reads as absent.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, get_args

from sqlalchemy import Connection, insert, select, update

from serve.jobs.database import Database
from serve.jobs.models import JobRecord, new_job_id, utcnow
from serve.jobs.outbox import Outbox
from serve.jobs.rows import job_record, log_event
from serve.jobs.schema import jobs, take_notes

ReviewStatus = Literal["pending", "approved", "rejected", "needs-changes"]
REVIEW_STATUSES: tuple[ReviewStatus, ...] = get_args(ReviewStatus)


def review_status(job: JobRecord) -> ReviewStatus:
    """The take's review status (`pending` when none was set)."""
    return job.review or "pending"  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class TakeNote:
    """One note on a take, as stored."""

    id: str  # "note_" + 24 hex; sorts by creation time
    video_id: str
    author: str  # the API key's name (its id when it has none)
    key_id: str  # the key that wrote it
    text: str
    frame: int | None  # at the take's own delivered rate; None: the take as a whole
    created_at: datetime


def new_note_id() -> str:
    """`note_` + the same time-ordered 24 hex as job ids."""
    return "note_" + new_job_id().removeprefix("vid_")


class ReviewRepository:
    """Notes and review statuses of takes."""

    def __init__(self, db: Database, outbox: Outbox) -> None:
        self._db = db
        self._outbox = outbox

    def add_note(
        self, video_id: str, *, project: str, author: str, key_id: str, text: str, frame: int | None
    ) -> TakeNote | None:
        """Store a note on the project's take `video_id`; None when there is no such (undeleted) take."""
        note = TakeNote(new_note_id(), video_id, author, key_id, text, frame, utcnow())
        with self._db.write() as conn:
            if _live_job(conn, video_id, project) is None:
                return None
            conn.execute(
                insert(take_notes).values(
                    id=note.id,
                    job_id=video_id,
                    author=author,
                    key_id=key_id,
                    text=text,
                    frame=frame,
                    created_at=note.created_at,
                )
            )
        return note

    def notes(self, video_ids: builtins.list[str]) -> dict[str, builtins.list[TakeNote]]:
        """The notes of each of `video_ids`, oldest first (`video_id -> notes`; takes without any absent)."""
        if not video_ids:
            return {}
        query = select(take_notes).where(take_notes.c.job_id.in_(video_ids)).order_by(take_notes.c.id)
        found: dict[str, builtins.list[TakeNote]] = {}
        with self._db.read() as conn:
            for row in conn.execute(query):
                found.setdefault(row.job_id, []).append(
                    TakeNote(row.id, row.job_id, row.author, row.key_id, row.text, row.frame, row.created_at)
                )
        return found

    def set_review(
        self, video_id: str, status: ReviewStatus, *, project: str, author: str
    ) -> tuple[JobRecord, bool] | None:
        """Set the project's take's review status; `(take, changed)`, or None when there is no such take.
        A change is logged (`review` event: from, to, by) and queues a `video.review_changed` webhook in the
        same transaction; setting the status it has already changes nothing."""
        if status not in REVIEW_STATUSES:
            raise ValueError(f"`status` must be one of {', '.join(REVIEW_STATUSES)} but is {status!r}.")
        now = utcnow()
        with self._db.write() as conn:
            current = _live_job(conn, video_id, project, lock=True)
            if current is None:
                return None
            before = review_status(current)
            if before == status:
                return current, False
            stored = None if status == "pending" else status
            row = conn.execute(
                update(jobs)
                .where(jobs.c.id == video_id)
                .values(review=stored, review_by=author, review_at=now)
                .returning(jobs)
            ).one()
            job = job_record(row)
            log_event(conn, video_id, "review", {"from": before, "to": status, "by": author}, now)
            self._outbox.enqueue(conn, job, now, "video.review_changed")
        return job, True


def _live_job(conn: Connection, video_id: str, project: str, *, lock: bool = False) -> JobRecord | None:
    query = select(jobs).where(jobs.c.id == video_id, jobs.c.project == project, jobs.c.deleted_at.is_(None))
    row = conn.execute(query.with_for_update() if lock else query).one_or_none()
    return None if row is None else job_record(row)
