"""Quality tiers and per-request LoRA in the batching engine (tiny preset, CPU).

The draft tier is the published 4-step distill recipe: Euler, shift 5, no CFG, 2 + 2 steps over the
experts, run with a distill LoRA per expert in lightx2v's file format; adapters switch between forwards
without touching the base weights, and requests with different adapter sets never share a forward.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open

from pipeline.denoise import DenoiseEngine, Denoiser, EngineRequest, initial_state
from pipeline.denoise import engine as engine_module
from pipeline.denoise.adapters import AdapterBank, load_bank
from pipeline.denoise.calibration import calibration_curve
from pipeline.denoise.experts import expert_step_indices
from pipeline.denoise.state import tier_solvers
from pipeline.denoise.stepcache import MagnitudeCurve
from pipeline.determinism import RowwiseLinear
from pipeline.lora import EXPERT_FILES, distill_folder, random_lora_state_dict, save_lora_folder
from pipeline.spec import (
    DEFAULT_FINAL_CACHE,
    DISTILL_ADAPTER,
    LoraRef,
    ModelSpec,
    RequestSpec,
    StepCacheSettings,
    resolve,
)
from pipeline.text import TextEncoder
from pipeline.weights import PRESETS, WanComponents, build_preset

STYLE = "noir"


@pytest.fixture(scope="module")
def tiny() -> WanComponents:
    """A tiny preset of this module's own: loading adapters wraps its layers."""
    return build_preset("tiny")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The built-in distill LoRA and a `noir` style LoRA that only the low-noise expert has."""
    cache = tmp_path_factory.mktemp("loras")
    config = PRESETS["tiny"].transformer
    style = save_lora_folder(cache / STYLE, {"low": random_lora_state_dict(config, seed=7, rank=2)})
    return {DISTILL_ADAPTER: distill_folder("builtin", "tiny", cache_dir=cache), STYLE: style}


@pytest.fixture(scope="module")
def banks(tiny: WanComponents, folders: dict[str, Path]) -> dict[str, AdapterBank]:
    return {
        "high": load_bank(tiny.transformer, "high", folders),
        "low": load_bank(tiny.transformer_2, "low", folders),
    }


@pytest.fixture(scope="module")
def encoder(tiny: WanComponents) -> TextEncoder:
    return TextEncoder(tiny.tokenizer, tiny.text_encoder, max_sequence_length=tiny.model.max_sequence_length)


def engine(
    tiny: WanComponents, banks: dict[str, AdapterBank], expert: str, curve: MagnitudeCurve | None = None
) -> DenoiseEngine:
    clock = itertools.count()
    return DenoiseEngine(
        tiny.transformer if expert == "high" else tiny.transformer_2,
        tiny.scheduler,
        expert=expert,
        boundary_ratio=tiny.model.boundary_ratio,
        max_sequence_length=tiny.model.max_sequence_length,
        clock=lambda: float(next(clock)),
        solvers=tier_solvers(tiny.model, tiny.scheduler),
        adapters=banks[expert],
        cache_curve=curve,
    )


def request(tiny: WanComponents, encoder: TextEncoder, request_id: str, expert: str = "high", **fields):
    spec = RequestSpec(
        **{"prompt": f"{request_id}: a rooftop chase at dusk", "resolution": "96x64", "duration": 0.5}
        | {"seed": len(request_id) * 5 + 3, "cache": None}  # a final runs every step unless a test caches
        | fields
    )
    resolved = resolve(spec, tiny.model)
    prompt, negative = encoder.encode([resolved.prompt, resolved.negative_prompt])
    return EngineRequest(
        request_id=request_id,
        state=initial_state(resolved, tiny.model),
        prompt=prompt,
        negative_prompt=negative,
        guidance=resolved.guidance_high if expert == "high" else resolved.guidance_low,
        quality=resolved.quality,
        adapters=resolved.adapters(tiny.model),
        cache=resolved.cache,
    )


class ForwardLog:
    """Every transformer call of an expert: its rows and the adapters active during it."""

    def __init__(self, transformer) -> None:
        self.calls: list[tuple[int, tuple[str, ...]]] = []  # (rows, active adapter names or ())
        self.transformer = transformer

    def __enter__(self) -> ForwardLog:
        def record(module, _args, kwargs):
            enabled = any(not layer.disable_adapters for layer in _lora_layers(module))
            active = tuple(sorted(module.active_adapters())) if enabled else ()
            self.calls.append((kwargs["hidden_states"].shape[0], active))

        self.handle = self.transformer.register_forward_pre_hook(record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _lora_layers(module):
    from peft.tuners.lora import LoraLayer

    return [layer for layer in module.modules() if isinstance(layer, LoraLayer)]


def run_to_end(engine: DenoiseEngine, requests: list[EngineRequest]):
    futures = [engine.submit(item) for item in requests]
    plans = []
    while not all(future.done() for future in futures):
        plans.append(engine.step())
    return [future.result() for future in futures], plans


def run_alone(
    tiny: WanComponents,
    banks: dict[str, AdapterBank],
    expert: str,
    item: EngineRequest,
    curve: MagnitudeCurve | None = None,
):
    """`item` through a one-request Denoiser of `expert`: what the engine must give it in any batch."""
    alone = Denoiser(
        tiny.transformer if expert == "high" else tiny.transformer_2,
        tiny.scheduler,
        expert=expert,
        boundary_ratio=tiny.model.boundary_ratio,
        solvers=tier_solvers(tiny.model, tiny.scheduler),
        adapters=banks[expert],
        cache_curve=curve,
    )
    return alone.run(
        item.state,
        item.prompt,
        item.negative_prompt,
        item.guidance,
        quality=item.quality,
        adapters=item.adapters,
        cache=item.cache,
    )


# ---- the recipe -------------------------------------------------------------------------------------------


def test_draft_recipe_is_the_published_distill_recipe_and_splits_two_and_two() -> None:
    model = ModelSpec()
    draft, final = model.recipe("draft"), model.recipe("final")
    assert (draft.steps, draft.solver, draft.flow_shift) == (4, "euler", 5.0)
    assert (draft.guidance_high, draft.guidance_low, draft.adapter) == (1.0, 1.0, DISTILL_ADAPTER)
    assert (final.steps, final.solver, final.flow_shift, final.guidance_high, final.guidance_low) == (
        40,
        "unipc",
        12.0,
        4.0,
        3.0,
    )
    solvers = tier_solvers(model, build_unipc(model))
    for quality, recipe in (("draft", draft), ("final", final)):
        high = expert_step_indices(solvers[quality], recipe.steps, model.boundary_ratio, "high")
        assert len(high) == recipe.num_high_steps, quality
    draft_solver = solvers["draft"]
    from pipeline.denoise.state import new_solver

    timesteps = new_solver(draft_solver, 4, torch.device("cpu")).timesteps
    assert torch.allclose(timesteps, torch.tensor([1000.0, 937.5, 833.3333, 625.0]))  # LightX2V's, shifted


def build_unipc(model: ModelSpec):
    from pipeline.weights import wan_scheduler

    return wan_scheduler(model.flow_shift)


def test_quality_picks_the_tiers_defaults_and_a_draft_names_its_distill_adapter() -> None:
    model = ModelSpec()
    draft = resolve(RequestSpec(prompt="p", quality="draft", loras=[LoraRef(name=STYLE, weight=0.5)]), model)
    assert (draft.steps, draft.guidance_high, draft.guidance_low) == (4, 1.0, 1.0)
    assert draft.adapters(model) == ((DISTILL_ADAPTER, 1.0), (STYLE, 0.5))
    final = resolve(RequestSpec(prompt="p"), model)
    assert (final.quality, final.steps, final.adapters(model)) == ("final", 40, ())


# ---- LoRA files and adapters ---------------------------------------------------------------------------


def test_builtin_distill_lora_is_in_the_lightx2v_file_format(folders: dict[str, Path]) -> None:
    for name in EXPERT_FILES.values():
        with safe_open(str(folders[DISTILL_ADAPTER] / name), framework="pt") as file:
            keys = list(file.keys())
        assert keys and all(key.startswith("diffusion_model.blocks.") for key in keys)
        assert {key.rsplit(".", 2)[-2] if key.endswith(".weight") else "alpha" for key in keys} == {
            "lora_A",
            "lora_B",
            "alpha",
        }
        assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in keys
        assert "diffusion_model.blocks.1.ffn.2.lora_B.weight" in keys


def test_distill_lora_loads_into_both_experts_changes_the_output_and_disabling_restores_base(
    tiny: WanComponents, banks: dict[str, AdapterBank], encoder: TextEncoder
) -> None:
    item = request(tiny, encoder, "lora")
    for expert, transformer in (("high", tiny.transformer), ("low", tiny.transformer_2)):
        bank = banks[expert]
        assert DISTILL_ADAPTER in bank.loaded
        assert len(_lora_layers(transformer)) == 2 * 10  # 2 blocks x (8 attention + 2 FFN) linears
        base_weights = {
            name: param.clone() for name, param in transformer.named_parameters() if "lora_" not in name
        }
        inputs = dict(
            hidden_states=item.state.latents[None],
            timestep=torch.tensor([900]),
            encoder_hidden_states=torch.nn.functional.pad(
                item.prompt.embeds, (0, 0, 0, 512 - item.prompt.embeds.shape[0])
            )[None],
            return_dict=False,
        )
        with torch.inference_mode():
            bank.activate(())
            base = transformer(**inputs)[0]
            bank.activate(((DISTILL_ADAPTER, 1.0),))
            adapted = transformer(**inputs)[0]
            bank.activate(())
            restored = transformer(**inputs)[0]
        assert float((adapted - base).abs().max()) > 1e-3, expert
        assert torch.equal(restored, base), expert  # bit for bit
        for name, param in transformer.named_parameters():
            if "lora_" not in name:
                assert torch.equal(param, base_weights[name]), name  # never fused


def test_adapter_layers_are_batch_invariant_too(tiny: WanComponents, banks: dict[str, AdapterBank]) -> None:
    engine(tiny, banks, "high")  # the engine makes the expert batch-invariant, adapter layers included
    peft_linears = [
        module
        for layer in _lora_layers(tiny.transformer)
        for module in (*layer.lora_A.values(), *layer.lora_B.values())
    ]
    assert peft_linears and all(type(module) is RowwiseLinear for module in peft_linears)
    assert all(type(layer.base_layer) is RowwiseLinear for layer in _lora_layers(tiny.transformer))


def test_unknown_adapter_is_refused_at_submit(
    tiny: WanComponents, banks: dict[str, AdapterBank], encoder: TextEncoder
) -> None:
    item = request(tiny, encoder, "unknown")
    item.adapters = (("nobody", 1.0),)
    with pytest.raises(ValueError, match="'nobody' is not loaded"):
        engine(tiny, banks, "high").submit(item)


# ---- the engine -------------------------------------------------------------------------------------------


def test_draft_request_runs_exactly_its_recipes_forwards_one_row_each(
    tiny: WanComponents, banks: dict[str, AdapterBank], encoder: TextEncoder
) -> None:
    state = None
    for expert, transformer, steps in (("high", tiny.transformer, 2), ("low", tiny.transformer_2, 2)):
        item = request(tiny, encoder, "draft", expert, quality="draft")
        if state is not None:
            item.state = state
        with ForwardLog(transformer) as log:
            (state,), _ = run_to_end(engine(tiny, banks, expert), [item])
        assert log.calls == [(1, (DISTILL_ADAPTER,))] * steps, expert  # no CFG rows, the LoRA on
    assert state.is_done and state.step_index == 4


def test_engine_never_shares_a_forward_between_adapter_sets(
    tiny: WanComponents, banks: dict[str, AdapterBank], encoder: TextEncoder
) -> None:
    low = engine(tiny, banks, "low")
    items = []
    for request_id, fields in (
        ("plain-a", {"quality": "draft"}),
        ("plain-b", {"quality": "draft"}),
        ("styled", {"quality": "draft", "loras": [LoraRef(name=STYLE, weight=0.8)]}),
    ):
        high_item = request(tiny, encoder, request_id, "high", **fields)
        (high_state,), _ = run_to_end(engine(tiny, banks, "high"), [high_item])
        item = request(tiny, encoder, request_id, "low", **fields)
        item.state = high_state
        items.append(item)
    with ForwardLog(tiny.transformer_2) as log:
        results, plans = run_to_end(low, items)
    # 2 low steps each: the two plain drafts share both forwards; the styled one runs its own two
    assert low.num_forwards == 4
    assert sorted(log.calls) == sorted([(2, (DISTILL_ADAPTER,))] * 2 + [(1, (DISTILL_ADAPTER, STYLE))] * 2)
    sets = {item.request_id: item.adapters for item in items}
    assert all(len({sets[member] for member in plan.request_ids}) == 1 for plan in plans if plan.request_ids)
    stats = low.stats()
    assert stats.forwards_by_adapters == {"distill": 2, "distill+noir@0.8": 2}
    assert stats.num_adapter_switches >= 1
    # batched with its set equals the same request alone
    for item, result in zip(items, results, strict=True):
        assert torch.equal(result.latents, run_alone(tiny, banks, "low", item).latents), item.request_id


def test_cached_and_uncached_finals_share_forwards_and_a_draft_never_joins_them(
    tiny: WanComponents, banks: dict[str, AdapterBank], encoder: TextEncoder
) -> None:
    curve = calibration_curve("tiny", tiny.model)
    high = engine(tiny, banks, "high", curve)
    caching = StepCacheSettings(threshold=0.03, max_skip=2, warmup_steps=1)  # tiny: skips 3 of 6 high steps
    items = [
        request(tiny, encoder, "cached", steps=8, quality="final", cache=caching),
        request(tiny, encoder, "uncached", steps=8, quality="final"),
        request(tiny, encoder, "draft", quality="draft"),
    ]
    results, plans = run_to_end(high, items)
    tiers = {item.request_id: item.quality for item in items}
    assert all(len({tiers[member] for member in plan.request_ids}) == 1 for plan in plans if plan.request_ids)
    finals = [plan for plan in plans if "cached" in plan.request_ids]
    assert len(finals) == 6 and all("uncached" in plan.request_ids for plan in finals)  # cache: per row
    stats = high.stats()
    assert stats.num_cached_steps == 3 and stats.forwards_by_adapters == {"base": 6, "distill": 2}
    assert stats.num_rows == 6 * 2 + 3 * 2 + 2  # uncached CFG rows, the cached steps it ran, the draft's
    for item, result in zip(items, results, strict=True):
        expected = run_alone(tiny, banks, "high", item, curve).latents
        assert float((result.latents - expected).abs().max()) <= 1e-5, item.request_id


def test_progress_reports_can_read_the_measured_step_time_of_their_bucket_and_tier(
    tiny: WanComponents, banks: dict[str, AdapterBank], encoder: TextEncoder
) -> None:
    high = engine(tiny, banks, "high")
    item = request(tiny, encoder, "eta", quality="draft")
    bucket = tuple(item.state.latents.shape)
    seen: list[float | None] = []
    item.on_progress = lambda done, total: seen.append(high.seconds_per_step(bucket, "draft"))
    assert high.seconds_per_step(bucket, "draft") is None
    run_to_end(high, [item])
    assert len(seen) == 2 and all(seconds is not None and seconds > 0 for seconds in seen)
    assert high.seconds_per_step(bucket, "final") is None  # another tier's steps are not this one's


def test_the_step_time_is_read_after_the_device_finished_the_forward(
    tiny: WanComponents, banks: dict[str, AdapterBank], encoder: TextEncoder, monkeypatch
) -> None:
    """On CUDA a forward returns once its kernels are queued: the ETA's step time must wait for them.
    Here the forward costs no "seconds" of a fake timer and the device sync costs 3."""
    seconds, synced = [0.0], []
    monkeypatch.setattr(engine_module, "time", SimpleNamespace(perf_counter=lambda: seconds[0]))

    def synchronize(device: torch.device) -> None:
        synced.append(device)
        seconds[0] += 3.0

    monkeypatch.setattr(engine_module, "synchronize", synchronize)
    high = engine(tiny, banks, "high")
    item = request(tiny, encoder, "eta-sync", quality="draft")
    run_to_end(high, [item])
    assert synced == [high.device, high.device]  # once per iteration, on the expert's device
    assert high.seconds_per_step(tuple(item.state.latents.shape), "draft") == 3.0


def test_a_caching_requests_step_time_counts_the_steps_it_skipped(
    tiny: WanComponents, banks: dict[str, AdapterBank], encoder: TextEncoder, monkeypatch
) -> None:
    """Each pass through the blocks costs one "second" of a fake timer; a skipped step costs none."""
    seconds = [0.0]
    monkeypatch.setattr(engine_module, "time", SimpleNamespace(perf_counter=lambda: seconds[0]))
    hook = tiny.transformer.blocks[0].register_forward_pre_hook(
        lambda *_: seconds.__setitem__(0, seconds[0] + 1)
    )
    try:
        high = engine(tiny, banks, "high", calibration_curve("tiny", tiny.model))
        caching = StepCacheSettings(threshold=0.03, max_skip=2, warmup_steps=1)  # skips 3 of its 6 high steps
        cached = request(tiny, encoder, "cached", steps=8, quality="final", cache=caching)
        plain = request(tiny, encoder, "plain", steps=8, quality="final")
        bucket, seen = tuple(cached.state.latents.shape), {}
        for item in (cached, plain):
            item.on_progress = lambda done, total, rid=item.request_id: seen.__setitem__(
                rid, high.seconds_per_step(bucket, "final", rid)
            )
            run_to_end(high, [item])  # one after the other: each alone in its iterations
    finally:
        hook.remove()
    assert seen == {"cached": 0.5, "plain": 1.0}  # after its 6 steps: 3 computed of 6, 6 of 6
    mixed = high.seconds_per_step(bucket, "final")  # the bucket's last 8 iterations: both requests'
    assert 0.5 < mixed < 1.0 and high.seconds_per_step(bucket, "final", "cached") == mixed  # it left


def test_a_final_request_naming_no_cache_takes_the_tiers_default_and_a_draft_none() -> None:
    model = ModelSpec()
    final = resolve(RequestSpec(prompt="a crane over rooftops", quality="final"), model)
    assert final.cache == DEFAULT_FINAL_CACHE == model.recipe("final").cache
    assert resolve(RequestSpec(prompt="a crane", quality="final", cache=None), model).cache is None
    assert resolve(RequestSpec(prompt="a crane", quality="draft"), model).cache is None
    with pytest.raises(ValidationError, match=r"`cache` is for `quality: final` only"):
        RequestSpec(prompt="a crane", quality="draft", cache={"threshold": 0.06})
