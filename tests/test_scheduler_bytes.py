"""What one 480p-shaped job moves through the Scheduler's process: the real Scheduler on the CPU harness,
with the stand-in stages answering at the shapes of Wan2.2 at 832x480x81 (umT5 embeddings of 512x4096,
latents of 16x21x60x104 float32, a UniPC history of 2 model outputs and the last sample). Every result
and streamed message the Scheduler receives, and every call it sends, is measured as it would cross a
process boundary (pickle protocol 5 plus its out-of-band buffers)."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serve.jobs import JobStatus
from serve.stages.payloads import DenoiseDone, EmbedsRef
from tests.support.fake_stages import FakeStages, Wire, empty_store, run_until_finished, scheduler_args
from tests.support.job_requests import job_request

UMT5_EMBEDS = (512, 4096)


def run_480p_job(tmp_path: Path) -> Wire:
    args = scheduler_args(tmp_path)
    stages = FakeStages(embeds_shape=UMT5_EMBEDS, solver_order=2)
    store = empty_store(args)
    job, _ = store.create("dune", "batch", job_request(resolution="832x480", duration=5.0, steps=8))
    done = run_until_finished(args, stages, store, job.id)
    assert done.status == JobStatus.SUCCEEDED
    return stages.wire


def report(wire: Wire) -> str:
    def row(ledger: dict[str, int]) -> str:
        return ", ".join(f"{stage} {num:,}" for stage, num in sorted(ledger.items()))

    received, sent = sum(wire.received.values()), sum(wire.sent.values())
    return f"bytes received {received:,} ({row(wire.received)}); sent {sent:,} ({row(wire.sent)})"


def arrays_in(value: Any) -> list[np.ndarray]:
    """Every numpy array inside `value` (dataclass fields, sequences and mappings, walked)."""
    if isinstance(value, np.ndarray):
        return [value]
    if is_dataclass(value):
        return [a for f in fields(value) for a in arrays_in(getattr(value, f.name))]
    if isinstance(value, list | tuple):
        return [a for item in value for a in arrays_in(item)]
    if isinstance(value, dict):
        return [a for item in value.values() for a in arrays_in(item)]
    return []


def test_the_scheduler_of_a_480p_job_receives_refs_sizes_and_events_never_an_array(tmp_path: Path) -> None:
    wire = run_480p_job(tmp_path)
    print(report(wire))
    assert [arrays_in(value) for value in wire.received_objects] == [[]] * len(wire.received_objects)
    # the text encoder answers a job's prompt and negative prompt in one list
    assert any(
        isinstance(value, list) and [type(ref) for ref in value] == [EmbedsRef, EmbedsRef]
        for value in wire.received_objects
    )
    assert any(isinstance(value, DenoiseDone) for value in wire.received_objects)
    # what it receives and sends is bookkeeping: well under one latent array (8.4 MB at this shape)
    assert sum(wire.received.values()) < 100_000 and sum(wire.sent.values()) < 100_000
