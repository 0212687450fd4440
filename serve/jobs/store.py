"""JobStore: the thin façade over the job store's database and its repositories. Callers hold one object
and call what they need (`store.claim(...)`, `store.get_storyboard(...)`); each of its methods is the
repository method that owns the call (same signature and docstring), which runs one short transaction on
the shared Database:

    jobs         serve/jobs/jobs.py          create and read jobs, counts, the event log
    transitions  serve/jobs/transitions.py   claim, advance, finish, requeue, delete (fenced by attempt)
    storyboards  serve/jobs/storyboards.py   boards with their videos, the edit, the cut
    cuts         serve/jobs/cuts.py          a board's cut as a durable job (fenced like jobs)
    projects     serve/jobs/projects.py      projects, settings, API keys, quota usage
    luts         serve/jobs/luts.py          a project's LUT looks
    reviews      serve/jobs/reviews.py       notes and review statuses of takes
    outbox       serve/jobs/outbox.py        webhook deliveries, queued when a job finishes

The serve layer gives the store the function that renders a webhook's body (`webhook_body`: the API's
video object, see serve.webhooks.open_job_store), so nothing under serve/jobs imports the HTTP layer.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Concatenate, Literal, ParamSpec, TypeVar

from serve.jobs.cuts import CutRepository
from serve.jobs.database import DEFAULT_URL, Database
from serve.jobs.jobs import JobRepository
from serve.jobs.luts import LutRepository
from serve.jobs.outbox import Outbox, WebhookBody
from serve.jobs.projects import ProjectRepository
from serve.jobs.reviews import ReviewRepository
from serve.jobs.rows import MAX_PAGE
from serve.jobs.schema import SCHEMA_LOCK_KEY
from serve.jobs.storyboards import StoryboardRepository
from serve.jobs.takes import number_old_takes
from serve.jobs.transitions import JobTransitions

__all__ = ["DEFAULT_URL", "MAX_PAGE", "JobStore"]

P = ParamSpec("P")
R = TypeVar("R")
Repository = TypeVar("Repository")


def _forward(
    method: Callable[Concatenate[Repository, P], R], repository: Callable[[JobStore], Repository]
) -> Callable[Concatenate[JobStore, P], R]:
    """`method` of the store's `repository`, as a method of the store (its signature and docstring)."""

    @functools.wraps(method)
    def forwarded(store: JobStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return method(repository(store), *args, **kwargs)

    return forwarded


# the store's repositories, by what owns them (read when a forwarded method is called)
_jobs: Callable[[JobStore], JobRepository] = operator.attrgetter("jobs")
_transitions: Callable[[JobStore], JobTransitions] = operator.attrgetter("transitions")
_storyboards: Callable[[JobStore], StoryboardRepository] = operator.attrgetter("storyboards")
_cuts: Callable[[JobStore], CutRepository] = operator.attrgetter("cuts")
_projects: Callable[[JobStore], ProjectRepository] = operator.attrgetter("projects")
_luts: Callable[[JobStore], LutRepository] = operator.attrgetter("luts")
_outbox: Callable[[JobStore], Outbox] = operator.attrgetter("outbox")
_reviews: Callable[[JobStore], ReviewRepository] = operator.attrgetter("reviews")


class JobStore:
    """All reads and state changes of jobs, storyboards, projects, LUTs, reviews and webhooks. Thread-safe and
    multi-process-safe; holds only an engine."""

    def __init__(
        self, url: str = DEFAULT_URL, *, webhook_body: WebhookBody, busy_timeout_s: float = 30.0
    ) -> None:
        """Connect lazily to `url`: `sqlite:///path.db` (file; its folder is created) or
        `postgresql+psycopg://user@host/db` (`postgresql://` means psycopg 3 too).

        `webhook_body`: renders a finished job's webhook `data` (the serve layer gives the API's video view).
        `busy_timeout_s`: how long a SQLite writer waits for another one before failing.
        """
        self.db = Database(url, busy_timeout_s=busy_timeout_s)
        self.outbox = Outbox(self.db, webhook_body)
        self.jobs = JobRepository(self.db)
        self.transitions = JobTransitions(self.db, self.outbox)
        self.storyboards = StoryboardRepository(self.db)
        self.cuts = CutRepository(self.db)
        self.projects = ProjectRepository(self.db)
        self.luts = LutRepository(self.db)
        self.reviews = ReviewRepository(self.db, self.outbox)

    @property
    def backend(self) -> Literal["sqlite", "postgresql"]:
        return self.db.backend

    def create_schema(self) -> None:
        """Create what is missing and upgrade a database of an earlier version (see Database), then
        number the takes of its boards (serve.jobs.takes)."""
        self.db.create_schema()
        with self.db.write() as conn:
            self.db.serialise(conn, SCHEMA_LOCK_KEY)
            number_old_takes(conn)

    def close(self) -> None:
        """Close the pooled connections (the store can still be used afterwards: it reconnects)."""
        self.db.close()

    # JobRepository
    create = _forward(JobRepository.create, _jobs)
    get = _forward(JobRepository.get, _jobs)
    list = _forward(JobRepository.list, _jobs)
    queue_position = _forward(JobRepository.queue_position, _jobs)
    queue_view = _forward(JobRepository.queue_view, _jobs)
    queued = _forward(JobRepository.queued, _jobs)
    queued_candidates = _forward(JobRepository.queued_candidates, _jobs)
    count_by_status = _forward(JobRepository.count_by_status, _jobs)
    running_by_project = _forward(JobRepository.running_by_project, _jobs)
    events = _forward(JobRepository.events, _jobs)
    create_promotions = _forward(JobRepository.create_promotions, _jobs)
    waiting_chained = _forward(JobRepository.waiting_chained, _jobs)
    release_chained = _forward(JobRepository.release_chained, _jobs)
    expired = _forward(JobRepository.expired, _jobs)
    artifact_owners = _forward(JobRepository.artifact_owners, _jobs)

    # JobTransitions
    claim = _forward(JobTransitions.claim, _transitions)
    advance = _forward(JobTransitions.advance, _transitions)
    succeed = _forward(JobTransitions.succeed, _transitions)
    fail = _forward(JobTransitions.fail, _transitions)
    cancel = _forward(JobTransitions.cancel, _transitions)
    add_gpu_seconds = _forward(JobTransitions.add_gpu_seconds, _transitions)
    mark_deleted = _forward(JobTransitions.mark_deleted, _transitions)
    requeue = _forward(JobTransitions.requeue, _transitions)
    save_checkpoint = _forward(JobTransitions.save_checkpoint, _transitions)
    clear_checkpoint = _forward(JobTransitions.clear_checkpoint, _transitions)
    log_event = _forward(JobTransitions.log_event, _transitions)
    requeue_in_flight = _forward(JobTransitions.requeue_in_flight, _transitions)

    # StoryboardRepository
    create_storyboard = _forward(StoryboardRepository.create, _storyboards)
    list_storyboards = _forward(StoryboardRepository.list, _storyboards)
    get_storyboard = _forward(StoryboardRepository.get, _storyboards)
    update_storyboard = _forward(StoryboardRepository.update, _storyboards)
    save_cut = _forward(StoryboardRepository.save_cut, _storyboards)
    replace_cut = _forward(StoryboardRepository.replace_cut, _storyboards)
    delete_storyboard = _forward(StoryboardRepository.delete, _storyboards)

    # CutRepository
    create_cut = _forward(CutRepository.create, _cuts)
    get_cut = _forward(CutRepository.get, _cuts)
    latest_cut = _forward(CutRepository.latest, _cuts)
    queued_cuts = _forward(CutRepository.queued, _cuts)
    count_unfinished_cuts = _forward(CutRepository.count_unfinished, _cuts)
    claim_cut = _forward(CutRepository.claim, _cuts)
    advance_cut = _forward(CutRepository.advance, _cuts)
    succeed_cut = _forward(CutRepository.succeed, _cuts)
    fail_cut = _forward(CutRepository.fail, _cuts)
    requeue_cut = _forward(CutRepository.requeue, _cuts)
    requeue_cuts_in_flight = _forward(CutRepository.requeue_in_flight, _cuts)
    cancel_cut = _forward(CutRepository.cancel, _cuts)

    # ProjectRepository
    create_project = _forward(ProjectRepository.create_project, _projects)
    get_project = _forward(ProjectRepository.get_project, _projects)
    list_projects = _forward(ProjectRepository.list_projects, _projects)
    update_project = _forward(ProjectRepository.update_project, _projects)
    create_key = _forward(ProjectRepository.create_key, _projects)
    list_keys = _forward(ProjectRepository.list_keys, _projects)
    get_key = _forward(ProjectRepository.get_key, _projects)
    revoke_key = _forward(ProjectRepository.revoke_key, _projects)
    rotate_key = _forward(ProjectRepository.rotate_key, _projects)
    authenticate = _forward(ProjectRepository.authenticate, _projects)
    ensure_default_project = _forward(ProjectRepository.ensure_default_project, _projects)
    gpu_seconds_today = _forward(ProjectRepository.gpu_seconds_today, _projects)

    # LutRepository
    put_lut = _forward(LutRepository.put, _luts)
    get_lut = _forward(LutRepository.get, _luts)
    list_luts = _forward(LutRepository.list, _luts)
    delete_lut = _forward(LutRepository.delete, _luts)
    lut_keys_in_use = _forward(LutRepository.keys_in_use, _luts)

    # ReviewRepository
    add_note = _forward(ReviewRepository.add_note, _reviews)
    take_notes = _forward(ReviewRepository.notes, _reviews)
    set_review = _forward(ReviewRepository.set_review, _reviews)

    # Outbox
    due_webhooks = _forward(Outbox.due, _outbox)
    record_webhook_attempt = _forward(Outbox.record_attempt, _outbox)
    webhook_deliveries = _forward(Outbox.deliveries, _outbox)
    webhook_secret = _forward(Outbox.secret, _outbox)
