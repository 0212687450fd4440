"""The Finisher deployment: the one finisher (pipeline.finish: conform, grade, frame check, label, mp4
encode, poster) in a replica, plus what only a served clip needs: the job's LUT read from the store and
the clip and poster stored under the job's keys. It also renders a storyboard's cut for the Scheduler
(`render_cut`, serve.editorial.cut), streaming its progress shot by shot."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ray import serve

from pipeline.finish import ClipFinish, Finisher, lut_from_cube
from pipeline.frames import Frames
from pipeline.interpolate import FlowInterpolator, Interpolator, ModelInterpolator
from pipeline.lut import Lut
from pipeline.safety import ContentBlocked, FrameCheck
from pipeline.stages import deployment_name, stage
from pipeline.weights import pick_device
from serve.config import PrevizArgs
from serve.editorial.cut import render_cut
from serve.jobs.deletion import delete_keys_or_leave_to_sweep
from serve.jobs.request import LutRef
from serve.metrics import record_artifact_write, record_safety_block
from serve.stages.common import STAGE_OPTIONS, all_calls_options
from serve.stages.payloads import (
    CutCall,
    CutEvent,
    CutProgress,
    CutRendered,
    FinishCall,
    FinishedClip,
    FrameBatch,
)
from serve.storage import JobArtifacts, StorageError, StoredArtifact, make_store

logger = logging.getLogger("ray.serve")
NAME = deployment_name(stage("finish"))  # from the stage table
MAX_CACHED_LUTS = 32  # a 65³ LUT is ~7 MB as floats


def default_options(args: PrevizArgs) -> dict[str, Any]:
    return {"name": NAME, **all_calls_options(args)}  # CPU work: encoding and uploads


class FinisherStage:
    """Finish the frames with the one finisher (pipeline.finish) and store the clip with its poster frame.
    A blocked clip raises ContentBlocked and nothing is stored."""

    def __init__(self, args: PrevizArgs) -> None:
        self.store = make_store(args.storage)
        self._backend = args.storage.kind
        self.interpolator = make_interpolator(args)
        self.finisher = Finisher(FrameCheck.from_settings(args.safety), self.interpolator)
        self._luts: dict[str, Lut] = {}  # LUT key -> parsed LUT, oldest first
        # a thread for every call the replica takes (all_calls_options): a finish never waits for a thread
        # uncounted; the calls share the replica's CPUs instead, each slower while many run
        self._threads = ThreadPoolExecutor(all_calls_options(args)["max_ongoing_requests"], "finish")

    async def finish(self, frames: FrameBatch, call: FinishCall) -> FinishedClip:
        """The stored clip. A call cancelled meanwhile (its job was cancelled or deleted) publishes nothing:
        the encode thread cannot be stopped, so it is let finish and what it stored is deleted."""
        pixels = await frames.ref[0]
        loop = asyncio.get_running_loop()
        work = asyncio.ensure_future(
            loop.run_in_executor(self._threads, self._finish, Frames(pixels=pixels, fps=frames.fps), call)
        )
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            await asyncio.wait([work])
            if work.cancelled() or work.exception() is not None:
                raise  # it stored nothing whole (a half-written local file is never under its key)
            keys = JobArtifacts(call.project, call.job_id)
            try:
                for key in (keys.clip(call.attempt), keys.poster(call.attempt)):
                    await asyncio.to_thread(self.store.delete, key)
            except StorageError:
                logger.warning(
                    "job %s: a cancelled clip could not be deleted; the orphan sweep will", call.job_id
                )
            raise

    async def render_cut(self, call: CutCall) -> AsyncIterator[CutEvent]:
        """Render the cut (serve.editorial.cut.render_cut) in a worker thread: a CutProgress after each shot
        stored, then CutRendered. A call cancelled meanwhile, or a stream closed before its CutRendered (a
        caller cancelled while it was not waiting on the stream), stops the render after the shot in hand
        (the thread cannot be stopped in the middle) and deletes what it stored. A replica lost mid-render
        leaves its attempt's files for the Scheduler to delete."""
        loop = asyncio.get_running_loop()
        progress: asyncio.Queue[CutProgress] = asyncio.Queue()
        stop = threading.Event()
        started = time.perf_counter()
        rendered = False

        def clip_done(done: int, total: int) -> None:
            if stop.is_set():
                raise CutStopped(f"cut {call.cut_id} attempt {call.attempt} was cancelled")
            event = CutProgress(done, total, time.perf_counter() - started)
            loop.call_soon_threadsafe(progress.put_nowait, event)

        work = asyncio.ensure_future(
            asyncio.to_thread(
                render_cut,
                self.store,
                call.cut_id,
                call.attempt,
                call.project,
                call.storyboard_id,
                call.request,
                interpolator=self.interpolator,
                clip_done=clip_done,
            )
        )
        try:
            while True:
                next_event = asyncio.ensure_future(progress.get())
                await asyncio.wait({next_event, work}, return_when=asyncio.FIRST_COMPLETED)
                if not next_event.done():
                    next_event.cancel()
                    break
                yield next_event.result()
            while not progress.empty():  # the thread's last events land before its result
                yield progress.get_nowait()
            rendered = True  # handed over: closing the stream after this keeps the cut
            yield CutRendered(work.result(), time.perf_counter() - started)
        except (asyncio.CancelledError, GeneratorExit):
            if rendered:
                raise
            stop.set()  # the shot in hand is stored, then the render stops; its files go after it
            await asyncio.wait([work])
            keys = call.request.keys(call.project, call.storyboard_id, call.cut_id, call.attempt)
            await asyncio.to_thread(delete_keys_or_leave_to_sweep, self.store, keys, f"cut {call.cut_id}")
            raise
        finally:
            stop.set()

    def _finish(self, frames: Frames, call: FinishCall) -> FinishedClip:
        started = time.perf_counter()
        how = self.how_to_finish(call)
        with tempfile.TemporaryDirectory(prefix="previz-finish-") as scratch:
            try:
                done = self.finisher.finish(
                    frames, how, Path(scratch) / "clip.mp4", poster=Path(scratch) / "poster.jpg"
                )
            except ContentBlocked as blocked:
                record_safety_block("frames", blocked.category)
                raise
            keys = JobArtifacts(call.project, call.job_id)
            key, poster_key = keys.clip(call.attempt), keys.poster(call.attempt)
            stored = self._put(key, done.clip, "video/mp4", kind="clip")
            self._put(poster_key, done.poster, "image/jpeg", kind="poster")
        return FinishedClip(
            uri=stored.uri,
            key=key,
            size_bytes=stored.size_bytes,
            poster_key=poster_key,
            num_frames=done.num_frames,
            width=done.width,
            height=done.height,
            seconds=time.perf_counter() - started,
        )

    def how_to_finish(self, call: FinishCall) -> ClipFinish:
        """The call's finishing choices, its LUT read from the store."""
        return ClipFinish(
            seed=call.seed,
            look=call.look,
            lut=self._lut(call.lut) if call.lut is not None else None,
            fps=call.fps,
            label=call.label,
            metadata=call.metadata,
        )

    def _lut(self, ref: LutRef) -> Lut:
        """The LUT file of `ref`, read once per replica (its key names one version)."""
        lut = self._luts.get(ref.key)
        if lut is None:
            data = self.store.read_bytes(ref.key)
            if hashlib.sha256(data).hexdigest() != ref.sha256:
                raise ValueError(f"the LUT file {ref.key!r} is not the one the job was admitted with")
            lut = lut_from_cube(data.decode("utf-8"), ref.interpolation)
            if len(self._luts) >= MAX_CACHED_LUTS:
                self._luts.pop(next(iter(self._luts)))
            self._luts[ref.key] = lut
        return lut

    def _put(self, key: str, path: Path, content_type: str, *, kind: str) -> StoredArtifact:
        try:
            stored = self.store.put_file(key, path, content_type)
        except Exception:
            record_artifact_write(self._backend, kind, None, ok=False)
            raise
        record_artifact_write(self._backend, kind, stored.size_bytes, ok=True)
        return stored


class CutStopped(Exception):
    """The cut's render call was cancelled: the render stops at the next shot."""


def make_interpolator(args: PrevizArgs) -> Interpolator:
    """The RIFE-family network when `interpolation_weights` are configured, else optical flow."""
    if args.interpolation_weights is not None:
        return ModelInterpolator.from_file(args.interpolation_weights, device=pick_device(args.device))
    return FlowInterpolator()


# The deployment; the plain class above is what tests construct.
FinisherDeployment = serve.deployment(FinisherStage, name="Finisher", max_ongoing_requests=8, **STAGE_OPTIONS)
