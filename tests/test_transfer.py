"""Handing a request across deployments as numpy loses nothing: the low expert continues identically."""

from __future__ import annotations

import asyncio
import pickle

import numpy as np
import torch

from pipeline.denoise import Denoiser, initial_state
from pipeline.spec import resolve
from pipeline.text import TextEncoder
from pipeline.weights import build_preset
from serve.stages.transfer import pack_embeds, pack_state, unpack_embeds, unpack_state
from tests.support.wan_reference import tiny_request


def test_packed_handover_gives_the_same_latents_as_a_direct_one() -> None:
    tiny = build_preset("tiny")
    model = tiny.model
    resolved = resolve(tiny_request(seed=11), model)
    encoder = TextEncoder(tiny.tokenizer, tiny.text_encoder)
    prompt, negative = encoder.encode([resolved.prompt, resolved.negative_prompt])
    high = Denoiser(tiny.transformer, tiny.scheduler, expert="high", boundary_ratio=model.boundary_ratio)
    low = Denoiser(tiny.transformer_2, tiny.scheduler, expert="low", boundary_ratio=model.boundary_ratio)
    at_boundary = high.run(initial_state(resolved, model), prompt, negative, resolved.guidance_high)

    direct = low.run(at_boundary, prompt, negative, resolved.guidance_low)
    shipped = pickle.loads(pickle.dumps(pack_state(at_boundary)))  # what crosses the object store
    prompt_again = unpack_embeds(pickle.loads(pickle.dumps(pack_embeds(prompt))))
    via_numpy = low.run(unpack_state(shipped), prompt_again, negative, resolved.guidance_low)

    assert isinstance(shipped.latents, np.ndarray)
    assert torch.equal(direct.latents, via_numpy.latents)
    assert via_numpy.is_done


def test_a_streamed_ref_is_kept_by_its_maker_for_the_hold_then_let_go() -> None:
    from serve.stages.payloads import RefHold

    async def scenario() -> tuple[bool, int, int]:
        hold = RefHold(seconds=0.05)
        ref = [object()]
        passed_on = hold.keep(ref) is ref  # the caller streams the very list the hold keeps alive
        held_now = len(hold)
        await asyncio.sleep(0.3)
        return passed_on, held_now, len(hold)

    assert asyncio.run(scenario()) == (True, 1, 0)
