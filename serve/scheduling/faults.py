"""What can go wrong with a job's run, and what the Scheduler does about it.

- A replica lost under the job (REPLICA_LOST), or one lost after it made a ref the job still needs: the
  job goes back to the queue (once the checkpoint in flight has landed) and a later run resumes from its
  expert-boundary checkpoint.
- `Superseded`: the store no longer accepts this run's updates (the job was cancelled, or requeued and
  claimed again by a newer run): stop spending compute on it and record nothing.
- The Finisher failing: retried with backoff (`finish_with_retries`), then the job fails for good with
  `storage_failed` or `finish_failed` (`StageFailed`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError, RayActorError, RayTaskError
from ray.serve.exceptions import ReplicaUnavailableError

from pipeline.safety import ContentBlocked
from serve.jobs import JobRecord, JobStore
from serve.storage import StorageError

logger = logging.getLogger("ray.serve")

# Errors that mean a replica died under the job: run it again rather than fail it. A replica killed during
# a (streaming) call raises ActorDiedError (a RayActorError) from the call; a replica gone between being
# picked and being sent the call raises ReplicaUnavailableError. A stage fetching a ref (embeddings, a
# denoise state) whose owning replica died raises ObjectLostError (OwnerDiedError): the same loss, seen later.
REPLICA_LOST = (
    ActorDiedError,
    ActorUnavailableError,
    RayActorError,
    ReplicaUnavailableError,
    ObjectLostError,
)
T = TypeVar("T")


class Superseded(Exception):
    """This run of a job may no longer record anything: the job was cancelled, or requeued and claimed by
    a newer run (the store's attempt fence refused an update)."""

    def __init__(self, job_id: str, attempt: int) -> None:
        super().__init__(f"job {job_id} attempt {attempt} is no longer current")
        self.job_id, self.attempt = job_id, attempt


class StageFailed(Exception):
    """A stage failed for good after its retries; the job is already marked FAILED with `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # error_code of the job: storage_failed | finish_failed


async def finish_with_retries(
    finish: Callable[[], Awaitable[T]], store: JobStore, job: JobRecord, *, attempts: int, base_s: float
) -> T:
    """`await finish()` up to `attempts` times, waiting `base_s`, 2 x `base_s`, ... between tries and logging
    a "retry" event for each. When every try failed, FAIL the job (`storage_failed` when the artifact store
    was the cause, else `finish_failed`; the message names the cause and the number of tries) and raise
    StageFailed: a clip that cannot be stored is never left running nor dropped silently."""
    for number in range(1, attempts + 1):
        try:
            return await finish()
        except ContentBlocked:
            raise  # the frame check refused the clip: trying again gives the same answer
        except ObjectLostError:
            raise  # the frames' owner (decoder or upscaler replica) is gone: requeued like a lost replica
        except Exception as error:  # CancelledError (job cancelled, scheduler stopping) is not retried
            cause = describe(cause_of(error))
            if number == attempts:
                code = "storage_failed" if isinstance(error, StorageError) else "finish_failed"
                message = f"Finishing the clip failed on all {attempts} tries; the last error: {cause}"
                logger.warning("job %s failed: %s", job.id, message)
                await asyncio.to_thread(store.fail, job.id, job.attempt, code, message)
                raise StageFailed(code, message) from error
            delay_s = base_s * 2 ** (number - 1)
            logger.warning(
                "job %s: finishing failed (try %d of %d), retry in %.1f s: %s",
                job.id,
                number,
                attempts,
                delay_s,
                cause,
            )
            data = {"stage": "finish", "try": number, "of": attempts, "error": cause, "retry_in_s": delay_s}
            await asyncio.to_thread(store.log_event, job.id, job.attempt, "retry", data)
            await asyncio.sleep(delay_s)
    raise ValueError(f"`attempts` must be >= 1 but is {attempts}.")


def cause_of(error: BaseException) -> BaseException:
    """The replica's own exception inside the RayTaskError a handle call raises."""
    if isinstance(error, RayTaskError) and error.cause is not None:
        return error.cause
    return error


def describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:2000]
