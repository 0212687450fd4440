"""Step caching per request inside the engine (MagCache): the split forward equals the model's, the
decision follows MagCache's rule, skipped steps take no rows, batching does not change a request's take,
and each request's residual is bounded and freed when it leaves."""

from __future__ import annotations

import weakref

import pytest
import torch

from pipeline.denoise import (
    Denoiser,
    RequestCancelled,
    RequestFailed,
    StepScheduler,
    initial_state,
)
from pipeline.denoise.blocks import SplitTransformer
from pipeline.denoise.calibration import (
    WAN22_T2V_A14B_CURVE,
    calibrate,
    calibration_curve,
    calibration_request,
)
from pipeline.denoise.experts import expert_step_indices
from pipeline.denoise.forward import GuidedInput, Rows, guided_forward, predict_rows
from pipeline.denoise.stepcache import MagnitudeCurve, RequestCache, cached_guided_forward
from pipeline.local import LocalPipeline
from pipeline.spec import DEFAULT_FINAL_CACHE, ModelSpec, RequestSpec, StepCacheSettings
from pipeline.text import TextEncoder
from pipeline.weights import WanComponents, build_preset, wan_scheduler
from tests.test_engine import Case, drive, engine_request, make_case, max_diff, planned
from tests.test_engine import engine_for as engine_of

MAX_ABS_DIFF = 1e-5  # what the issue allows; the layers are row-wise, so it is 0 here
SPLIT_MAX_ABS_DIFF = 1e-6
ROUNDING = 1e-5  # input + (output - input) is output up to fp32 rounding (2e-6 here, x4 by guidance)
# on the tiny preset's calibrated curve at 8 steps (ratios 0.99-1.014) this skips 3 of the 6 high-noise
# steps and 1 of the 2 low-noise ones
CACHING = StepCacheSettings(threshold=0.03, max_skip=2, warmup_steps=1)


@pytest.fixture(scope="module")
def tiny() -> WanComponents:
    return build_preset("tiny")


@pytest.fixture(scope="module")
def encoder(tiny: WanComponents) -> TextEncoder:
    return TextEncoder(tiny.tokenizer, tiny.text_encoder, max_sequence_length=tiny.model.max_sequence_length)


@pytest.fixture(scope="module")
def curve() -> MagnitudeCurve:
    return calibration_curve("tiny", ModelSpec())


def engine_for(tiny: WanComponents, curve: MagnitudeCurve | None, expert: str = "high", **settings):
    return engine_of(tiny, expert, cache_curve=curve, **settings)


def run_alone(tiny, curve, case: Case, cache: StepCacheSettings | None, expert: str = "high", state=None):
    """(state after `expert`, its engine) for `case` alone in a fresh engine."""
    engine = engine_for(tiny, curve, expert)
    future = engine.submit(engine_request(case, expert, state, cache=cache))
    while not future.done():
        engine.step()
    return future.result(), engine


def expected_skips(
    curve: MagnitudeCurve, cache: StepCacheSettings, indices: list[int], num_steps: int, cfg=True
):
    """The steps MagCache's rule skips, worked out from the curve alone (no model)."""
    ratios, skips = curve.step_ratios(num_steps, cfg), []
    ratio, error, in_row, have_residual = 1.0, 0.0, 0, False
    for index in indices:
        skip = False
        if index >= cache.warmup_steps and have_residual:
            ratio, error, in_row = ratio * ratios[index], error + abs(1 - ratio * ratios[index]), in_row + 1
            skip = error < cache.threshold and in_row <= cache.max_skip
        if not skip:
            ratio, error, in_row = 1.0, 0.0, 0
        have_residual = True
        skips.append(skip)
    return skips


# ---- the split forward, the curve and the decision, no engine ---------------------------------------------


