"""Same seed, same take: a request's latents and frames are bit-identical alone or inside any batch."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.denoise import DenoiseEngine, DenoiseState, EngineRequest, initial_state
from pipeline.determinism import (
    CUBLAS_WORKSPACE_CONFIG,
    WEIGHT_ALIGNMENT_BYTES,
    RowwiseLinear,
    make_batch_invariant,
    use_deterministic_kernels,
)
from pipeline.frames import Frames
from pipeline.spec import RequestSpec, ResolvedRequest, resolve
from pipeline.text import TextEncoder
from pipeline.vae import VAEDecoder
from pipeline.video import VideoWriter
from pipeline.weights import WanComponents, build_preset

EXPERTS = ("high", "low")


@pytest.fixture(scope="module")
def tiny() -> WanComponents:
    return build_preset("tiny")


def request(tiny: WanComponents, prompt: str, seed: int, steps: int = 8) -> ResolvedRequest:
    spec = RequestSpec(
        prompt=prompt, negative_prompt="blurry", resolution="96x64", duration=0.5, steps=steps, seed=seed
    )
    return resolve(spec, tiny.model)


def fresh_encoder(tiny: WanComponents) -> TextEncoder:
    """An encoder with an empty cache: every prompt reaches the network."""
    return TextEncoder(tiny.tokenizer, tiny.text_encoder, max_sequence_length=tiny.model.max_sequence_length)


def render(
    tiny: WanComponents, requests: list[ResolvedRequest], joins: dict[int, list[int]]
) -> dict[int, DenoiseState]:
    """Both experts through their engines; `joins` maps iteration -> seeds submitted before it."""
    encoder = fresh_encoder(tiny)
    by_seed = {item.seed: item for item in requests}
    embeds = {seed: encoder.encode([item.prompt, item.negative_prompt]) for seed, item in by_seed.items()}
    states = {seed: initial_state(item, tiny.model) for seed, item in by_seed.items()}
    for expert in EXPERTS:
        clock = itertools.count()
        engine = DenoiseEngine(
            tiny.transformer if expert == "high" else tiny.transformer_2,
            tiny.scheduler,
            expert=expert,
            boundary_ratio=tiny.model.boundary_ratio,
            max_sequence_length=tiny.model.max_sequence_length,
            clock=lambda clock=clock: float(next(clock)),
        )
        futures = {}
        for iteration in itertools.count():
            for seed in joins.get(iteration, []):
                item = by_seed[seed]
                futures[seed] = engine.submit(
                    EngineRequest(
                        request_id=str(seed),
                        state=states[seed],
                        prompt=embeds[seed][0],
                        negative_prompt=embeds[seed][1],
                        guidance=item.guidance_high if expert == "high" else item.guidance_low,
                    )
                )
            if iteration > max(joins) and all(future.done() for future in futures.values()):
                break
            engine.step()
        states = {seed: future.result() for seed, future in futures.items()}
    return states


def frames(tiny: WanComponents, state: DenoiseState) -> np.ndarray:
    return VAEDecoder(tiny.vae).decode(state.latents, fps=16).pixels


@pytest.mark.parametrize(
    "joins",
    [{0: [1234, 99, 7]}, {0: [99, 7], 2: [1234]}, {0: [1234], 1: [99], 3: [7]}],
    ids=["all-at-once", "joins-late", "others-join-later"],
)
def test_a_take_alone_is_bit_identical_to_the_take_inside_a_batch_of_three(
    tiny: WanComponents, joins: dict[int, list[int]]
) -> None:
    target = request(tiny, "a crane move over rooftops at dusk", seed=1234)
    others = [
        request(tiny, "a car chase through a rainy market", seed=99),
        request(tiny, "close-up of a clock face", seed=7, steps=6),  # another schedule: other timesteps
    ]
    alone = render(tiny, [target], {0: [1234]})[1234]
    batched = render(tiny, [target, *others], joins)[1234]
    assert alone.is_done and batched.is_done
    assert torch.equal(batched.latents, alone.latents)
    assert np.array_equal(frames(tiny, batched), frames(tiny, alone))


def test_the_same_frames_always_encode_to_the_same_mp4(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    still = (rng.random((64, 96, 3)) * 255).astype(np.uint8)
    clip = Frames(pixels=np.stack([np.roll(still, 2 * index, axis=1) for index in range(81)]), fps=16)
    # with x264's MB-tree on, about every other encode of this clip came out different
    takes = {VideoWriter().write(clip, tmp_path / f"take{index}.mp4").read_bytes() for index in range(6)}
    assert len(takes) == 1


def test_prompt_embeddings_do_not_depend_on_the_prompts_beside_them(tiny: WanComponents) -> None:
    prompt = "a crane move over rooftops at dusk"
    alone = fresh_encoder(tiny).encode([prompt])[0].embeds
    neighbours = ["x", prompt, "a much longer prompt about a car chase through a rainy market"]
    batched = fresh_encoder(tiny).encode(neighbours)[1].embeds
    assert torch.equal(batched, alone)


def test_rowwise_layers_compute_each_row_as_if_it_were_alone_and_keep_their_weights() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(256, 24), nn.SiLU(), nn.Linear(24, 144), nn.GELU(approximate="tanh"))
    keys = list(plain.state_dict())
    model = make_batch_invariant(plain)
    assert model is plain and isinstance(model[0], RowwiseLinear) and isinstance(model[0], nn.Linear)
    assert list(model.state_dict()) == keys and make_batch_invariant(model) is model
    rows = torch.randn(6, 256)
    with torch.inference_mode():
        together = model(rows)
        for index in range(6):
            assert torch.equal(together[index : index + 1], model(rows[index : index + 1]))


@pytest.mark.parametrize("bias", [True, False])
def test_a_rowwise_linear_on_token_rows_equals_each_row_alone_and_the_plain_layer_per_row(bias: bool) -> None:
    torch.manual_seed(0)
    plain = nn.Linear(96, 40, bias=bias)
    rowwise = make_batch_invariant(nn.Linear(96, 40, bias=bias))
    rowwise.load_state_dict(plain.state_dict())
    tokens = torch.randn(5, 33, 96)  # (rows, tokens, features): the DiT's layout, written in place per row
    strided = torch.randn(33, 5, 96).transpose(0, 1)  # not contiguous: the per-row copy path
    with torch.inference_mode():
        for rows in (tokens, strided):
            together = rowwise(rows)
            for index in range(5):
                assert torch.equal(together[index : index + 1], plain(rows[index : index + 1]))
                assert torch.equal(together[index : index + 1], rowwise(rows[index : index + 1]))


def test_a_misaligned_weight_gets_an_aligned_copy_of_the_same_values() -> None:
    layer = nn.Linear(24, 24, bias=False)
    values = torch.randn(24, 24)
    buffer = torch.empty(24 * 24 + 1)
    with torch.no_grad():  # a weight 4 bytes off the allocator's alignment, as a safetensors file may give
        layer.weight.data = buffer[1:].view(24, 24)
        layer.weight.copy_(values)
    weight = layer.weight
    make_batch_invariant(layer)
    assert layer.weight is weight and layer.weight.data_ptr() % WEIGHT_ALIGNMENT_BYTES == 0
    assert torch.equal(layer.weight, values)


def test_layer_subclasses_are_left_alone() -> None:
    class Adapter(nn.Linear):  # e.g. a quantized or LoRA layer: it chooses its own kernels
        pass

    model = make_batch_invariant(nn.Sequential(Adapter(4, 4), nn.Linear(4, 4)))
    assert type(model[0]) is Adapter and type(model[1]) is RowwiseLinear


def test_deterministic_kernels_switch_torch_to_fixed_algorithms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    matmul = torch.backends.cuda.matmul
    precision = (matmul.fp32_precision, matmul.allow_bf16_reduced_precision_reduction)
    try:
        use_deterministic_kernels()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE_CONFIG
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()  # a missing kernel warns, never fails
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (False, True)
        assert matmul.fp32_precision == "ieee" and not matmul.allow_bf16_reduced_precision_reduction
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        matmul.fp32_precision, matmul.allow_bf16_reduced_precision_reduction = precision
