"""Denoise checkpoints at the expert boundary: the high-noise expert's packed state, kept in the artifact
store so that a rerun of the job (replica or scheduler lost) skips the high-noise expert.

The state is the PackedState after the last high-noise step (latents + UniPC history), written by the
replica that ran those steps (the split pair's high-noise replica, or the colocated Denoiser as the request
crosses the boundary, in the background either way), stored as an uncompressed `.npz` (arrays bit for
bit, plus the scalars as JSON), so a resumed run hands the low-noise expert exactly what an uninterrupted
run would have handed it, and the clip is the same.

    key = JobArtifacts(job.project, job.id).checkpoint
    write_checkpoint(store, key, state)          # after the high-noise expert
    state = read_checkpoint(store, key, steps)   # on a later attempt; CheckpointError if unusable

Which runs write one (`writes_checkpoint`), the same in both layouts (the split pair's high-noise replica,
the colocated Denoiser as a request crosses the boundary): finals do, drafts do not. What a checkpoint
saves is the rerun of the high-noise steps after a lost replica; what it costs is paid by every run.
By loadtest/cost_model.py (H100, 81 frames), a final's 26 guided high-noise steps are 670 s at 720p on one
GPU, 174 s on Ulysses 4, 88 s on Ulysses 8 (480p: 206 / 55 / 28 s): worth a 77 MB write. A draft's 2
unguided high-noise steps are 25.8 s at 720p on one GPU, 6.7 s on Ulysses 4, 3.4 s on Ulysses 8 (480p:
7.9 / 2.1 / 1.1 s), and its rerun happens only when a replica is lost mid-draft (rare), while the write (its
Euler state is the latents alone: 19 MB at 720p, 8 MB at 480p), a job-store row and the clean-up's delete
would be paid by each of the ten-variant batches a director fires: the expected saving is well under the
cost. A lost draft reruns from its seed instead and gives the same clip.
"""

from __future__ import annotations

import io
import json

import numpy as np

from serve.stages.transfer import PackedState
from serve.storage import ArtifactStore, StorageError

CHECKPOINT_FORMAT = 1  # bump when the layout changes; other versions are not read
CHECKPOINTED_TIERS = frozenset({"final"})  # the tiers whose runs write one (see the module docstring)


def writes_checkpoint(quality: str) -> bool:
    """Whether a run of this tier stores its state at the expert boundary (drafts rerun instead)."""
    return quality in CHECKPOINTED_TIERS


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the job; the job starts from scratch instead."""


def encode_state(state: PackedState) -> bytes:
    arrays: dict[str, np.ndarray] = {"latents": state.latents}
    for index, output in enumerate(state.model_outputs):
        if output is not None:
            arrays[f"model_output_{index}"] = output
    if state.last_sample is not None:
        arrays["last_sample"] = state.last_sample
    meta = {
        "format": CHECKPOINT_FORMAT,
        "num_steps": state.num_steps,
        "step_index": state.step_index,
        "lower_order_nums": state.lower_order_nums,
        "this_order": state.this_order,
        "num_model_outputs": len(state.model_outputs),
        "timestep_list": list(state.timestep_list),
    }
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
    return buffer.getvalue()


def decode_state(data: bytes) -> PackedState:
    """The PackedState `encode_state` wrote; CheckpointError if `data` is not such a checkpoint."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(
                    f"checkpoint format {meta.get('format')!r} is not the supported {CHECKPOINT_FORMAT}"
                )
            outputs = tuple(
                npz[f"model_output_{index}"] if f"model_output_{index}" in npz.files else None
                for index in range(meta["num_model_outputs"])
            )
            return PackedState(
                latents=npz["latents"],
                num_steps=meta["num_steps"],
                step_index=meta["step_index"],
                lower_order_nums=meta["lower_order_nums"],
                this_order=meta["this_order"],
                model_outputs=outputs,
                timestep_list=tuple(meta["timestep_list"]),
                last_sample=npz["last_sample"] if "last_sample" in npz.files else None,
            )
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:  # not an npz, or fields missing
        raise CheckpointError(f"not a readable checkpoint: {type(error).__name__}: {error}") from error


def write_checkpoint(store: ArtifactStore, key: str, state: PackedState) -> None:
    """Store `state` under `key`; StorageError naming the key if the store fails."""
    store.put_bytes(key, encode_state(state), "application/octet-stream")


def read_checkpoint(store: ArtifactStore, key: str, num_steps: int) -> PackedState:
    """The state stored under `key`, checked to belong to a request of `num_steps` steps.

    Raises CheckpointError naming the key and the cause when it is missing, unreadable or does not fit.
    """
    try:
        state = decode_state(store.read_bytes(key))
    except (StorageError, CheckpointError, ValueError) as error:  # ValueError: not a valid key
        raise CheckpointError(f"checkpoint {key!r} cannot be used: {error}") from error
    if state.num_steps != num_steps or not 0 <= state.step_index <= num_steps:
        raise CheckpointError(
            f"checkpoint {key!r} is at step {state.step_index} of {state.num_steps}, "
            f"which does not fit a request of {num_steps} steps"
        )
    return state