def test_split_forward_equals_the_transformer_forward(tiny: WanComponents) -> None:
    generator = torch.Generator().manual_seed(0)
    rows = Rows(
        hidden_states=torch.randn(3, 16, 3, 8, 12, generator=generator),
        timestep=torch.tensor([999, 950, 640]),
        encoder_hidden_states=torch.randn(3, tiny.model.max_sequence_length, 32, generator=generator),
    )
    for transformer in (tiny.transformer, tiny.transformer_2):
        with torch.inference_mode():
            diff = max_diff(SplitTransformer(transformer)(rows), predict_rows(transformer, rows))
        print(f"split vs forward max abs diff {diff:.3e}")
        assert diff <= SPLIT_MAX_ABS_DIFF


def test_a_skipped_row_is_the_head_of_its_block_input_plus_the_residual(tiny: WanComponents) -> None:
    generator = torch.Generator().manual_seed(1)
    split = SplitTransformer(tiny.transformer)
    items = [
        GuidedInput(
            latents=torch.randn(16, 3, 8, 12, generator=generator),
            timestep=torch.tensor(t),
            cond=torch.randn(512, 32, generator=generator),
            uncond=torch.randn(512, 32, generator=generator) if cfg else None,
            guidance=4.0,
        )
        for t, cfg in ((999, True), (950, False))
    ]
    with torch.inference_mode():
        computed = cached_guided_forward(split, items, [None, None], [True, True])
        plain = guided_forward(tiny.transformer, items)
        # a residual reused on the very step it came from gives back that step's prediction
        reused = cached_guided_forward(split, items, computed.residuals, [True, True])
        mixed = cached_guided_forward(split, items, [computed.residuals[0], None], [True, False])
    assert [tuple(r.shape) for r in computed.residuals] == [(2, 72, 24), (1, 72, 24)]
    assert computed.num_rows == 3 and reused.num_rows == 0 and mixed.num_rows == 1
    assert reused.residuals == [None, None] and mixed.residuals == [None, None]
    for index in range(2):
        assert torch.equal(computed.noise[index], plain[index])
        assert max_diff(reused.noise[index], plain[index]) <= ROUNDING
        assert max_diff(mixed.noise[index], plain[index]) <= ROUNDING


def test_published_wan22_curve_drops_where_our_schedule_switches_experts() -> None:
    curve = MagnitudeCurve.load(WAN22_T2V_A14B_CURVE)
    assert curve.num_steps == 40 and curve.cond[0] == curve.uncond[0] == 1.0
    assert "Zehong-Ma/MagCache" in curve.source
    high = expert_step_indices(wan_scheduler(12.0), 40, 0.875, "high")
    assert high == list(range(26))  # 26 high-noise steps, as the published run's boundary
    switch = min(range(40), key=lambda step: curve.cond[step])
    assert switch == 26 and curve.cond[26] < 0.7  # the residual jumps to the other expert's there
    assert all(0.78 < ratio < 1.01 for step, ratio in enumerate(curve.uncond) if step != 26)
    resampled = curve.resampled(8)  # nearest index, as MagCache's nearest_interp
    assert resampled.cond == tuple(curve.cond[i] for i in (0, 6, 11, 17, 22, 28, 33, 39))


def test_magcache_decision_skips_while_the_accumulated_error_stays_under_the_threshold() -> None:
    def pattern(**settings) -> list[str]:
        cache = RequestCache(StepCacheSettings(**settings), ratios=[1.0, 0.99, 0.99, 0.99, 0.9], max_bytes=16)
        out = []
        for index in range(5):
            decision = cache.decide(index)
            cache.commit(decision)
            out.append("S" if decision.skip else "C")
        return out

    # error after steps 1, 2, 3: 0.01, 0.0299, 0.0596; step 4's ratio 0.9 alone is 0.1
    assert pattern(threshold=0.05, max_skip=2, warmup_steps=1) == ["C", "S", "S", "C", "C"]
    assert pattern(threshold=0.05, max_skip=1, warmup_steps=1) == ["C", "S", "C", "S", "C"]
    assert pattern(threshold=0.05, max_skip=2, warmup_steps=3) == ["C", "C", "C", "S", "C"]
    assert pattern(threshold=0.0, max_skip=2, warmup_steps=0) == ["C"] * 5  # 0 never skips
    assert pattern(threshold=1.0, max_skip=0, warmup_steps=0) == ["C"] * 5


