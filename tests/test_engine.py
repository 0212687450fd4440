"""DenoiseEngine: step-level continuous batching equals the single-request Denoiser, and schedules well."""

from __future__ import annotations

import asyncio
import itertools
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass

import pytest
import torch

from pipeline.denoise import (
    DenoiseEngine,
    Denoiser,
    DenoiseState,
    EngineError,
    EngineRequest,
    EngineShutdown,
    QueuePlace,
    RequestCancelled,
    RequestFailed,
    ScheduledRequest,
    StepBatch,
    StepScheduler,
    initial_state,
)
from pipeline.spec import RequestSpec, resolve
from pipeline.text import PromptEmbeds, TextEncoder
from pipeline.weights import WanComponents, build_preset

MAX_ABS_DIFF = 0.0  # batch-invariant layers (pipeline.determinism): engine == Denoiser, bit for bit
WIDE, TALL = "96x64", "64x96"  # two buckets: latents (16, 3, 8, 12) and (16, 3, 12, 8)
TOKENS_WITH_CFG = 2 * 3 * 4 * 6  # latent frames x (h/16) x (w/16), doubled for CFG


# ---- the planner, no model -------------------------------------------------------------------------------


def planned(
    request_id: str,
    bucket: tuple[int, ...] = (16, 3, 8, 12),
    *,
    priority: str = "batch",
    arrival: float = 0.0,
    deadline: float | None = None,
    tokens: int = 100,
    timesteps: tuple[int, ...] = (999, 950),
) -> ScheduledRequest:
    return ScheduledRequest(
        request_id=request_id,
        bucket=bucket,
        priority=priority,
        arrival_time=arrival,
        deadline=deadline,
        num_tokens=tokens,
        guidance=4.0,
        timesteps=list(timesteps),
        num_steps_total=len(timesteps),
    )


def planner(
    *requests: ScheduledRequest, max_num_tokens: int = 1000, max_batch_size: int = 8
) -> StepScheduler:
    scheduler = StepScheduler("high", max_num_tokens=max_num_tokens, max_batch_size=max_batch_size)
    for request in requests:
        scheduler.add(request)
    return scheduler


def test_empty_planner_plans_an_empty_batch() -> None:
    plan = planner().schedule()
    assert plan == StepBatch.make_empty("high")
    assert plan.is_empty and plan.num_tokens == 0 and plan.bucket is None


def test_plan_serves_the_bucket_of_the_most_urgent_request_most_urgent_first() -> None:
    other = (16, 3, 12, 8)
    scheduler = planner(
        planned("old-batch", other, arrival=0.0),
        planned("late-batch", arrival=5.0, timesteps=(950,)),
        planned("deadline-later", arrival=3.0, priority="interactive", deadline=20.0),
        planned("no-deadline", arrival=1.0, priority="interactive"),
        planned("deadline-soon", arrival=4.0, priority="interactive", deadline=10.0),
    )
    plan = scheduler.schedule()
    assert plan.bucket == (16, 3, 8, 12)
    assert plan.request_ids == ["deadline-soon", "deadline-later", "no-deadline", "late-batch"]
    assert plan.timesteps == [999, 999, 999, 950]
    assert plan.num_tokens == 400 and plan.guidance == [4.0] * 4


def test_plan_stops_at_the_token_budget_and_the_batch_size_cap() -> None:
    requests = [planned(f"r{i}", arrival=i) for i in range(5)]
    assert planner(*requests, max_num_tokens=250).schedule().request_ids == ["r0", "r1"]
    requests = [planned(f"r{i}", arrival=i) for i in range(5)]
    plan = planner(*requests, max_batch_size=3).schedule()
    assert plan.request_ids == ["r0", "r1", "r2"] and plan.num_skipped == 2


def test_request_larger_than_the_budget_runs_alone_instead_of_starving() -> None:
    scheduler = planner(planned("huge", tokens=5000), planned("small", arrival=1.0), max_num_tokens=1000)
    plan = scheduler.schedule()
    assert plan.request_ids == ["huge"] and plan.num_tokens == 5000
    assert scheduler.advance("huge") is False and scheduler.advance("huge") is True
    scheduler.remove("huge")
    assert scheduler.schedule().request_ids == ["small"]


