"""A storyboard's cut as a durable job: the `cut_jobs` rows, their record and their fenced transitions.

    cut = store.create_cut(cut_id, board.id, board.project, request)     # queued
    cut = store.claim_cut(cut.id, "scheduler-0")                         # running, attempt 1
    store.advance_cut(cut.id, cut.attempt, progress=0.5, eta_at=...)     # False: stop, record nothing
    store.succeed_cut(cut.id, cut.attempt, record)                       # the board's cut, same transaction

The takes are chosen when the cut is asked for (what the editor saw), so every attempt renders the same
cut; its files' keys name the cut and the attempt (serve.storage.CutArtifacts), so the files of a lost or
stale attempt are deleted without touching the attempt that runs now, and one cut remains. Like jobs,
every update is fenced by `attempt` and by the status: a run that was cancelled, or requeued and claimed
again, can change nothing. A board has at most one unfinished cut at a time.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection, case, func, insert, select, update

from serve.jobs.database import Database
from serve.jobs.models import utcnow
from serve.jobs.schema import cut_jobs, jobs, storyboards
from serve.jobs.storyboard import CutRecord, ShotTrim
from serve.storage import CutArtifacts

CutStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
UNFINISHED: tuple[CutStatus, ...] = ("queued", "running")
CUT_REQUEST_FORMAT = 1
STALE_RUN = "the run is no longer current"  # why `succeed` refused a run that another run or a cancel ended


class CutRunning(Exception):
    """The board has an unfinished cut already (HTTP 409 `cut_running`)."""

    def __init__(self, cut_id: str) -> None:
        super().__init__(f"cut {cut_id} of this board is still rendering")
        self.cut_id = cut_id


class CutTake(BaseModel):
    """One shot of the cut as asked for: the take to use and where its clip is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shot: int = Field(description="Index in the board's shots.")
    name: str = Field(description="The shot's name on the board, or `shot N`.")
    video_id: str = Field(description="The take.")
    take: int = Field(description="Its take number within the shot.")
    key: str = Field(description="The take's finished clip in the artifact store.")
    trim: ShotTrim | None = Field(
        None, description="The part of the take used (the board's trim); None: all."
    )
    joins_previous: bool = Field(
        False,
        description="The take continues the take before it in the cut (a chained shot started from its "
        "last frame): the cut drops its first frame, which repeats that last frame.",
    )


class CutRequest(BaseModel):
    """What one cut job renders (the `request` JSON column), fixed when it is asked for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = CUT_REQUEST_FORMAT
    title: str = Field(description="The cut's metadata title (the board's title, else its id).")
    takes: list[CutTake] = Field(min_length=1, description="The shots of the cut, in cut order.")
    fps: int = Field(description="The cut's rate.")
    size: tuple[int, int] | None = Field(None, description="(width, height); None: the first take's.")
    slate_seconds: float | None = Field(None, description="A slate this long before each shot; None: none.")

    def keys(self, project: str, storyboard_id: str, cut_id: str, attempt: int) -> list[str]:
        """Every file attempt `attempt` of this cut stores: the cut's mp4 and each shot's clip."""
        artifacts = CutArtifacts(project, storyboard_id)
        clips = [artifacts.clip(cut_id, index, take.shot, attempt) for index, take in enumerate(self.takes)]
        return [artifacts.cut(cut_id, attempt), *clips]


@dataclass(frozen=True, slots=True)
class CutJob:
    """One cut job as stored."""

    id: str  # "cut_" + 16 hex; the id of the CutRecord it renders
    storyboard_id: str
    project: str
    status: CutStatus
    progress: float  # 0..1
    attempt: int
    claimed_by: str | None
    request: CutRequest
    error_code: str | None
    error_message: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    eta_at: datetime | None

    @property
    def is_finished(self) -> bool:
        return self.status not in UNFINISHED

    @property
    def keys(self) -> list[str]:
        """The files of this record's attempt."""
        return self.request.keys(self.project, self.storyboard_id, self.id, self.attempt)

    @classmethod
    def from_row(cls, row: Any) -> CutJob:
        data = row._asdict()
        return cls(**{**data, "request": CutRequest.model_validate(data["request"])})


@dataclass(frozen=True, slots=True)
class CutOutcome:
    """What `succeed_cut` did: `stored` the cut as the board's; `replaced`: the board's previous cut (its
    files are the caller's to delete); `refused`: why not (the cut's run is stale, a take or the board was
    deleted meanwhile: the job is failed with code `take_deleted`)."""

    stored: bool
    replaced: CutRecord | None = None
    refused: str | None = None


def new_cut_id() -> str:
    return f"cut_{secrets.token_hex(8)}"


