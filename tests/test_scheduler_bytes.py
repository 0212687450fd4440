"""What one 480p-shaped job moves through the Scheduler's process: the real Scheduler on the CPU harness,
with the stand-in stages answering at the shapes of Wan2.2 at 832x480x81 (umT5 embeddings of 512x4096,
latents of 16x21x60x104 float32, a UniPC history of 2 model outputs and the last sample). Every result
and streamed message the Scheduler receives, and every call it sends, is measured as it would cross a
process boundary (pickle protocol 5 plus its out-of-band buffers)."""

from __future__ import annotations

from pathlib import Path

from serve.jobs import JobStatus
from tests.fake_stages import FakeStages, Wire, empty_store, run_until_finished, scheduler_args
from tests.job_requests import job_request

UMT5_EMBEDS = (512, 4096)
MB = 1_000_000


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
        return ", ".join(f"{stage} {num / MB:.1f}" for stage, num in sorted(ledger.items()))

    received, sent = sum(wire.received.values()), sum(wire.sent.values())
    return (
        f"received {received / MB:.1f} MB ({row(wire.received)}); sent {sent / MB:.1f} MB ({row(wire.sent)})"
    )


def test_the_scheduler_receives_the_embeddings_and_both_denoise_states_of_a_480p_job(tmp_path: Path) -> None:
    wire = run_480p_job(tmp_path)
    print(report(wire))
    embeds = 512 * 4096 * 4
    state = 4 * 16 * 21 * 60 * 104 * 4  # latents, 2 model outputs, last sample
    assert wire.received["encode"] >= 2 * embeds
    assert wire.received["high"] >= state and wire.received["low"] >= state