# ---- the engine on the tiny model --------------------------------------------------------------------------


@dataclass
class Case:
    """One request as both the engine and the reference Denoiser see it."""

    request_id: str
    state: DenoiseState
    prompt: PromptEmbeds
    negative: PromptEmbeds
    guidance_high: float
    guidance_low: float


@pytest.fixture(scope="module")
def tiny() -> WanComponents:
    return build_preset("tiny")


@pytest.fixture(scope="module")
def encoder(tiny: WanComponents) -> TextEncoder:
    return TextEncoder(tiny.tokenizer, tiny.text_encoder, max_sequence_length=tiny.model.max_sequence_length)


def make_case(
    tiny: WanComponents, encoder: TextEncoder, request_id: str, *, resolution: str = WIDE, **fields
) -> Case:
    spec = RequestSpec(
        **{"prompt": f"shot {request_id}: a crane move over rooftops", "negative_prompt": "blurry"}
        | {"resolution": resolution, "duration": 0.5, "steps": 8, "seed": len(request_id) * 7 + 11}
        | fields
    )
    resolved = resolve(spec, tiny.model)
    prompt, negative = encoder.encode([resolved.prompt, resolved.negative_prompt])
    return Case(
        request_id,
        initial_state(resolved, tiny.model),
        prompt,
        negative,
        resolved.guidance_high,
        resolved.guidance_low,
    )


def engine_for(tiny: WanComponents, expert: str = "high", **settings) -> DenoiseEngine:
    clock = itertools.count()  # deterministic arrival order for step()-driven tests
    return DenoiseEngine(
        tiny.transformer if expert == "high" else tiny.transformer_2,
        tiny.scheduler,
        expert=expert,
        boundary_ratio=tiny.model.boundary_ratio,
        max_sequence_length=tiny.model.max_sequence_length,
        clock=lambda: float(next(clock)),
        **settings,
    )


def engine_request(
    case: Case, expert: str = "high", state: DenoiseState | None = None, **fields
) -> EngineRequest:
    return EngineRequest(
        request_id=case.request_id,
        state=state or case.state,
        prompt=case.prompt,
        negative_prompt=case.negative,
        guidance=case.guidance_high if expert == "high" else case.guidance_low,
        **fields,
    )


def reference(tiny: WanComponents, case: Case, expert: str = "high", state: DenoiseState | None = None):
    denoiser = Denoiser(
        tiny.transformer if expert == "high" else tiny.transformer_2,
        tiny.scheduler,
        expert=expert,
        boundary_ratio=tiny.model.boundary_ratio,
    )
    guidance = case.guidance_high if expert == "high" else case.guidance_low
    return denoiser.run(state or case.state, case.prompt, case.negative, guidance)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def drive(engine: DenoiseEngine, joins: dict[int, list[EngineRequest]]) -> tuple[dict[str, Future], list]:
    """Step until every request is done; `joins` maps iteration -> requests submitted before it."""
    futures: dict[str, Future] = {}  # req_id -> its result
    plans: list[StepBatch] = []
    for iteration in itertools.count():
        for request in joins.get(iteration, []):
            futures[request.request_id] = engine.submit(request)
        if iteration > max(joins) and all(future.done() for future in futures.values()):
            return futures, plans
        plans.append(engine.step())
        assert iteration < 200, "engine made no progress"
    raise AssertionError("unreachable")


def run_alone(tiny: WanComponents, cases: list[Case]) -> dict[str, DenoiseState]:
    return {case.request_id: reference(tiny, case) for case in cases}


