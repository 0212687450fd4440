"""The VAEEncoder deployment: an I2V job's keyframes to its condition latents, which stay in the object
store as a ref for both experts.

It is its own deployment, not a method of the VAEDecoder: the encode runs the VAE's encoder over a whole
clip-length video (the keyframes and zeros), about as costly as a decode, so it scales with the I2V load
instead of queueing in the decoders' line. It reads the job's stored keyframes itself
(serve.jobs.keyframes: already fitted to the job's size), so images never pass through the Scheduler.
One encode at a time per replica (memory-bound, like a decode)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray
from ray import serve

from pipeline.stages import deployment_name, stage
from pipeline.vae import decode_dtype
from pipeline.vae_encode import Keyframes, VAEEncoder
from serve.config import PrevizArgs
from serve.jobs.keyframes import load_keyframes
from serve.metrics import ReplicaReporter
from serve.stages.common import STAGE_OPTIONS, gpu_options, stage_components
from serve.stages.payloads import ConditionRef, EncodeImageCall
from serve.storage import make_store

NAME = deployment_name(stage("encode_image"))  # from the stage table: "VAEEncoder"


def default_options(args: PrevizArgs) -> dict[str, Any]:
    return {"name": NAME, **gpu_options(args)}


class MissingKeyframe(ValueError):
    """The job has no stored first keyframe: it cannot run on the I2V model."""


@serve.deployment(name="VAEEncoder", max_ongoing_requests=8, **STAGE_OPTIONS)
class VAEEncoderDeployment:
    """`args`: the I2V model's (PrevizArgs.for_i2v): its VAE (the same Wan2.1 VAE as T2V's)."""

    def __init__(self, args: PrevizArgs) -> None:
        vae = stage_components(args, "vae").vae
        self.encoder = VAEEncoder(vae, dtype=decode_dtype(args.decoder.dtype, next(vae.parameters()).device))
        self.artifacts = make_store(args.storage)
        self.num_encodes = 0
        self._one_at_a_time = asyncio.Lock()
        self._metrics = ReplicaReporter().start()

    async def encode(self, call: EncodeImageCall) -> ConditionRef:
        """The condition of job `call.job_id`'s stored keyframes for a clip of `call.num_frames` frames."""
        first, last = await asyncio.to_thread(load_keyframes, self.artifacts, call.project, call.job_id)
        if first is None:
            raise MissingKeyframe(f"job {call.job_id} has no stored first keyframe to start from.")
        async with self._one_at_a_time:
            started = time.perf_counter()
            condition = await asyncio.to_thread(
                self.encoder.encode, Keyframes(first=first, last=last), call.num_frames
            )
            seconds = time.perf_counter() - started
        self.num_encodes += 1
        array = condition.numpy()
        return ConditionRef(ref=[ray.put(array)], nbytes=array.nbytes, seconds=seconds)

    def __del__(self) -> None:
        reporter = getattr(self, "_metrics", None)
        if reporter is not None:
            reporter.stop()
