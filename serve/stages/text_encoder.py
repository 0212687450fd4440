"""The TextEncoder deployment: prompts to umT5 embeddings, concurrent calls batched into one forward; the
embeddings stay in the object store and travel to the experts as refs."""

from __future__ import annotations

import asyncio
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

NAME = deployment_name(stage("encode"))  # from the stage table


def default_options(args: PrevizArgs) -> dict[str, Any]:
    return {"name": NAME, **gpu_options(args)}


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

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def encode(self, texts: list[str]) -> list[EmbedsRef]:
        """Each text's embeddings, left in the object store (owned by this replica) for the experts."""
        embeds = await asyncio.to_thread(self.encoder.encode, texts)
        self._cache_metrics.publish(self.encoder.num_cache_hits, self.encoder.num_cache_misses)
        arrays = [pack_embeds(e) for e in embeds]
        return [EmbedsRef(ref=[ray.put(array)], nbytes=array.nbytes) for array in arrays]

    def cache_stats(self) -> dict[str, int]:
        return {"hits": self.encoder.num_cache_hits, "misses": self.encoder.num_cache_misses}