def test_batched_denoise_equals_single_request(tiny: WanComponents, encoder: TextEncoder) -> None:
    cases = [
        make_case(tiny, encoder, "a", seed=1),
        make_case(tiny, encoder, "bb", seed=2, steps=6, guidance_high=5.0),  # another schedule
        make_case(tiny, encoder, "ccc", seed=3, guidance_high=1.0),  # no CFG: one row in the forward
        make_case(tiny, encoder, "d", resolution=TALL, seed=4),
        make_case(tiny, encoder, "ee", resolution=TALL, seed=5, steps=6, guidance_low=2.0),
        make_case(tiny, encoder, "fff", resolution=TALL, seed=6, negative_prompt="static"),
    ]
    a, b, c, d, e, f = cases
    high_ref = run_alone(tiny, cases)
    low_ref = {case.request_id: reference(tiny, case, "low", high_ref[case.request_id]) for case in cases}

    high_joins = {0: [a, d], 1: [b], 2: [e, c], 3: [f]}
    futures, plans = drive(
        engine_for(tiny, "high"), {i: [engine_request(case) for case in js] for i, js in high_joins.items()}
    )
    high_out = {name: future.result() for name, future in futures.items()}
    low_joins = {0: [f, b], 1: [a, e, c], 2: [d]}
    futures, low_plans = drive(
        engine_for(tiny, "low"),
        {i: [engine_request(x, "low", high_out[x.request_id]) for x in js] for i, js in low_joins.items()},
    )
    low_out = {name: future.result() for name, future in futures.items()}

    for case in cases:
        name = case.request_id
        assert high_out[name].step_index == high_ref[name].step_index
        assert max_diff(high_out[name].latents, high_ref[name].latents) <= MAX_ABS_DIFF, name
        assert low_out[name].is_done
        assert max_diff(low_out[name].latents, low_ref[name].latents) <= MAX_ABS_DIFF, name
    for runs in (plans, low_plans):
        assert max(plan.num_requests for plan in runs) >= 3
        assert any(len(set(plan.timesteps)) > 1 for plan in runs)  # members at different timesteps
        assert {plan.bucket for plan in runs} == {tuple(a.state.latents.shape), tuple(d.state.latents.shape)}
    assert all(plan.expert == "high" for plan in plans) and all(plan.expert == "low" for plan in low_plans)


def test_one_forward_per_iteration_serves_all_same_bucket_requests(
    tiny: WanComponents, encoder: TextEncoder
) -> None:
    cases = [make_case(tiny, encoder, f"n{i}", seed=10 + i) for i in range(4)]
    engine = engine_for(tiny)
    calls = []
    hook = tiny.transformer.register_forward_pre_hook(lambda _m, _a, kw: calls.append(kw), with_kwargs=True)
    try:
        futures = [engine.submit(engine_request(case)) for case in cases]
        while not all(future.done() for future in futures):
            engine.step()
    finally:
        hook.remove()
    num_steps = futures[0].result().step_index  # the high expert's steps: 6 of 8
    assert num_steps == 6
    assert len(calls) == engine.num_forwards == num_steps  # not 4 x 6, and not 2 x 4 x 6 with CFG
    assert all(kw["hidden_states"].shape[0] == 8 and kw["timestep"].shape == (8,) for kw in calls)
    assert engine.stats().batch_size_histogram == {4: num_steps}


def test_interactive_arrival_runs_next_iteration_and_finishes_first(
    tiny: WanComponents, encoder: TextEncoder
) -> None:
    backlog = [make_case(tiny, encoder, f"batch{i}", seed=20 + i) for i in range(4)]
    urgent = make_case(tiny, encoder, "urgent", seed=30)
    engine = engine_for(tiny, max_num_tokens=TOKENS_WITH_CFG)  # the budget fits one request
    finished: list[str] = []
    futures = [engine.submit(engine_request(case)) for case in backlog]
    plans = [engine.step()]
    futures.append(engine.submit(engine_request(urgent, priority="interactive")))
    for future, name in zip(futures, [*(case.request_id for case in backlog), "urgent"], strict=True):
        future.add_done_callback(lambda _f, name=name: finished.append(name))
    while not all(future.done() for future in futures):
        plans.append(engine.step())
    assert plans[0].request_ids == ["batch0"]
    assert [plan.request_ids for plan in plans[1:7]] == [["urgent"]] * 6
    assert finished[0] == "urgent"
    assert all(plan.num_tokens <= TOKENS_WITH_CFG for plan in plans)
    assert max_diff(futures[-1].result().latents, reference(tiny, urgent).latents) <= MAX_ABS_DIFF