class CutRepository:
    """Cut jobs: create, read, claim, advance, succeed, fail, requeue, cancel."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, cut_id: str, storyboard_id: str, project: str, request: CutRequest) -> CutJob:
        """Queue a cut of the board; CutRunning when the board has one queued or running."""
        now = utcnow()
        row = {
            "id": cut_id,
            "storyboard_id": storyboard_id,
            "project": project,
            "status": "queued",
            "progress": 0.0,
            "attempt": 0,
            "request": request.model_dump(mode="json"),
            "created_at": now,
            "updated_at": now,
        }
        with self._db.write() as conn:
            board = conn.execute(
                select(storyboards.c.id).where(storyboards.c.id == storyboard_id).with_for_update()
            ).one_or_none()
            if board is None:
                raise LookupError(f"no storyboard {storyboard_id}")
            running = conn.execute(
                select(cut_jobs.c.id).where(
                    cut_jobs.c.storyboard_id == storyboard_id, cut_jobs.c.status.in_(UNFINISHED)
                )
            ).first()
            if running is not None:
                raise CutRunning(running.id)
            return CutJob.from_row(conn.execute(insert(cut_jobs).values(row).returning(cut_jobs)).one())

    def get(self, cut_id: str) -> CutJob | None:
        with self._db.read() as conn:
            row = conn.execute(select(cut_jobs).where(cut_jobs.c.id == cut_id)).one_or_none()
        return None if row is None else CutJob.from_row(row)

    def latest(self, storyboard_id: str) -> CutJob | None:
        """The board's newest cut job, whatever its status."""
        query = (
            select(cut_jobs)
            .where(cut_jobs.c.storyboard_id == storyboard_id)
            .order_by(cut_jobs.c.created_at.desc(), cut_jobs.c.id.desc())
            .limit(1)
        )
        with self._db.read() as conn:
            row = conn.execute(query).one_or_none()
        return None if row is None else CutJob.from_row(row)

    def queued(self, limit: int) -> list[str]:
        """Ids of queued cuts, oldest first."""
        query = (
            select(cut_jobs.c.id)
            .where(cut_jobs.c.status == "queued")
            .order_by(cut_jobs.c.created_at, cut_jobs.c.id)
            .limit(limit)
        )
        with self._db.read() as conn:
            return [row.id for row in conn.execute(query)]

    def count_unfinished(self) -> dict[str, int]:
        """Cut jobs per unfinished status (`queued`, `running`; a status with none is absent)."""
        query = (
            select(cut_jobs.c.status, func.count())
            .where(cut_jobs.c.status.in_(UNFINISHED))
            .group_by(cut_jobs.c.status)
        )
        with self._db.read() as conn:
            return {row[0]: row[1] for row in conn.execute(query)}

    def claim(self, cut_id: str, scheduler_id: str) -> CutJob | None:
        """queued -> running, `attempt` + 1; None when it is not queued any more."""
        now = utcnow()
        with self._db.write() as conn:
            row = conn.execute(
                update(cut_jobs)
                .where(cut_jobs.c.id == cut_id, cut_jobs.c.status == "queued")
                .values(
                    status="running",
                    attempt=cut_jobs.c.attempt + 1,
                    claimed_by=scheduler_id,
                    started_at=now,
                    updated_at=now,
                    progress=0.0,
                    eta_at=None,
                )
                .returning(cut_jobs)
            ).one_or_none()
        return None if row is None else CutJob.from_row(row)

    def advance(self, cut_id: str, attempt: int, *, progress: float, eta_at: datetime | None) -> bool:
        """Store a running cut's progress (0..1, never down) and ETA; False when the run is stale."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"`progress` must be within 0..1 but is {progress}.")
        with self._db.write() as conn:
            done = conn.execute(
                update(cut_jobs)
                .where(*_current(cut_id, attempt))
                .values(
                    progress=_at_least(progress),
                    eta_at=eta_at,
                    updated_at=utcnow(),
                )
            ).rowcount
        return bool(done)

    def succeed(self, cut_id: str, attempt: int, cut: CutRecord) -> CutOutcome:
        """Record the rendered `cut` as its board's cut and the job as succeeded, in one transaction, unless
        the run is stale (nothing changes) or a take of it (or the board) was deleted meanwhile (the job
        fails with `take_deleted`; the rendered files are the caller's to delete). The takes' rows are
        share-locked, so a take's delete commits either before this (refused) or after (it finds the cut)."""
        now = utcnow()
        with self._db.write() as conn:
            job = conn.execute(
                select(cut_jobs).where(*_current(cut_id, attempt)).with_for_update()
            ).one_or_none()
            if job is None:
                return CutOutcome(False, refused=STALE_RUN)
            video_ids = sorted({take.video_id for take in CutRequest.model_validate(job.request).takes})
            alive = conn.execute(
                select(jobs.c.id)
                .where(jobs.c.id.in_(video_ids), jobs.c.deleted_at.is_(None))
                .with_for_update(read=True)
            ).all()
            board = conn.execute(
                select(storyboards.c.cut).where(storyboards.c.id == job.storyboard_id).with_for_update()
            ).one_or_none()
            if board is None or len(alive) != len(video_ids):
                why = "a take of the cut was deleted while it rendered" if board else "the board was deleted"
                _finish(conn, cut_id, "failed", now, code="take_deleted", message=why)
                return CutOutcome(False, refused=why)
            conn.execute(
                update(storyboards)
                .where(storyboards.c.id == job.storyboard_id)
                .values(cut=cut.model_dump(mode="json"))
            )
            _finish(conn, cut_id, "succeeded", now, progress=1.0)
        replaced = None if board.cut is None else CutRecord.model_validate(board.cut)
        return CutOutcome(True, replaced=replaced if replaced is None or replaced.id != cut.id else None)

    def fail(self, cut_id: str, attempt: int, code: str, message: str) -> bool:
        """running -> failed with `code`; False when the run is stale."""
        with self._db.write() as conn:
            done = conn.execute(
                update(cut_jobs)
                .where(*_current(cut_id, attempt))
                .values(_finished("failed", utcnow(), code=code, message=message))
            ).rowcount
        return bool(done)

    def requeue(self, cut_id: str, attempt: int, *, max_attempts: int) -> CutStatus | None:
        """Back to queued after a lost replica (progress reset, `attempt` kept as the fence); failed with
        `too_many_attempts` once it was claimed `max_attempts` times. None when the run is stale."""
        now = utcnow()
        with self._db.write() as conn:
            if attempt >= max_attempts:
                message = f"The cut was interrupted on each of its {attempt} attempts."
                values = _finished("failed", now, code="too_many_attempts", message=message)
                status: CutStatus = "failed"
            else:
                values = {"status": "queued", "progress": 0.0, "eta_at": None, "updated_at": now}
                status = "queued"
            done = conn.execute(update(cut_jobs).where(*_current(cut_id, attempt)).values(values)).rowcount
        return status if done else None

    def requeue_in_flight(self, *, max_attempts: int) -> list[CutJob]:
        """After a scheduler (re)start: every running cut is requeued (or failed, see `requeue`); the runs
        so interrupted, as they were (their `attempt` names the files they stored: the caller's to
        delete)."""
        with self._db.read() as conn:
            running = [
                CutJob.from_row(row)
                for row in conn.execute(select(cut_jobs).where(cut_jobs.c.status == "running"))
            ]
        return [
            cut for cut in running if self.requeue(cut.id, cut.attempt, max_attempts=max_attempts) is not None
        ]

    def cancel(self, storyboard_id: str) -> CutJob | None:
        """Cancel the board's unfinished cut; the cut as it is now, or None when it had none unfinished."""
        with self._db.write() as conn:
            return cancel_unfinished_cuts(conn, storyboard_id, now=utcnow())


def cancel_unfinished_cuts(conn: Connection, storyboard_id: str, *, now: datetime) -> CutJob | None:
    """In the caller's transaction: cancel the board's queued or rendering cut; it, or None."""
    row = conn.execute(
        update(cut_jobs)
        .where(cut_jobs.c.storyboard_id == storyboard_id, cut_jobs.c.status.in_(UNFINISHED))
        .values(_finished("cancelled", now))
        .returning(cut_jobs)
    ).first()
    return None if row is None else CutJob.from_row(row)


def _current(cut_id: str, attempt: int) -> tuple[Any, ...]:
    """The fence: this run of this cut, still running."""
    return (cut_jobs.c.id == cut_id, cut_jobs.c.attempt == attempt, cut_jobs.c.status == "running")


def _at_least(progress: float) -> Any:
    return case((cut_jobs.c.progress > progress, cut_jobs.c.progress), else_=progress)


def _finished(
    status: CutStatus, now: datetime, *, code: str | None = None, message: str | None = None
) -> dict[str, Any]:
    return {
        "status": status,
        "finished_at": now,
        "updated_at": now,
        "eta_at": None,
        "error_code": code,
        "error_message": message,
    }


def _finish(
    conn: Connection,
    cut_id: str,
    status: CutStatus,
    now: datetime,
    *,
    progress: float | None = None,
    code: str | None = None,
    message: str | None = None,
) -> None:
    values = _finished(status, now, code=code, message=message)
    if progress is not None:
        values["progress"] = progress
    conn.execute(update(cut_jobs).where(cut_jobs.c.id == cut_id).values(values))
