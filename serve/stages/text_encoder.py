"""The TextEncoder deployment: prompts to umT5 embeddings, concurrent calls batched into one forward; a call
that waits for a forward streams its place in the replica's line (serve.stages.turns.BatchLine); the
embeddings stay in the object store and travel to the experts as refs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve

from pipeline.stages import deployment_name, stage
from pipeline.text import TextEncoder
from serve.config import PrevizArgs
from serve.metrics import CacheReporter, ReplicaReporter
from serve.stages.common import STAGE_OPTIONS, gpu_options, stage_components
from serve.stages.payloads import EmbedsRef
from serve.stages.transfer import pack_embeds
from serve.stages.turns import BatchLine, StageWaiting

NAME = deployment_name(stage("encode"))  # from the stage table
MAX_BATCH_SIZE = 32  # texts in one forward
TEXTS_PER_CALL = 2  # a job's prompt and its negative prompt


def default_options(args: PrevizArgs) -> dict[str, Any]:
    return {"name": NAME, **gpu_options(args)}


@dataclass(frozen=True, slots=True)
class _Text:
    """One text of a call, as the batched forward takes it: the call's place in the line comes along."""

    call: object  # the call's BatchLine token
    text: str


@serve.deployment(name="TextEncoder", max_ongoing_requests=256, **STAGE_OPTIONS)
class TextEncoderDeployment:
    """Prompt → umT5 embeddings; concurrent calls are batched into one encoder forward."""

    def __init__(self, args: PrevizArgs) -> None:
        parts = stage_components(args, "text_encoder")
        self.encoder = TextEncoder(
            parts.tokenizer,
            parts.text_encoder,
            max_sequence_length=parts.model.max_sequence_length,
            cache_size=args.text_cache_size,
        )
        self._cache_metrics = CacheReporter()
        self._metrics = ReplicaReporter().start()  # GPU gauges where there is a GPU
        self._line = BatchLine(MAX_BATCH_SIZE // TEXTS_PER_CALL)  # the calls waiting for a forward or in one

    async def encode(self, texts: list[str]) -> AsyncIterator[StageWaiting | list[EmbedsRef]]:
        """A job's texts (its prompt and its negative prompt), encoded in the forwards they share with
        other calls: streams the call's place in the replica's line while they wait (the calls before it,
        the running forward's included; serve.stages.turns), then their embeddings, left in the object
        store (owned by this replica) for the experts. Cancelled, it leaves the line."""
        token = self._line.join()
        work = asyncio.gather(*(self._encode_batch(_Text(token, text)) for text in texts))
        try:
            async for waiting in self._line.wait(token, work):
                yield waiting
            refs = await work
        finally:
            work.cancel()  # a no-op once done
            self._line.leave(token)
        yield list(refs)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=0.01)
    async def _encode_batch(self, items: list[_Text]) -> list[EmbedsRef]:
        """Each text's embeddings, in one forward of up to 32 texts (one forward at a time)."""
        self._line.started(item.call for item in items)
        started = time.perf_counter()
        embeds = await asyncio.to_thread(self.encoder.encode, [item.text for item in items])
        self._line.forward_took(time.perf_counter() - started)  # a waiting call's ETA counts forwards
        self._cache_metrics.publish(self.encoder.num_cache_hits, self.encoder.num_cache_misses)
        arrays = [pack_embeds(e) for e in embeds]
        return [EmbedsRef(ref=[ray.put(array)], nbytes=array.nbytes) for array in arrays]

    def cache_stats(self) -> dict[str, int]:
        return {"hits": self.encoder.num_cache_hits, "misses": self.encoder.num_cache_misses}