def test_interactive_arrival_joins_the_running_batch_when_the_budget_allows(
    tiny: WanComponents, encoder: TextEncoder
) -> None:
    backlog = [make_case(tiny, encoder, f"batch{i}", seed=20 + i) for i in range(4)]
    engine = engine_for(tiny, max_num_tokens=2 * TOKENS_WITH_CFG)
    for case in backlog:
        engine.submit(engine_request(case))
    assert engine.step().request_ids == ["batch0", "batch1"]
    engine.submit(engine_request(make_case(tiny, encoder, "urgent"), priority="interactive"))
    plan = engine.step()
    assert plan.request_ids == ["urgent", "batch0"] and plan.num_tokens == 2 * TOKENS_WITH_CFG


def test_a_request_waiting_for_its_first_step_hears_its_place_in_the_queue(
    tiny: WanComponents, encoder: TextEncoder
) -> None:
    engine = engine_for(tiny, max_num_tokens=TOKENS_WITH_CFG)  # the budget fits one request
    heard: dict[str, list[int]] = {}  # req_id -> the places it was told, in order

    def submit(name: str, **fields) -> Future:
        report = lambda place, name=name: heard.setdefault(name, []).append(place.num_ahead)  # noqa: E731
        return engine.submit(engine_request(make_case(tiny, encoder, name), on_waiting=report, **fields))

    futures = [submit(name) for name in ("a", "b", "c")]
    assert engine.step().request_ids == ["a"]
    assert heard == {"b": [1], "c": [2]}
    futures.append(submit("urgent", priority="interactive"))
    assert engine.step().request_ids == ["urgent"]
    assert heard == {"b": [1, 2], "c": [2, 3]}  # "a" has started: it is running, not queued
    while not all(future.done() for future in futures):
        engine.step()
    assert heard == {"b": [1, 2, 1], "c": [2, 3, 2, 1]}  # told again only when the place changed
    assert "a" not in heard and "urgent" not in heard


def test_a_waiting_request_hears_the_work_ahead_at_the_replicas_measured_rate_once_measured(
    tiny: WanComponents, encoder: TextEncoder
) -> None:
    engine = engine_for(tiny, max_num_tokens=TOKENS_WITH_CFG)  # the budget fits one request
    heard: list[QueuePlace] = []
    first = engine.submit(engine_request(make_case(tiny, encoder, "a")))
    engine.submit(engine_request(make_case(tiny, encoder, "b"), on_waiting=heard.append))
    assert engine.step().request_ids == ["a"]
    assert heard == [QueuePlace(1, None, None)]  # nothing measured on this replica yet: no figure
    a = engine.scheduler.requests["a"]
    rate, step_s = engine.stats().seconds_per_token, engine.seconds_per_step(a.bucket, "final")
    steps_left = len(a.timesteps)
    assert steps_left >= 2 and rate > 0 and step_s is not None
    assert engine.step().request_ids == ["a"]
    # a's CFG tokens x its steps left, at the seconds per token its first iteration measured
    assert heard[1:] == [QueuePlace(1, TOKENS_WITH_CFG * steps_left * rate, step_s)]
    assert engine.step().request_ids == ["a"]
    assert len(heard) == 2  # the same place, both figures measured: not told again
    while not first.done():
        engine.step()


def test_cancelled_request_leaves_at_next_boundary_and_frees_its_tensors(
    tiny: WanComponents, encoder: TextEncoder
) -> None:
    cases = [make_case(tiny, encoder, f"k{i}", seed=40 + i) for i in range(3)]
    engine = engine_for(tiny)
    futures = [engine.submit(engine_request(case)) for case in cases]
    assert engine.step().request_ids == ["k0", "k1", "k2"]
    latents = weakref.ref(engine._live["k1"].latents)
    assert engine.cancel("k1") is True
    assert engine.step().request_ids == ["k0", "k2"]
    with pytest.raises(RequestCancelled, match="request 'k1' was cancelled") as raised:
        futures[1].result()
    assert isinstance(raised.value, EngineError)
    assert latents() is None
    while not all(future.done() for future in futures):
        engine.step()
    for index in (0, 2):
        assert (
            max_diff(futures[index].result().latents, reference(tiny, cases[index]).latents) <= MAX_ABS_DIFF
        )
    assert engine.cancel("k1") is False and engine.cancel("k0") is False  # gone / already finished
    assert engine.stats().num_cancelled == 1 and engine.stats().num_finished == 2