def test_a_request_that_skips_its_next_step_spends_no_token_budget() -> None:
    scheduler = StepScheduler("high", max_num_tokens=150, max_batch_size=8)
    for name in ("a", "b", "c"):
        scheduler.add(planned(name, tokens=100))
    scheduler.requests["a"].skips_next = True
    plan = scheduler.schedule()
    assert plan.request_ids == ["a", "b"] and plan.skips == [True, False] and plan.num_tokens == 100


def test_calibration_measures_the_residual_ratios_of_the_blocks() -> None:
    components = build_preset("tiny")
    request = calibration_request(components.model, steps=8)
    measured = calibrate(components, request)
    # the same ratios from hooks on the plain transformers' first and last blocks during a Denoiser run
    seen: list[torch.Tensor] = []  # forward -> its (rows, tokens, dim) residual
    hooks = []
    for transformer in (components.transformer, components.transformer_2):
        inputs: list[torch.Tensor] = []
        hooks.append(
            transformer.blocks[0].register_forward_pre_hook(lambda _m, args, a=inputs: a.append(args[0]))
        )
        hooks.append(
            transformer.blocks[-1].register_forward_hook(
                lambda _m, _a, out, a=inputs: seen.append(out - a.pop())
            )
        )
    encoder = TextEncoder(components.tokenizer, components.text_encoder, max_sequence_length=512)
    prompt, negative = encoder.encode([request.prompt, request.negative_prompt])
    state = initial_state(request, components.model)
    for expert, transformer, guidance in (
        ("high", components.transformer, request.guidance_high),
        ("low", components.transformer_2, request.guidance_low),
    ):
        denoiser = Denoiser(transformer, components.scheduler, expert=expert, boundary_ratio=0.875)
        state = denoiser.run(state, prompt, negative, guidance)
    for hook in hooks:
        hook.remove()
    assert len(seen) == measured.num_steps == 8
    for step in range(1, 8):
        ratios = (seen[step].norm(dim=-1) / seen[step - 1].norm(dim=-1)).mean(dim=1)
        assert abs(float(ratios[0]) - measured.cond[step]) <= 5e-5, step
        assert abs(float(ratios[1]) - measured.uncond[step]) <= 5e-5, step
    assert measured.cond[0] == measured.uncond[0] == 1.0
    assert "calibrate('tiny', 96x64" in measured.source


# ---- the engine --------------------------------------------------------------------------------------------


def test_threshold_zero_engine_equals_the_uncached_engine_exactly(
    tiny: WanComponents, encoder: TextEncoder, curve: MagnitudeCurve
) -> None:
    cases = [
        make_case(tiny, encoder, "z1", seed=1),
        make_case(tiny, encoder, "z22", seed=2, steps=6),
        make_case(tiny, encoder, "z333", seed=3, guidance_high=1.0, guidance_low=1.0),  # no CFG
    ]
    never = StepCacheSettings(threshold=0.0, max_skip=3, warmup_steps=0)
    for expert in ("high", "low"):
        results = {}
        for cache in (None, never):
            engine = engine_for(tiny, curve, expert)
            joins = {
                i: [engine_request(case, expert, case.state, cache=cache)] for i, case in enumerate(cases)
            }
            futures, _ = drive(engine, joins)
            results[cache] = ({name: future.result() for name, future in futures.items()}, engine.stats())
        (plain, plain_stats), (cached, cached_stats) = results[None], results[never]
        for case in cases:
            assert torch.equal(cached[case.request_id].latents, plain[case.request_id].latents), (
                case.request_id
            )
            case.state = plain[case.request_id]  # the low expert continues from here
        assert cached_stats.num_forwards == plain_stats.num_forwards
        assert cached_stats.num_rows == plain_stats.num_rows and cached_stats.num_cached_steps == 0


