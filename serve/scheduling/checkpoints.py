"""Denoise checkpoints at the expert boundary: the high-noise expert's packed state, kept in the artifact
store so that a rerun of the job (replica or scheduler lost) skips the high-noise expert.

The state is the PackedState the high-noise replica streamed back (latents + UniPC history), stored as an
uncompressed `.npz` (arrays bit for bit, plus the scalars as JSON), so a resumed run hands the low-noise
expert exactly what an uninterrupted run would have handed it, and the clip is the same.

    key = JobArtifacts(job.project, job.id).checkpoint
    write_checkpoint(store, key, state)          # after the high-noise expert
    state = read_checkpoint(store, key, steps)   # on a later attempt; CheckpointError if unusable
"""

from __future__ import annotations

import io
import json

import numpy as np

from serve.stages.transfer import PackedState
from serve.storage import ArtifactStore, StorageError

CHECKPOINT_FORMAT = 1  # bump when the layout changes; other versions are not read


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
