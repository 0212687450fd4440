"""Take numbers: each video of a board's shot is a take, numbered 1, 2, ... per shot in creation order,
stored with the job (`jobs.take`) in the transaction that creates it, so the page, the CLI's file names,
the slates and the timelines all say the same number. A promoted final is a new take of its shot; a
deleted take keeps its number (its row stays), so a number is never given twice.

Stores written before the column existed are numbered once by `number_old_takes` (create_schema), by the
same rule: per shot, in job id (= creation) order.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, select, update

from serve.jobs.models import JobRecord
from serve.jobs.request import JobRequest
from serve.jobs.schema import jobs


def shot_of(request: JobRequest) -> int:
    """The index of the board shot a video is a take of."""
    return request.storyboard.shot if request.storyboard is not None else 0


def take_number(job: JobRecord) -> int:
    """The job's take number; a board video of a store not numbered yet (rows copied in after
    create_schema) reads as its variant + 1, as takes were counted before."""
    if job.take is not None:
        return job.take
    return job.request.storyboard.variant + 1 if job.request.storyboard is not None else 1


def _shot_of(stored_request: dict) -> int:
    return shot_of(JobRequest.from_stored(stored_request))


def next_takes(conn: Connection, storyboard_id: str, shots: Iterable[int]) -> list[int]:
    """The take numbers of new videos of the board's `shots` (one per item, in order), after the takes
    its shots have. The caller holds the board row locked (PostgreSQL) or the write lock (SQLite), so two
    creates on one board never draw the same number."""
    last: dict[int, int] = {}
    query = select(jobs.c.take, jobs.c.request).where(jobs.c.storyboard_id == storyboard_id)
    for take, stored in conn.execute(query):
        shot = _shot_of(stored)
        last[shot] = max(last.get(shot, 0), take or 0)
    numbers = []
    for shot in shots:
        last[shot] = last.get(shot, 0) + 1
        numbers.append(last[shot])
    return numbers


def number_old_takes(conn: Connection) -> int:
    """Give every board video without a take number one (a store of an earlier version): per shot, in id
    order, after the shot's numbered takes. Returns how many were numbered; 0 once done."""
    boards = conn.execute(
        select(jobs.c.storyboard_id)
        .where(jobs.c.storyboard_id.is_not(None), jobs.c.take.is_(None))
        .distinct()
    ).scalars()
    numbered = 0
    for board in list(boards):
        rows = conn.execute(
            select(jobs.c.id, jobs.c.take, jobs.c.request)
            .where(jobs.c.storyboard_id == board)
            .order_by(jobs.c.id)
        ).all()
        last: dict[int, int] = {}
        for row in rows:
            if row.take is not None:
                shot = _shot_of(row.request)
                last[shot] = max(last.get(shot, 0), row.take)
        for row in rows:
            if row.take is None:
                shot = _shot_of(row.request)
                last[shot] = last.get(shot, 0) + 1
                conn.execute(update(jobs).where(jobs.c.id == row.id).values(take=last[shot]))
                numbered += 1
    return numbered
