"""The Scheduler deployment (one replica): the brain that moves jobs from the store through the stages.

It pulls queued jobs (priority class, project fair share, deadline, age), keeps at most
`max_jobs_in_flight` inside the pipeline, and writes every transition to the job store. Nothing lives
only in its memory: on (re)start it requeues the jobs a previous incarnation had claimed, and the store's
attempt fence makes any stale work of that incarnation unable to record a result. A finished job is never
run again. Each attempt's bookkeeping (status, progress, timings, clock, ETA) is an AttemptRun
(serve.scheduling.run), so `_pipeline` reads as the list of stages; webhook delivery, retention and the
queue gauges run in the one-replica Housekeeping deployment beside it (serve.scheduling.housekeeping).

Layouts: the split pair is called once per expert, the state handed from one to the other as a ref; the
colocated Denoiser once per job for both experts, streaming the boundary (`experts.layout`).

Models: a job runs on the model its request names (`ModelRoute`): text-to-video, or image-to-video when
the deployment serves it (`i2v`), whose jobs first have the VAEEncoder turn their stored keyframes into
the condition latents (a ref both experts fetch) and then take the I2V experts' deployments; the text
encoder, the decoder, the upscaler and the finisher serve both.

Faults: a job that loses a replica goes back to the queue; the denoise state saved at the expert boundary
(serve.scheduling.checkpoints; finals only) lets its next attempt skip the high-noise expert and give the
same clip.
A storyboard's cut is a job too: a CutRunner (serve.scheduling.cuts) claims queued cuts in the same
passes and has the Finisher's replicas render them, fenced, requeued after a lost replica, cancellable.

The Finisher is retried with backoff (`finish_attempts`), then the job fails with `storage_failed` or
`finish_failed`; a run whose update the store refuses is `Superseded` and stops (serve.scheduling.faults).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from pipeline.safety import ContentBlocked, FrameCheck
from pipeline.spec import ModelSpec
from pipeline.stages import Layout, expert_stage
from pipeline.upscale import upscale_target_size
from serve.config import PrevizArgs
from serve.jobs import JobRecord, JobStatus
from serve.jobs.request import I2V_MODEL, SERVED_MODEL
from serve.metrics import record_job_claimed, record_job_finished, record_lanes, record_scheduler_pass
from serve.scheduling.checkpoints import CheckpointError, read_checkpoint, writes_checkpoint
from serve.scheduling.continuity import release_chained
from serve.scheduling.cuts import CutRunner
from serve.scheduling.eta import EtaModel
from serve.scheduling.fair_share import Candidate
from serve.scheduling.faults import REPLICA_LOST, StageFailed, Superseded, describe, finish_with_retries
from serve.scheduling.lanes import Lanes
from serve.scheduling.run import AttemptRun
from serve.stages.payloads import (
    CheckpointFailed,
    CheckpointSaved,
    ConditionRef,
    DenoiseBoundary,
    DenoiseCall,
    DenoiseDone,
    DenoiseEvent,
    DenoiseProgress,
    DenoiseWaiting,
    EmbedsRef,
    EncodeImageCall,
    FinishCall,
    FinishedClip,
    FrameBatch,
    InitialNoise,
    StateRef,
)
from serve.stages.transfer import PackedState
from serve.storage import JobArtifacts, make_store
from serve.webhooks import open_job_store

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True, slots=True)
class StageHandles:
    text_encoder: DeploymentHandle
    high: DeploymentHandle  # HighNoiseDenoiser; the Denoiser in the colocated layout
    low: DeploymentHandle  # LowNoiseDenoiser; the Denoiser too in the colocated layout (never called)
    vae: DeploymentHandle
    upscaler: DeploymentHandle
    finisher: DeploymentHandle


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """What the jobs of one served model run on: its sampling facts and its expert deployments."""

    model: ModelSpec  # latent shapes, adapters of a tier
    layout: Layout  # its experts' layout: split (a call per expert) or colocated (one call)
    high: DeploymentHandle  # its HighNoiseDenoiser, or its Denoiser when colocated
    low: DeploymentHandle
    image_encoder: DeploymentHandle | None = None  # the VAEEncoder of an I2V model's keyframes


async def stage_call(response: DeploymentResponse) -> Any:
    """Await one stage call; when the job's task is cancelled meanwhile, cancel the call on its replica
    too (a running decode, upscale or finish stops instead of finishing for nobody)."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