def test_request_cancelled_before_its_first_step_never_runs(
    tiny: WanComponents, encoder: TextEncoder
) -> None:
    engine = engine_for(tiny)
    future = engine.submit(engine_request(make_case(tiny, encoder, "early")))
    engine.cancel("early")
    assert engine.step().is_empty and engine.num_forwards == 0
    with pytest.raises(RequestCancelled, match="'early'"):
        future.result()


def test_nan_latents_fail_only_their_request(tiny: WanComponents, encoder: TextEncoder) -> None:
    good = [make_case(tiny, encoder, f"ok{i}", seed=50 + i) for i in range(2)]
    bad = make_case(tiny, encoder, "nan")
    bad.state.latents[0, 0, 0, 0] = float("nan")
    engine = engine_for(tiny)
    futures = [engine.submit(engine_request(case)) for case in (good[0], bad, good[1])]
    while not all(future.done() for future in futures):
        engine.step()
    with pytest.raises(RequestFailed, match=r"request 'nan' failed in the high engine: .*not finite"):
        futures[1].result()
    for case, future in zip(good, (futures[0], futures[2]), strict=True):
        assert max_diff(future.result().latents, reference(tiny, case).latents) <= MAX_ABS_DIFF
    assert engine.stats().num_failed == 1


def test_failing_forward_is_retried_one_by_one_so_only_the_culprit_fails(
    tiny: WanComponents, encoder: TextEncoder
) -> None:
    good = [make_case(tiny, encoder, f"fine{i}", seed=60 + i) for i in range(2)]
    poisoned = make_case(tiny, encoder, "poison")
    poisoned.state.latents.fill_(7.0)  # the hook below refuses any forward holding this sample

    def refuse_poison(_module, _args, kwargs):
        if (kwargs["hidden_states"].flatten(1) == 7.0).all(dim=1).any():
            raise RuntimeError("device-side assert on a poisoned sample")

    def broken_progress(done: int, total: int) -> None:
        raise KeyError("progress sink went away")

    engine = engine_for(tiny)
    futures = [engine.submit(engine_request(case)) for case in (good[0], poisoned, good[1])]
    futures.append(engine.submit(engine_request(make_case(tiny, encoder, "cb"), on_progress=broken_progress)))
    hook = tiny.transformer.register_forward_pre_hook(refuse_poison, with_kwargs=True)
    try:
        while not all(future.done() for future in futures):
            engine.step()
    finally:
        hook.remove()
    with pytest.raises(RequestFailed, match="'poison'.*its forward raised RuntimeError: device-side assert"):
        futures[1].result()
    with pytest.raises(RequestFailed, match="'cb'.*KeyError"):
        futures[3].result()
    for case, future in zip(good, (futures[0], futures[2]), strict=True):
        assert max_diff(future.result().latents, reference(tiny, case).latents) <= MAX_ABS_DIFF
    assert engine.num_forwards == 1 + 4 + 5  # the batch of 4 fails, 4 solo retries, 5 more steps of 2


def test_request_whose_next_step_belongs_to_the_other_expert_resolves_unchanged(
    tiny: WanComponents, encoder: TextEncoder
) -> None:
    case = make_case(tiny, encoder, "handoff")
    low = engine_for(tiny, "low")
    future = low.submit(engine_request(case, "low"))
    assert future.done() and future.result() is case.state
    high_done = reference(tiny, case)
    assert engine_for(tiny).submit(engine_request(case, state=high_done)).result() is high_done