def test_skipped_steps_take_no_rows_and_no_forwards(
    tiny: WanComponents, encoder: TextEncoder, curve: MagnitudeCurve
) -> None:
    case = make_case(tiny, encoder, "skip", seed=5)
    plain, plain_engine = run_alone(tiny, curve, case, None)
    cached, engine = run_alone(tiny, curve, case, CACHING)
    skips = expected_skips(curve, CACHING, list(range(6)), 8)
    num_skipped = sum(skips)
    assert 0 < num_skipped < 6, skips  # the settings skip some steps of the 6 high-noise ones
    stats = engine.stats()
    assert stats.num_cached_steps == num_skipped
    assert plain_engine.num_forwards == 6 and plain_engine.stats().num_rows == 12
    assert engine.num_forwards == 6 - num_skipped and stats.num_rows == 2 * (6 - num_skipped)
    assert cached.step_index == plain.step_index == 6
    assert bool(torch.isfinite(cached.latents).all()) and max_diff(cached.latents, plain.latents) > 0


def test_requests_caching_at_different_steps_in_one_engine_equal_each_alone(
    tiny: WanComponents, encoder: TextEncoder, curve: MagnitudeCurve
) -> None:
    cases = [
        make_case(tiny, encoder, "m1", seed=11),
        make_case(tiny, encoder, "m22", seed=12, steps=6),
        make_case(tiny, encoder, "m333", seed=13, guidance_high=1.0, guidance_low=1.0),  # no CFG
    ]
    caches = {
        "m1": CACHING,
        "m22": StepCacheSettings(threshold=0.03, max_skip=1, warmup_steps=2),
        "m333": StepCacheSettings(threshold=0.05, max_skip=2, warmup_steps=0),
    }
    high_alone = {c.request_id: run_alone(tiny, curve, c, caches[c.request_id])[0] for c in cases}
    low_alone = {
        c.request_id: run_alone(tiny, curve, c, caches[c.request_id], "low", high_alone[c.request_id])[0]
        for c in cases
    }
    engine = engine_for(tiny, curve, "high")
    joins = {0: [cases[0]], 1: [cases[1]], 3: [cases[2]]}
    futures, plans = drive(
        engine, {i: [engine_request(c, cache=caches[c.request_id]) for c in js] for i, js in joins.items()}
    )
    high = {name: future.result() for name, future in futures.items()}
    low_engine = engine_for(tiny, curve, "low")
    futures, low_plans = drive(
        low_engine,
        {0: [engine_request(c, "low", high[c.request_id], cache=caches[c.request_id]) for c in cases]},
    )
    low = {name: future.result() for name, future in futures.items()}
    for case in cases:
        name = case.request_id
        diffs = [
            max_diff(high[name].latents, high_alone[name].latents),
            max_diff(low[name].latents, low_alone[name].latents),
        ]
        print(f"{name}: batched vs alone max abs diff, high {diffs[0]:.1e}, low {diffs[1]:.1e}")
        assert max(diffs) <= MAX_ABS_DIFF, name
    mixed = [plan for plan in plans + low_plans if any(plan.skips) and not all(plan.skips)]
    assert mixed, "no forward had one member skipping while another computed"
    assert any(len(set(plan.timesteps)) > 1 for plan in plans)
    assert engine.stats().num_cached_steps + low_engine.stats().num_cached_steps > 0


def test_one_request_denoiser_skips_the_steps_magcaches_rule_picks_and_hands_over_to_the_low_expert(
    tiny: WanComponents, encoder: TextEncoder, curve: MagnitudeCurve
) -> None:
    case = make_case(tiny, encoder, "solo", seed=21)
    state, plain_state = case.state, case.state
    steps = {"high": list(range(6)), "low": [6, 7]}  # the tiny preset's 8 steps split 6 / 2
    for expert, transformer, guidance in (
        ("high", tiny.transformer, case.guidance_high),
        ("low", tiny.transformer_2, case.guidance_low),
    ):
        denoiser = Denoiser(
            transformer,
            tiny.scheduler,
            expert=expert,
            boundary_ratio=tiny.model.boundary_ratio,
            cache_curve=curve,
        )
        state = denoiser.run(state, case.prompt, case.negative, guidance, cache=CACHING)
        plain_state = denoiser.run(plain_state, case.prompt, case.negative, guidance)
        skips = expected_skips(curve, CACHING, steps[expert], 8)
        assert denoiser.num_cached_steps == sum(skips), expert
        assert denoiser.num_forwards == 2 * len(steps[expert]) - sum(skips), expert
        assert state.step_index == plain_state.step_index == steps[expert][-1] + 1
    assert state.is_done and sum(expected_skips(curve, CACHING, steps["high"], 8)) > 0
    assert bool(torch.isfinite(state.latents).all()) and max_diff(state.latents, plain_state.latents) > 0