class Scheduler:
    def __init__(
        self,
        args: PrevizArgs,
        model: ModelSpec,
        housekeeping: DeploymentHandle,
        text_encoder: DeploymentHandle,
        high: DeploymentHandle,
        low: DeploymentHandle,
        vae: DeploymentHandle,
        upscaler: DeploymentHandle,
        finisher: DeploymentHandle,
        i2v_high: DeploymentHandle | None = None,
        i2v_low: DeploymentHandle | None = None,
        image_encoder: DeploymentHandle | None = None,
    ) -> None:
        """`i2v_high`, `i2v_low`, `image_encoder`: the I2V model's deployments when `args.i2v` is set."""
        self.args = args
        self.model = model
        self.housekeeping = housekeeping  # webhooks, retention and gauges: nudged when a job leaves
        self.stages = StageHandles(text_encoder, high, low, vae, upscaler, finisher)
        # served model name -> what its jobs run on
        self.routes = {SERVED_MODEL: ModelRoute(model, args.experts.layout, high, low)}
        if args.i2v is not None:
            if i2v_high is None or i2v_low is None or image_encoder is None:
                raise ValueError("`i2v` is configured: the Scheduler needs its experts and its VAEEncoder.")
            i2v = args.for_i2v()
            self.routes[I2V_MODEL] = ModelRoute(
                i2v.sampling, i2v.experts.layout, i2v_high, i2v_low, image_encoder
            )
        self.store = open_job_store(args.database_url)
        self.store.create_schema()
        self.artifacts = make_store(args.storage)  # denoise checkpoints live beside the clips
        self.frame_check = FrameCheck.from_settings(args.safety)  # a chained shot's frame, before release
        self.scheduler_id = f"scheduler-{uuid.uuid4().hex[:12]}"
        requeued = self.store.requeue_in_flight(max_attempts=args.max_attempts)
        if requeued:
            logger.info("requeued %d jobs left in flight by a previous scheduler", len(requeued))
        self.cuts = CutRunner(
            self.store,
            self.artifacts,
            finisher,
            self.scheduler_id,
            max_in_flight=args.max_cuts_in_flight,
            max_attempts=args.max_attempts,
        )
        requeued_cuts = self.cuts.requeue_in_flight()
        if requeued_cuts:
            logger.info(
                "requeued %d cuts left in flight by a previous scheduler (failed after max_attempts) and "
                "deleted what their interrupted attempts stored",
                len(requeued_cuts),
            )
        self._running: dict[str, tuple[str, str, asyncio.Task]] = {}  # job_id -> (project, priority, task)
        self._lanes = Lanes(args.max_jobs_in_flight, args.reserved_slots)
        self._eta = EtaModel()  # stage times measured here: the later stages of a job's ETA
        self._wake = asyncio.Event()
        self._loop_task = asyncio.get_running_loop().create_task(self._serve_forever())

    async def wake(self) -> None:
        """A job was queued or cancelled: look at the queue now instead of at the next poll."""
        self._wake.set()

    async def cancel(self, job_id: str) -> bool:
        """Stop a running job's pipeline (the store already marks it cancelled, or deleted); what the run
        stored goes when it stops. A job cancelled while queued has no pipeline, but may hold a checkpoint
        of an earlier run: that goes now."""
        entry = self._running.get(job_id)
        if entry is None:  # cancelled while queued: no run will count it, so count it here
            job = await asyncio.to_thread(self.store.get, job_id)
            if job is not None and job.status == JobStatus.CANCELLED:
                record_job_finished(job, "cancelled")
            await asyncio.to_thread(self._clean_up, job_id)
            return False
        entry[2].cancel()
        return True

    async def cancel_cut(self, cut_id: str) -> bool:
        """Stop a rendering cut (the store marks it cancelled already); False when none renders here."""
        return self.cuts.cancel(cut_id)

    async def in_flight(self) -> list[str]:
        """Ids of the jobs and cuts running now."""
        return [*self._running, *self.cuts.in_flight]

    def check_health(self) -> None:
        if self._loop_task.done():
            raise RuntimeError(f"the scheduling loop stopped: {self._loop_task.exception()!r}")

    async def _serve_forever(self) -> None:
        while True:
            try:
                await self._start_jobs()
                await self.cuts.start()
                record_scheduler_pass(ok=True)
            except Exception:
                logger.exception("scheduling pass failed; retrying")
                record_scheduler_pass(ok=False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.args.poll_interval_s)
            self._wake.clear()

    async def _start_jobs(self) -> None:
        # chained shots now ready (their predecessor's frame checked as a keyframe image is)
        await release_chained(self.store, self.artifacts, self.scheduler_id, self.frame_check)
        in_flight = Counter(priority for _project, priority, _task in self._running.values())
        free = self._lanes.free_slots(in_flight)
        record_lanes(dict(in_flight), dict(self._lanes.reserved), free)
        if not any(free.values()):
            return
        queued = await asyncio.to_thread(self.store.queued_candidates, 500)
        if not queued:
            return
        running = Counter(project for project, _priority, _task in self._running.values())
        candidates = [Candidate(q.id, q.project, q.priority, q.created_at, q.deadline) for q in queued]
        for candidate in self._lanes.pick(candidates, in_flight, running):
            job = await asyncio.to_thread(self.store.claim, candidate.job_id, self.scheduler_id)
            if job is None:  # cancelled meanwhile
                continue
            record_job_claimed(job)
            task = asyncio.get_running_loop().create_task(self._run_job(job))
            self._running[job.id] = (job.project, str(job.priority), task)
            task.add_done_callback(lambda _t, job_id=job.id: self._job_left(job_id))

    def _job_left(self, job_id: str) -> None:
        self._running.pop(job_id, None)
        self._wake.set()
        self.housekeeping.wake_webhooks.remote()  # its outcome may have queued a webhook

    async def _run_job(self, job: JobRecord) -> None:
        run = AttemptRun(job, self.store, self._eta, progress_interval_s=self.args.progress_write_interval_s)
        try:
            await self._run_attempt(run)
        finally:  # however the run ended (stored, failed, refused, cancelled, deleted): drop what it left,
            await run.settle_checkpoint()  # once a checkpoint in flight has landed
            await asyncio.to_thread(self._clean_up, job.id, job.attempt)

    async def _run_attempt(self, run: AttemptRun) -> None:
        job = run.job
        try:
            await self._pipeline(run)
        except Superseded as superseded:  # cancelled, or a newer run owns the job: record nothing
            logger.info("job %s: %s; this run stops", job.id, superseded)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # cancelled by its user, or this scheduler is stopping
                logger.info("job %s cancelled while running", job.id)
                record_job_finished(job, "cancelled")
                # The GPU time of the stage it was in counts against the project's quota (a stopping
                # scheduler's jobs are requeued, not finished: add_gpu_seconds leaves those alone).
                await asyncio.to_thread(self.store.add_gpu_seconds, job.id, run.clock.open_seconds())
                return
            # Raised inside: a stage call was cancelled under it (a replica shutting down); never fail the
            # job for that.
            await self._requeue(run, "a stage call was cancelled")
        except ContentBlocked as error:  # the Finisher refused the clip: final, never retried
            blocked = getattr(error, "cause", error)  # Ray wraps the replica's exception
            logger.info("job %s: clip blocked by the content policy (%s)", job.id, blocked.category)
            if await asyncio.to_thread(self.store.fail, job.id, job.attempt, "content_blocked", str(blocked)):
                record_job_finished(job, "failed")
        except REPLICA_LOST as error:
            await self._requeue(run, f"lost a replica ({error})")
        except StageFailed:
            record_job_finished(job, "failed")  # the store has the code and the message already
        except Exception as error:
            logger.exception("job %s failed", job.id)
            failed = await asyncio.to_thread(
                self.store.fail, job.id, job.attempt, "pipeline_error", describe(error)
            )
            if failed:
                record_job_finished(job, "failed")

    async def _requeue(self, run: AttemptRun, why: str) -> None:
        """Back to the queue; the expert-boundary checkpoint in flight lands first, so the rerun resumes
        from it (this is how a job whose state ref died with its replica falls back to the checkpoint)."""
        job = run.job
        logger.warning("job %s %s; it goes back to the queue", job.id, why)
        await run.settle_checkpoint()
        status = await asyncio.to_thread(
            self.store.requeue, job.id, job.attempt, max_attempts=self.args.max_attempts
        )
        if status == JobStatus.FAILED:
            record_job_finished(job, "failed")

    async def _pipeline(self, run: AttemptRun) -> None:
        """The job's stage plan, in order; `run` keeps the books (status, progress, timings, clock, ETA)."""
        job, stages = run.job, self.stages
        resolved, finish = job.request.resolved, job.request.finish
        route = self.routes.get(job.request.model)
        if route is None:
            served = ", ".join(self.routes)
            message = f"this deployment does not serve model {job.request.model!r} (it serves {served})"
            await asyncio.to_thread(self.store.fail, job.id, job.attempt, "model_not_served", message)
            raise StageFailed("model_not_served", message)

        # 1. Encode the prompt and the negative prompt (one batched encoder forward); a call that waits
        #    for a forward streams its place in the encoder's line.
        await run.enter("encode")
        started = time.perf_counter()
        texts = [resolved.prompt, resolved.negative_prompt]
        call = stages.text_encoder.options(stream=True).encode.remote(texts)
        prompt, negative = await run.stage_result(call)
        run.record("encode", time.perf_counter() - started, observe=False)

        # 1b. An I2V job: its keyframes' condition latents (the VAEEncoder reads the stored images).
        condition = await self._encode_keyframes(run, route)

        # 2. Denoise: the high-noise expert from the seed's noise, then the low-noise one (two deployments
        #    when split, one call to the Denoiser when colocated); an earlier attempt's checkpoint at the
        #    expert boundary skips the high-noise expert.
        resumed = await self._resume(job, resolved.steps)
        state: InitialNoise | StateRef | PackedState
        if resumed is None:
            shape = resolved.latent_shape(route.model)
            state, experts = InitialNoise(resolved.seed, shape, resolved.steps), ("high", "low")
        else:
            state, experts = resumed, ("low",)
        if route.layout == "colocated":
            state = await self._denoise_colocated(run, route, experts[0], state, prompt, negative, condition)
        else:
            for expert in experts:
                state = await self._denoise(run, route, expert, state, prompt, negative, condition)

        # 3. Decode the latents to frames.
        await run.enter("decode")
        async with run.clocked():
            frames = await run.stage_result(
                stages.vae.options(stream=True).decode.remote(
                    state, resolved.fps, resolved.quality, JobArtifacts(job.project, job.id).last_frame
                )
            )
        run.record("decode", frames.seconds)

        # 4. Upscale (a no-op call when the job asks for none).
        await run.enter("upscale")
        width, height = upscale_target_size(finish.upscale, resolved.width, resolved.height)
        async with run.clocked():
            frames = await run.stage_result(
                stages.upscaler.options(stream=True).upscale.remote(frames, width, height)
            )
        run.record("upscale", frames.seconds)

        # 5. Finish: conform, grade, check, label, encode and store the clip and its poster.
        await run.enter("finish")
        clip = await self._finish(job, frames, finish_call(job))
        run.record("finish", clip.seconds)
        if await run.succeed(clip):
            record_job_finished(job, "succeeded", run.timings)

    async def _encode_keyframes(self, run: AttemptRun, route: ModelRoute) -> ConditionRef | None:
        """The condition latents of an I2V job's stored keyframes (None for a T2V job)."""
        job = run.job
        if route.image_encoder is None:
            return None
        if job.request.keyframes is None or job.request.keyframes.first is None:
            message = f"job {job.id} asks for {job.request.model} but has no first keyframe to start from"
            await asyncio.to_thread(self.store.fail, job.id, job.attempt, "keyframes_missing", message)
            raise StageFailed("keyframes_missing", message)
        await run.enter("encode_image")
        call = EncodeImageCall(project=job.project, job_id=job.id, num_frames=job.request.resolved.num_frames)
        async with run.clocked():
            condition = await stage_call(route.image_encoder.encode.remote(call))
        run.record("encode_image", condition.seconds)
        return condition

    async def _denoise(
        self,
        run: AttemptRun,
        route: ModelRoute,
        expert: str,
        state: InitialNoise | StateRef | PackedState,
        prompt: EmbedsRef,
        negative: EmbedsRef,
        condition: ConditionRef | None = None,
    ) -> StateRef:
        """One expert's share of the steps; a ref to the state after its last step. The high-noise replica
        also checkpoints its state, so that a rerun can skip it: it streams the outcome after the state,
        and the run records it in the background (`run.checkpoint`) while the low-noise expert starts."""
        job, resolved = run.job, run.job.request.resolved
        row = expert_stage(expert)
        await run.enter(row.name)
        call = self._denoise_call(run, route, expert, state, prompt, negative, condition)
        start_index = state.step_index
        handle = route.high if expert == "high" else route.low
        stream = handle.options(stream=True).denoise.remote(call, bucket=str(job.request.bucket))
        try:
            async for event in stream:
                match event:
                    case DenoiseWaiting() as waiting:  # queued in the engine, not stalled
                        await run.waiting_to_denoise(waiting, steps_left=resolved.steps - start_index)
                    case DenoiseProgress(done=done, total=total, seconds_per_step=seconds):
                        steps_left = resolved.steps - (start_index + done)
                        await run.stepped(done, total, steps_left=steps_left, seconds_per_step=seconds)
                    case DenoiseDone(state=done_state, seconds=seconds):
                        run.record(row.name, seconds, observe=False)
                        run.clock.end()
                        if call.checkpoint_key is not None:
                            run.checkpoint = asyncio.create_task(self._record_checkpoint(job, stream))
                        return done_state
        except BaseException:
            # Cancelled, superseded or failed before the expert's last step: take the request out of
            # the replica's engine now. Leaving the stream does not cancel it: the engine would keep
            # stepping an orphan (Ray Serve 2.60 cancels a call only through `cancel()`).
            stream.cancel()
            raise
        raise RuntimeError(f"the {row.name} call of job {job.id} ended without its state")

    async def _denoise_colocated(
        self,
        run: AttemptRun,
        route: ModelRoute,
        first: str,
        state: InitialNoise | StateRef | PackedState,
        prompt: EmbedsRef,
        negative: EmbedsRef,
        condition: ConditionRef | None = None,
    ) -> StateRef:
        """Both experts' steps in ONE call to the colocated Denoiser (from `first`: "low" when resumed from
        the boundary checkpoint); a ref to the state after the last step. The status moves to the low-noise
        stage when the replica streams the boundary; the checkpoint it writes from there in the background
        is recorded when its outcome arrives (during the low-noise steps, or after the state)."""
        job, resolved = run.job, run.job.request.resolved
        row = expert_stage(first)
        await run.enter(row.name)
        call = self._denoise_call(run, route, None, state, prompt, negative, condition)
        start_index = state.step_index
        handle = route.high  # the Denoiser (both handles are it when colocated)
        stream = handle.options(stream=True).denoise.remote(call, bucket=str(job.request.bucket))
        try:
            async for event in stream:
                match event:
                    case DenoiseWaiting() as waiting:
                        await run.waiting_to_denoise(waiting, steps_left=resolved.steps - start_index)
                    case DenoiseProgress(done=done, total=total, seconds_per_step=seconds):
                        steps_left = resolved.steps - (start_index + done)
                        await run.stepped(done, total, steps_left=steps_left, seconds_per_step=seconds)
                    case DenoiseBoundary(step_index=step_index, seconds=seconds):
                        run.record(row.name, seconds, observe=False)
                        row, start_index = expert_stage("low"), step_index
                        await run.enter(row.name)
                    case CheckpointSaved() | CheckpointFailed():
                        await self._record_checkpoint_event(job, event)
                    case DenoiseDone(state=done_state, seconds=seconds):
                        run.record(row.name, seconds, observe=False)
                        run.clock.end()
                        if call.checkpoint_key is not None:  # its outcome, if still to come, ends the stream
                            run.checkpoint = asyncio.create_task(self._record_checkpoint(job, stream))
                        return done_state
        except BaseException:
            stream.cancel()  # out of the replica's engine now (see `_denoise`)
            raise
        raise RuntimeError(f"the Denoiser call of job {job.id} ended without its state")

    def _denoise_call(
        self,
        run: AttemptRun,
        route: ModelRoute,
        expert: str | None,
        state: InitialNoise | StateRef | PackedState,
        prompt: EmbedsRef,
        negative: EmbedsRef,
        condition: ConditionRef | None = None,
    ) -> DenoiseCall:
        """The call of one expert's deployment, or (`expert` None) of the colocated Denoiser for both. A
        tier that checkpoints (`writes_checkpoint`) stores its state where the high-noise steps end."""
        job, resolved = run.job, run.job.request.resolved
        crosses = expert in ("high", None) and state.step_index == 0 and writes_checkpoint(resolved.quality)
        return DenoiseCall(
            request_id=f"{job.id}:{job.attempt}",
            state=state,
            prompt=prompt,
            negative_prompt=negative,
            guidance=resolved.guidance_low if expert == "low" else resolved.guidance_high,
            priority=job.priority,
            deadline=job.deadline,
            quality=resolved.quality,
            adapters=resolved.adapters(route.model),
            cache=resolved.cache,
            checkpoint_key=JobArtifacts(job.project, job.id).checkpoint if crosses else None,
            guidance_low=resolved.guidance_low if expert is None else None,
            condition=condition,
        )

    async def _record_checkpoint(self, job: JobRecord, stream: AsyncIterator[DenoiseEvent]) -> None:
        """Record the checkpoint the high-noise replica stores after its state (the rest of its stream)."""
        try:
            async for event in stream:
                await self._record_checkpoint_event(job, event)
        except REPLICA_LOST as error:
            logger.warning("job %s: its checkpoint was lost with the high-noise replica: %s", job.id, error)

    async def _record_checkpoint_event(self, job: JobRecord, event: DenoiseEvent) -> None:
        match event:
            case CheckpointSaved(key=key, step_index=step_index):
                await asyncio.to_thread(
                    self.store.save_checkpoint, job.id, job.attempt, key, step_index=step_index
                )
            case CheckpointFailed(reason=reason):
                logger.warning("job %s: no checkpoint saved, a rerun starts from scratch: %s", job.id, reason)

    async def _finish(self, job: JobRecord, frames: FrameBatch, call: FinishCall) -> FinishedClip:
        """The Finisher's clip, retried with backoff; after `finish_attempts` tries the job fails."""
        return await finish_with_retries(
            lambda: stage_call(self.stages.finisher.finish.remote(frames, call)),
            self.store,
            job,
            attempts=self.args.finish_attempts,
            base_s=self.args.finish_retry_base_s,
        )

    async def _resume(self, job: JobRecord, num_steps: int) -> PackedState | None:
        """The state an earlier attempt saved at the expert boundary, or None: start from scratch."""
        if job.checkpoint_uri is None:
            return None
        try:
            state = await asyncio.to_thread(read_checkpoint, self.artifacts, job.checkpoint_uri, num_steps)
        except CheckpointError as error:
            logger.warning("job %s starts from scratch: %s", job.id, error)
            return None
        data = {
            "message": "resumed from checkpoint",
            "uri": job.checkpoint_uri,
            "step_index": state.step_index,
        }
        await asyncio.to_thread(self.store.log_event, job.id, job.attempt, "resumed", data)
        logger.info("job %s attempt %d resumed from checkpoint %s", job.id, job.attempt, job.checkpoint_uri)
        return state

    def _clean_up(self, job_id: str, attempt: int | None = None) -> None:
        """Delete what nothing will read: a finished (or deleted) job's checkpoint and kept keyframe condition
        (and, unless it succeeded, its last decoded frame), and the clip and poster of run `attempt` unless
        the job recorded them as its result (the run was cancelled, superseded or requeued, or its job
        deleted, after the Finisher stored them). A requeued job keeps its checkpoint and its condition
        for its next run. Deleted jobs are read too: a DELETE that lands before the run stops must not
        leave the run's files behind. Best effort: what fails here the orphan sweep removes later."""
        try:
            current = self.store.get(job_id, include_deleted=True)
            if current is None:
                return
            keys = JobArtifacts(current.project, current.id)
            garbage = [keys.checkpoint, keys.condition] if current.is_finished else []
            if current.is_finished and (current.status != JobStatus.SUCCEEDED or current.deleted_at):
                garbage.append(keys.last_frame)  # no take to continue from: its decoded frame goes too
            if attempt is not None and current.artifact_uri != keys.clip(attempt):
                garbage += [keys.clip(attempt), keys.poster(attempt)]
            for key in garbage:
                self.artifacts.delete(key)
            if current.is_finished and current.checkpoint_uri is not None:
                self.store.clear_checkpoint(job_id)
        except Exception:
            logger.warning("job %s: deleting the files its run left failed", job_id, exc_info=True)


def finish_call(job: JobRecord) -> FinishCall:
    """How the Finisher finishes `job`'s clip and where it goes."""
    resolved, finish = job.request.resolved, job.request.finish
    metadata = {"title": resolved.prompt[:200], "previz_job": job.id, "previz_seed": str(resolved.seed)}
    keys = (job.project, job.id, job.attempt)  # FinishCall's leading fields: where the clip goes
    look = (resolved.seed, finish.look, finish.label)
    return FinishCall(*keys, *look, metadata, fps=finish.fps, lut=finish.lut)


# The deployment; the plain class above is what tests and a one-process run construct.
SchedulerDeployment = serve.deployment(
    Scheduler, name="Scheduler", num_replicas=1, max_ongoing_requests=1000, health_check_period_s=10
)
