"""The Housekeeping deployment (one replica): the store's background work beside the Scheduler, not in it.

It delivers webhooks from the outbox, deletes videos past their project's retention, and refreshes the
jobs, queue and cut gauges from the store. One replica, because each loop must run once in the cluster: the
Ingress runs several replicas and would deliver every webhook several times. The Scheduler only nudges it
(`wake_webhooks`) when a job's outcome may have queued a webhook; without the nudge the dispatcher finds it
at its next poll.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from serve.config import PrevizArgs
from serve.jobs import RUNNING_STATUSES, JobRecord, JobStatus
from serve.jobs.retention import RetentionSweeper
from serve.metrics import REPORT_INTERVAL_S, QueueReporter
from serve.storage import make_store
from serve.webhooks import WebhookDispatcher, open_job_store

logger = logging.getLogger("ray.serve")
NAME = "Housekeeping"


class Housekeeping:
    def __init__(self, args: PrevizArgs) -> None:
        self.store = open_job_store(args.database_url)
        self.store.create_schema()
        loop = asyncio.get_running_loop()
        self._webhooks = WebhookDispatcher(self.store, args.webhooks, public_url=args.public_url)
        self._retention = RetentionSweeper(self.store, make_store(args.storage), args.retention_sweep_s)
        self._queue_reporter = QueueReporter()
        self._tasks = {
            "webhooks": loop.create_task(self._webhooks.run_forever()),
            "retention": loop.create_task(self._retention.run_forever()),
            "gauges": loop.create_task(self._report_forever()),
        }

    async def wake_webhooks(self) -> None:
        """A job just finished: look at the outbox now instead of at the next poll."""
        self._webhooks.wake()

    def check_health(self) -> None:
        for name, task in self._tasks.items():
            if task.done():
                why = "cancelled" if task.cancelled() else repr(task.exception())
                raise RuntimeError(f"the {name} loop stopped: {why}")

    def stop(self) -> None:
        """Cancel the loops (tests that run this class outside Serve)."""
        for task in self._tasks.values():
            task.cancel()

    async def _report_forever(self) -> None:
        """Refresh the jobs and queue gauges from the store (the store, not memory, is the truth)."""
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            try:
                counts, unfinished, cuts = await asyncio.to_thread(self._snapshot)
                self._queue_reporter.publish(counts, unfinished)
                self._queue_reporter.publish_cuts(cuts)
            except Exception:
                logger.warning("refreshing queue metrics failed", exc_info=True)

    def _snapshot(self) -> tuple[dict[JobStatus, int], list[JobRecord], dict[str, int]]:
        unfinished = self.store.queued(1000) + self.store.list(statuses=RUNNING_STATUSES, limit=1000)
        return self.store.count_by_status(), unfinished, self.store.count_unfinished_cuts()


# The deployment; the plain class above is what tests construct.
HousekeepingDeployment = serve.deployment(
    Housekeeping, name=NAME, num_replicas=1, max_ongoing_requests=100, health_check_period_s=10
)