def stored_ids(stored) -> set[str]:
    return {request_id for request_id, _ in stored}


def test_each_cache_holds_one_residual_and_is_freed_when_its_request_leaves(
    tiny: WanComponents, encoder: TextEncoder, curve: MagnitudeCurve
) -> None:
    cases = {
        name: make_case(tiny, encoder, name, seed=30 + i)
        for i, name in enumerate(("done", "cut", "boom", "nc"))
    }

    def boom(done: int, total: int) -> None:
        if done == 2:
            raise KeyError("progress sink went away")

    engine = engine_for(tiny, curve)
    futures = {
        "done": engine.submit(engine_request(cases["done"], cache=CACHING)),
        "cut": engine.submit(engine_request(cases["cut"], cache=CACHING)),
        "boom": engine.submit(engine_request(cases["boom"], cache=CACHING, on_progress=boom)),
        "nc": engine.submit(engine_request(cases["nc"])),
    }
    engine.step()
    one = 2 * 3 * 4 * 6 * SplitTransformer(tiny.transformer).inner_dim * 4  # rows x tokens x dim x fp32
    stats = engine.stats()
    assert stats.num_cache_bytes == stats.max_cache_bytes == 3 * one  # the no-cache request holds none
    stored = engine.store.residuals  # the runner's store: (request id, row) -> residual
    assert {key[0] for key in stored} == {"done", "cut", "boom"} and len(stored) == 6  # cond + uncond each
    residuals = {
        name: [weakref.ref(t) for key, t in stored.items() if key[0] == name] for name in stored_ids(stored)
    }
    engine.cancel("cut")
    engine.step()  # "boom" fails in its second step's progress report
    assert all(ref() is None for ref in residuals["cut"] + residuals["boom"])
    with pytest.raises(RequestCancelled):
        futures["cut"].result()
    with pytest.raises(RequestFailed, match="KeyError"):
        futures["boom"].result()
    stats = engine.stats()
    assert stats.num_cache_bytes <= stats.max_cache_bytes == one
    while not futures["done"].done() or not futures["nc"].done():
        engine.step()
        assert engine.stats().num_cache_bytes <= engine.stats().max_cache_bytes
    futures["done"].result()
    assert all(ref() is None for ref in residuals["done"])
    stats = engine.stats()
    assert (stats.num_cache_bytes, stats.max_cache_bytes) == (0, 0) and not engine._live


def test_a_cache_request_needs_a_curve_and_the_final_default_is_magcaches_setting(
    tiny: WanComponents, encoder: TextEncoder
) -> None:
    engine = engine_for(tiny, None)
    with pytest.raises(ValueError, match="request 'nocurve': `cache` needs the expert's magnitude curve"):
        engine.submit(engine_request(make_case(tiny, encoder, "nocurve"), cache=CACHING))
    assert StepCacheSettings(threshold=0.06, max_skip=2, warmup_steps=10) == DEFAULT_FINAL_CACHE


def test_one_process_generate_skips_steps_when_the_request_asks(tmp_path) -> None:
    pipeline = LocalPipeline(build_preset("tiny"))
    spec = RequestSpec(
        prompt="a crane over rooftops", resolution="96x64", duration=0.5, steps=8, seed=3, cache=None
    )
    plain = pipeline.generate(spec, tmp_path / "plain.mp4")  # `cache` named None: every step runs
    assert sum(denoiser.num_cached_steps for denoiser in pipeline.denoisers.values()) == 0
    cached = pipeline.generate(spec.model_copy(update={"cache": CACHING}), tmp_path / "cached.mp4")
    assert sum(denoiser.num_cached_steps for denoiser in pipeline.denoisers.values()) == 3 + 1
    assert cached.path.stat().st_size > 0 and plain.request.cache is None and cached.request.cache == CACHING
