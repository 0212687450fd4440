"""The VAEEncoder deployment: an I2V job's keyframes to its condition latents, which stay in the object
store as a ref for both experts.

It is its own deployment, not a method of the VAEDecoder: the encode runs the VAE's encoder over a whole
clip-length video (the keyframes and zeros), about as costly as a decode, so it scales with the I2V load
instead of queueing in the decoders' line. It reads the job's stored keyframes itself
(serve.jobs.keyframes: already fitted to the job's size), so images never pass through the Scheduler.
One encode at a time per replica (memory-bound, like a decode). Each job's condition is encoded once: the
first attempt keeps it beside the keyframes, and a retried attempt (a lost replica, a restarted
Scheduler) reads it back instead of encoding again (`KeyframeConditions`)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
import ray
from ray import serve

from pipeline.stages import deployment_name, stage
from pipeline.vae import decode_dtype
from pipeline.vae_encode import Keyframes, VAEEncoder
from serve.config import PrevizArgs
from serve.jobs.keyframes import condition_digest, load_condition, load_keyframes, save_condition
from serve.metrics import ReplicaReporter
from serve.stages.common import STAGE_OPTIONS, gpu_options, stage_components
from serve.stages.payloads import ConditionRef, EncodeImageCall
from serve.storage import ArtifactStore, StorageError, make_store

logger = logging.getLogger("ray.serve")

NAME = deployment_name(stage("encode_image"))  # from the stage table: "VAEEncoder"


def default_options(args: PrevizArgs) -> dict[str, Any]:
    return {"name": NAME, **gpu_options(args)}


class MissingKeyframe(ValueError):
    """The job has no stored first keyframe: it cannot run on the I2V model."""


class KeyframeConditions:
    """The condition of each job's stored keyframes, encoded once per job: the first attempt keeps what it
    encoded (serve.jobs.keyframes.save_condition), a later attempt of the same job reads that back (when it
    was made from the same keyframes and clip length) and does not encode again. One encode at a time."""

    def __init__(self, encoder: VAEEncoder, artifacts: ArtifactStore) -> None:
        self.encoder = encoder
        self.artifacts = artifacts
        self.num_encodes = 0  # conditions this replica encoded
        self.num_reused = 0  # conditions it read back from an earlier attempt instead
        self._one_at_a_time = asyncio.Lock()

    async def condition(self, call: EncodeImageCall) -> tuple[np.ndarray, float]:
        """(condition, encode seconds; 0.0 when an earlier attempt's was read back) of job `call.job_id`."""
        project, job_id = call.project, call.job_id
        first, last = await asyncio.to_thread(load_keyframes, self.artifacts, project, job_id)
        if first is None:
            raise MissingKeyframe(f"job {job_id} has no stored first keyframe to start from.")
        digest = condition_digest(first, last, call.num_frames)
        kept = await asyncio.to_thread(load_condition, self.artifacts, project, job_id, digest)
        if kept is not None:
            self.num_reused += 1
            return kept, 0.0
        async with self._one_at_a_time:
            started = time.perf_counter()
            condition = await asyncio.to_thread(
                self.encoder.encode, Keyframes(first=first, last=last), call.num_frames
            )
            seconds = time.perf_counter() - started
        self.num_encodes += 1
        array = condition.numpy()
        try:  # written before the condition is handed on, so a retry after any later failure finds it
            await asyncio.to_thread(save_condition, self.artifacts, project, job_id, digest, array)
        except StorageError:  # the job goes on; a retry of it encodes again
            logger.warning("job %s: keeping its condition failed", job_id, exc_info=True)
        return array, seconds


@serve.deployment(name="VAEEncoder", max_ongoing_requests=8, **STAGE_OPTIONS)
class VAEEncoderDeployment:
    """`args`: the I2V model's (PrevizArgs.for_i2v): its VAE (the same Wan2.1 VAE as T2V's)."""

    def __init__(self, args: PrevizArgs) -> None:
        vae = stage_components(args, "vae").vae
        encoder = VAEEncoder(vae, dtype=decode_dtype(args.decoder.dtype, next(vae.parameters()).device))
        self.conditions = KeyframeConditions(encoder, make_store(args.storage))
        self._metrics = ReplicaReporter().start()

    async def encode(self, call: EncodeImageCall) -> ConditionRef:
        """The condition of job `call.job_id`'s stored keyframes for a clip of `call.num_frames` frames."""
        array, seconds = await self.conditions.condition(call)
        return ConditionRef(ref=[ray.put(array)], nbytes=array.nbytes, seconds=seconds)

    async def stats(self) -> dict[str, int]:
        """Conditions this replica encoded (`encoded`) and read back from an earlier attempt (`reused`)."""
        return {"encoded": self.conditions.num_encodes, "reused": self.conditions.num_reused}

    def __del__(self) -> None:
        reporter = getattr(self, "_metrics", None)
        if reporter is not None:
            reporter.stop()