def test_stats_report_queues_batches_and_tokens(tiny: WanComponents, encoder: TextEncoder) -> None:
    cases = [make_case(tiny, encoder, f"s{i}") for i in range(3)] + [
        make_case(tiny, encoder, "t", resolution=TALL)
    ]
    engine = engine_for(tiny)
    for case in cases:
        engine.submit(engine_request(case))
    wide, tall = tuple(cases[0].state.latents.shape), tuple(cases[3].state.latents.shape)
    before = engine.stats()
    assert before.num_queued_by_bucket == {wide: 3, tall: 1} and before.num_waiting == 4
    engine.step()
    after = engine.stats()
    assert after.num_queued_by_bucket == {wide: 3, tall: 1}
    assert (after.num_running, after.num_waiting, after.num_iterations, after.num_forwards) == (3, 1, 1, 1)
    assert after.batch_size_histogram == {3: 1} and after.mean_batch_size == 3.0
    assert after.mean_num_tokens == 3 * TOKENS_WITH_CFG and after.iterations_per_second > 0
    # queued work (what the router reads): tokens x steps left; the three stepped requests lost one step each
    num_steps = before.num_queued_token_steps / (4 * TOKENS_WITH_CFG)
    assert num_steps == int(num_steps) >= 2 and before.queued_work_seconds == 0.0  # no rate measured yet
    assert after.num_queued_token_steps == before.num_queued_token_steps - 3 * TOKENS_WITH_CFG
    assert after.queued_work_seconds > 0


def test_malformed_requests_are_rejected_at_submit(tiny: WanComponents, encoder: TextEncoder) -> None:
    engine = engine_for(tiny)
    case = make_case(tiny, encoder, "dup")
    engine.submit(engine_request(case))
    with pytest.raises(ValueError, match="request 'dup' is already in the high engine"):
        engine.submit(engine_request(case))
    wrong = make_case(tiny, encoder, "wrong")
    wrong.prompt = PromptEmbeds(embeds=torch.zeros(4, 7))
    with pytest.raises(ValueError, match=r"`prompt` embeddings must be \(1..512, 32\) but are \(4, 7\)"):
        engine.submit(engine_request(wrong))


def test_shutdown_fails_unfinished_requests(tiny: WanComponents, encoder: TextEncoder) -> None:
    engine = engine_for(tiny)
    running = engine.submit(engine_request(make_case(tiny, encoder, "r")))
    engine.step()
    queued = engine.submit(engine_request(make_case(tiny, encoder, "q")))
    engine.shutdown()
    for name, future in (("r", running), ("q", queued)):
        with pytest.raises(EngineShutdown, match=f"shut down before request '{name}' finished"):
            future.result()
    with pytest.raises(EngineShutdown):
        engine.submit(engine_request(make_case(tiny, encoder, "late")))


def test_async_add_through_the_engine_thread(tiny: WanComponents, encoder: TextEncoder) -> None:
    cases = [make_case(tiny, encoder, f"as{i}", seed=70 + i) for i in range(3)]
    cases.append(make_case(tiny, encoder, "tall", resolution=TALL, seed=74))
    engine = engine_for(tiny)
    progress: list[tuple[int, int]] = []
    resume = threading.Event()

    def self_cancel(done: int, total: int) -> None:
        engine.cancel("self-cancel")

    def hold(done: int, total: int) -> None:
        resume.wait(timeout=10)  # keeps the engine thread in step 1 until the caller has cancelled

    async def main() -> list[DenoiseState]:
        first = engine.add(engine_request(cases[0], on_progress=lambda *p: progress.append(p)))
        others = [engine.add(engine_request(case)) for case in cases[1:]]
        doomed = engine.add(engine_request(make_case(tiny, encoder, "self-cancel"), on_progress=self_cancel))
        abandoned = engine.add(engine_request(make_case(tiny, encoder, "abandoned"), on_progress=hold))
        abandoned.cancel()  # the caller stops waiting: the engine is told to drop the request
        await asyncio.sleep(0)  # lets the awaitable's done-callback call engine.cancel()
        resume.set()
        results = await asyncio.gather(first, *others)
        with pytest.raises(RequestCancelled, match="'self-cancel'"):
            await doomed
        return results

    engine.start()
    assert engine.is_alive()
    try:
        results = asyncio.run(main())
        with pytest.raises(RuntimeError, match="start"):
            engine.step()
    finally:
        engine.shutdown(timeout=10)
    for case, state in zip(cases, results, strict=True):
        assert max_diff(state.latents, reference(tiny, case).latents) <= MAX_ABS_DIFF
    assert progress == [(done, 6) for done in range(1, 7)]
    stats = engine.stats()
    assert (stats.num_finished, stats.num_cancelled) == (4, 2)
    assert not engine.is_alive()
