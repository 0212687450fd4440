"""Sharded experts: Ulysses x CFG-parallel engines on gloo give the one-process Denoiser's latents.

Every group runs in spawned processes on this CPU (gloo); rank 0 drives a DenoiseEngine per expert
through one GroupRunner, the other ranks serve `worker_loop`. The reference runs here, unsharded.
Drafts, LoRAs and cached steps on a group: tests/test_sharded_engine.py.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import socket
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.denoise import DenoiseEngine, Denoiser, DenoiseState, EngineRequest, initial_state
from pipeline.denoise.forward import GuidedInput
from pipeline.denoise.parallel import (
    GroupRunner,
    ParallelDegree,
    ShardedForward,
    ShardGroup,
    ShardGroupError,
    allowed_sizes,
    shape_problem,
    worker_loop,
)
from pipeline.denoise.runner import Holding, LocalRunner
from pipeline.spec import ModelSpec, RequestSpec, resolve
from pipeline.text import TextEncoder
from pipeline.weights import WanComponents, build_preset

MAX_ABS_DIFF = 1e-5  # fp32; sharding reorders no reduction but batching changes matmul shapes
WIDE, TALL = "96x64", "64x96"  # two buckets: latents (16, 3, 8, 12) and (16, 3, 12, 8), 72 tokens each
NUM_TOKENS = 3 * 4 * 6
# name -> (resolution, seed, guidance_high, guidance_low); "b" runs without CFG in both experts
CASES = {"a": (WIDE, 1, 4.0, 3.0), "b": (WIDE, 2, 1.0, 1.0), "c": (TALL, 3, 5.0, 2.0)}
JOINS = {"high": {0: ["a"], 1: ["c", "b"]}, "low": {0: ["c"], 1: ["a", "b"]}}  # iteration -> joining
STEPS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_group(target, degree: ParallelDegree, out: Path, *args) -> None:
    """Run `target(rank, world_size, port, degree, out, *args)` on every rank of a gloo group."""
    mp.start_processes(
        target,
        args=(degree.world_size, free_port(), degree, out, *args),
        nprocs=degree.world_size,
        join=True,
        start_method="spawn",
    )


# ---- what each rank runs (spawned) -------------------------------------------------------------------------


def request_states(tiny: WanComponents) -> dict[str, tuple]:
    """name -> (initial state, prompt, negative, guidance_high, guidance_low), as every rank 0 builds it."""
    encoder = TextEncoder(
        tiny.tokenizer, tiny.text_encoder, max_sequence_length=tiny.model.max_sequence_length
    )
    out = {}
    for name, (resolution, seed, high, low) in CASES.items():
        spec = RequestSpec(
            prompt=f"shot {name}: a crane move over rooftops",
            negative_prompt="blurry",
            resolution=resolution,
            duration=0.5,
            steps=STEPS,
            seed=seed,
            guidance_high=high,
            guidance_low=low,
        )
        resolved = resolve(spec, tiny.model)
        prompt, negative = encoder.encode([resolved.prompt, resolved.negative_prompt])
        out[name] = (initial_state(resolved, tiny.model), prompt, negative, high, low)
    return out


def drive(engine: DenoiseEngine, joins: dict[int, list[EngineRequest]]) -> dict[str, DenoiseState]:
    futures = {}
    for iteration in itertools.count():
        for request in joins.get(iteration, []):
            futures[request.request_id] = engine.submit(request)
        if iteration > max(joins) and all(future.done() for future in futures.values()):
            return {name: future.result() for name, future in futures.items()}
        engine.step()
        assert iteration < 100, "engine made no progress"
    raise AssertionError("unreachable")


def engine_rank(rank: int, world_size: int, port: int, degree: ParallelDegree, out: Path) -> None:
    torch.set_num_threads(1)  # ranks share this machine's two cores
    group = ShardGroup.init(
        rank, world_size, "127.0.0.1", port, ulysses=degree.ulysses, cfg=degree.cfg, timeout_s=120
    )
    tiny = build_preset("tiny")
    transformers = {"high": group.shard(tiny.transformer), "low": group.shard(tiny.transformer_2)}
    holdings = {expert: Holding(transformer) for expert, transformer in transformers.items()}
    seen: list[int] = []  # sequence length of every self-attention input on this rank
    for transformer in transformers.values():
        transformer.blocks[0].attn1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    if rank != 0:
        num_forwards = worker_loop(group, holdings)
        torch.save({"seen": seen, "num_forwards": num_forwards}, out / f"rank{rank}.pt")
        group.close()
        return
    cases = request_states(tiny)
    states = {name: case[0] for name, case in cases.items()}
    results = {}
    runner = GroupRunner(group, holdings)
    for expert, transformer in transformers.items():
        engine = DenoiseEngine(
            transformer,
            tiny.scheduler,
            expert=expert,
            boundary_ratio=tiny.model.boundary_ratio,
            max_sequence_length=tiny.model.max_sequence_length,
            clock=functools.partial(next, map(float, itertools.count())),
            runner=runner,
        )
        joins = {
            iteration: [
                EngineRequest(
                    request_id=name,
                    state=states[name],
                    prompt=cases[name][1],
                    negative_prompt=cases[name][2],
                    guidance=cases[name][3] if expert == "high" else cases[name][4],
                )
                for name in names
            ]
            for iteration, names in JOINS[expert].items()
        }
        states = drive(engine, joins)
        results[expert] = {name: state.latents for name, state in states.items()}
        results[f"{expert}_forwards"] = engine.num_forwards
    group.close()
    torch.save(results | {"seen": seen, "num_forwards": group.num_forwards}, out / "rank0.pt")


# ---- the reference and the tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, torch.Tensor]]:
    """expert -> name -> latents after that expert, from the one-process Denoiser."""
    tiny = build_preset("tiny")
    cases = request_states(tiny)
    out: dict[str, dict[str, torch.Tensor]] = {"high": {}, "low": {}}
    for name, (state, prompt, negative, high, low) in cases.items():
        for expert, transformer, guidance in (
            ("high", tiny.transformer, high),
            ("low", tiny.transformer_2, low),
        ):
            denoiser = Denoiser(
                transformer, tiny.scheduler, expert=expert, boundary_ratio=tiny.model.boundary_ratio
            )
            before, state = state, denoiser.run(state, prompt, negative, guidance)
            assert state.step_index > before.step_index, (name, expert)  # both experts run steps
            out[expert][name] = state.latents
        assert state.is_done
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory):
    """degree -> rank -> what that rank saved; each degree's group runs once per module."""
    runs: dict[ParallelDegree, dict[int, dict]] = {}

    def run(degree: ParallelDegree) -> dict[int, dict]:
        if degree not in runs:
            out = tmp_path_factory.mktemp(f"u{degree.ulysses}c{degree.cfg}")
            run_group(engine_rank, degree, out)
            runs[degree] = {rank: torch.load(out / f"rank{rank}.pt") for rank in range(degree.world_size)}
        return runs[degree]

    return run


@pytest.mark.parametrize(
    "degree",
    [ParallelDegree(ulysses=2), ParallelDegree(cfg=2), ParallelDegree(ulysses=2, cfg=2)],
    ids=["ulysses2", "cfg2", "ulysses2xcfg2"],
)
def test_sharded_engine_equals_one_process_denoiser(degree: ParallelDegree, reference, sharded) -> None:
    ranks = sharded(degree)
    leader = ranks[0]
    for expert in ("high", "low"):
        for name in CASES:
            diff = float((leader[expert][name] - reference[expert][name]).abs().max())
            print(f"{degree}: {expert} {name} max abs diff {diff:.3e}")
            assert diff <= MAX_ABS_DIFF, (expert, name, diff)
    num_forwards = leader["high_forwards"] + leader["low_forwards"]
    assert num_forwards < 2 * STEPS * len(CASES)  # requests shared forwards (staggered joins batched)
    assert all(rank["num_forwards"] == num_forwards for rank in ranks.values())  # every rank ran each one


@pytest.mark.parametrize(
    "degree", [ParallelDegree(ulysses=2), ParallelDegree(ulysses=2, cfg=2)], ids=["ulysses2", "ulysses2xcfg2"]
)
def test_each_rank_attention_sees_one_ulysses_share_of_the_tokens(degree: ParallelDegree, sharded) -> None:
    for rank, saved in sharded(degree).items():
        assert saved["seen"], rank
        assert set(saved["seen"]) == {NUM_TOKENS // degree.ulysses}, rank


def test_cfg_parallel_alone_keeps_every_token_on_each_rank(sharded) -> None:
    for saved in sharded(ParallelDegree(cfg=2)).values():
        assert set(saved["seen"]) == {NUM_TOKENS}


# ---- shape rules -------------------------------------------------------------------------------------------


def test_video_tokens_of_the_presets_match_the_model_facts() -> None:
    model = ModelSpec()
    assert model.num_video_tokens(1280, 720, 81) == 75_600
    assert model.num_video_tokens(832, 480, 81) == 32_760
    assert model.num_video_tokens(96, 64, 9) == NUM_TOKENS


def test_presets_at_81_frames_run_at_every_degree_that_divides_the_40_heads() -> None:
    model = ModelSpec()
    for ulysses in (1, 2, 4, 5, 8):
        degree = ParallelDegree(ulysses=ulysses)
        assert allowed_sizes(81, degree, model=model, num_heads=40) == [
            (832, 480),
            (480, 832),
            (1280, 720),
            (720, 1280),
        ]
        assert shape_problem(1280, 720, 81, degree, model=model, num_heads=40) is None


def test_a_size_whose_tokens_do_not_divide_is_refused_naming_the_allowed_sizes() -> None:
    model = ModelSpec()
    # 5 latent frames x 3 x 5 = 75 tokens: odd
    problem = shape_problem(80, 48, 17, ParallelDegree(ulysses=2), model=model, num_heads=40)
    assert problem == (
        "size 80x48 at 17 frames has 75 video tokens, which do not divide by the Ulysses degree 2; "
        "sizes accepted at 17 frames: 832x480, 480x832, 1280x720, 720x1280 "
        "(or any size whose latent frames x height/16 x width/16 divides by 2)"
    )
    assert shape_problem(80, 48, 17, ParallelDegree(cfg=2), model=model, num_heads=40) is None
    # 720p at 17 frames: 5 x 45 x 80 = 18,000 tokens divide by 8; 480p: 5 x 30 x 52 = 7,800 too
    assert allowed_sizes(17, ParallelDegree(ulysses=8), model=model, num_heads=40) == allowed_sizes(
        17, ParallelDegree(), model=model, num_heads=40
    )
    odd = [(80, 48)]
    assert allowed_sizes(17, ParallelDegree(ulysses=2), model=model, num_heads=40, candidates=odd) == []


def test_a_degree_that_does_not_divide_the_heads_allows_no_size() -> None:
    model = ModelSpec()
    degree = ParallelDegree(ulysses=3)
    assert allowed_sizes(81, degree, model=model, num_heads=40) == []
    assert shape_problem(832, 480, 81, degree, model=model, num_heads=40) == (
        "the model's 40 attention heads do not divide by the Ulysses degree 3; "
        "allowed degrees: 1, 2, 4, 5, 8, 10, 20, 40"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(ulysses=0), "`ulysses` must be >= 1 but is 0."),
        (dict(cfg=3), "`cfg` must be 1 or 2 but is 3."),
    ],
)
def test_bad_degrees_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ParallelDegree(**fields)


# ---- previz generate --ulysses N [--cfg-parallel] ----------------------------------------------------------


def decoded_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack(
            [frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])]
        )


def generate_both_ways(tmp_path: Path, args: list[str], flags: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(frames written in one process, frames written with `flags` sharding the experts)."""
    from tests.test_cli import previz  # here, so that spawned ranks do not import the CLI

    one, sharded = tmp_path / "one.mp4", tmp_path / "sharded.mp4"
    for out, extra in ((one, []), (sharded, flags)):
        result = previz(*args, *extra, "-o", str(out))
        assert result.returncode == 0, result.stderr
    return decoded_frames(one), decoded_frames(sharded)


GENERATE = [
    "generate",
    "a man leaps from a tower",
    "--resolution",
    "96x64",
    "--duration",
    "0.5",
    "--seed",
    "3",
]


@pytest.mark.parametrize("flags", [["--ulysses", "2"], ["--cfg-parallel"]], ids=["ulysses2", "cfg2"])
def test_generate_sharded_writes_the_same_frames_as_one_process(tmp_path: Path, flags: list[str]) -> None:
    reference, sharded = generate_both_ways(tmp_path, [*GENERATE, "--steps", "4"], flags)
    assert reference.shape == (9, 64, 96, 3)
    assert np.array_equal(sharded, reference)


@pytest.mark.parametrize(
    "extra",
    # the draft tier: the built-in distill LoRA on every rank; a cached final: at 12 steps and 0.06 the
    # tiny preset skips 2 of its 2 + 10 steps' low-noise blocks (warm-up 10), each rank its own shard
    [["--quality", "draft"], ["--steps", "12", "--cache-threshold", "0.06"]],
    ids=["draft", "cached"],
)
def test_generate_a_draft_or_a_cached_final_over_ulysses_2_writes_the_same_frames(
    tmp_path: Path, extra: list[str]
) -> None:
    reference, sharded = generate_both_ways(tmp_path, [*GENERATE, *extra], ["--ulysses", "2"])
    assert reference.shape == (9, 64, 96, 3)
    assert np.array_equal(sharded, reference)


def test_generate_refuses_a_size_whose_tokens_do_not_divide_before_starting_ranks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_cli import previz_in_process

    # 80x48 at 9 frames: 3 latent frames x 3 x 5 = 45 tokens, odd
    args = ["generate", "x", "--resolution", "80x48", "--duration", "0.5", "--steps", "2", "--ulysses", "2"]
    code, stderr = previz_in_process(args, monkeypatch, capsys)
    assert code == 2
    assert "size 80x48 at 9 frames has 45 video tokens, which do not divide by the Ulysses degree 2" in stderr


def test_generate_refuses_a_degree_the_heads_do_not_divide(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_cli import previz_in_process

    code, stderr = previz_in_process(["generate", "x", "--steps", "2", "--ulysses", "3"], monkeypatch, capsys)
    assert code == 2
    assert "the model's 2 attention heads do not divide by the Ulysses degree 3" in stderr


# ---- faults: no rank waits forever -------------------------------------------------------------------------


def fault_rank(
    rank: int, world_size: int, port: int, degree: ParallelDegree, out: Path, scenario: str
) -> None:
    """Rank 0 and rank 1 of a Ulysses-2 group acting out `scenario`; each saves what it saw."""
    torch.set_num_threads(1)
    group = ShardGroup.init(rank, world_size, "127.0.0.1", port, ulysses=degree.ulysses, timeout_s=3)
    tiny = build_preset("tiny")
    transformer = group.shard(tiny.transformer)
    outcome = "ok"
    if rank == 1:
        if scenario == "worker dies":
            os._exit(0)  # gone without a word, as a killed actor
        started = time.monotonic()
        try:
            worker_loop(group, {"high": transformer})
        except ShardGroupError as error:
            outcome = f"{type(error).__name__}: {error}"
        (out / "rank1.txt").write_text(f"{outcome}\n{time.monotonic() - started:.1f}")
        os._exit(0)  # a failed gloo group cannot be destroyed cleanly
    inputs = [
        GuidedInput(
            latents=torch.randn(16, 3, 8, 12),
            timestep=torch.tensor(999),
            cond=torch.randn(tiny.model.max_sequence_length, 32),
            uncond=None,
            guidance=1.0,
        )
    ]
    forward = ShardedForward(group, transformer, "high")
    if scenario == "keepalive":
        group.start_keepalive(interval_s=1.0)
    if scenario in ("leader silent", "keepalive"):
        time.sleep(6)  # twice the collective timeout
    try:
        with torch.inference_mode():
            forward(inputs)
    except ShardGroupError as error:
        outcome = f"{type(error).__name__}: {error}"
    (out / "rank0.txt").write_text(outcome)
    if outcome == "ok":
        group.close()
    os._exit(0)


def run_fault(scenario: str, tmp_path: Path) -> dict[int, str]:
    run_group(fault_rank, ParallelDegree(ulysses=2), tmp_path, scenario)
    return {
        rank: (tmp_path / f"rank{rank}.txt").read_text()
        for rank in (0, 1)
        if (tmp_path / f"rank{rank}.txt").exists()
    }


def test_a_dead_worker_makes_rank_0s_next_forward_raise(tmp_path: Path) -> None:
    seen = run_fault("worker dies", tmp_path)
    assert seen[0].startswith("ShardGroupError: rank 0 of 2: could not ")


def test_a_worker_whose_rank_0_went_silent_leaves_within_the_timeout(tmp_path: Path) -> None:
    seen = run_fault("leader silent", tmp_path)
    outcome, _seconds = seen[1].splitlines()
    # The timeout, not rank 0's late command (it wakes after 6 s), ended the wait: no wall-clock bound,
    # which a loaded machine could break.
    assert outcome.startswith(
        "ShardGroupError: rank 1 of 2: could not wait for a command from rank 0 within 3 s"
    )


def test_keepalive_keeps_an_idle_group_alive_past_the_timeout(tmp_path: Path) -> None:
    seen = run_fault("keepalive", tmp_path)
    assert seen[0] == "ok"
    assert seen[1].startswith("ok")


def test_a_broken_group_fails_the_iteration_instead_of_retrying_each_request() -> None:
    tiny = build_preset("tiny")
    cases = request_states(tiny)
    calls = []

    class BrokenGroup(LocalRunner):  # where a GroupRunner stands when a rank of its group died
        def run(self, plan, inputs):
            calls.append(len(inputs))
            raise ShardGroupError("rank 1 of 2: could not receive the rows")

    engine = DenoiseEngine(
        tiny.transformer,
        tiny.scheduler,
        expert="high",
        boundary_ratio=tiny.model.boundary_ratio,
        max_sequence_length=tiny.model.max_sequence_length,
        runner=BrokenGroup({"high": Holding(tiny.transformer)}),
    )
    for name in ("a", "b"):
        state, prompt, negative, high, _ = cases[name]
        engine.submit(EngineRequest(name, state, prompt, negative, high))
    with pytest.raises(ShardGroupError, match="could not receive the rows"):
        engine.step()
    assert calls == [2]  # one batched forward, no one-by-one retries on a broken group


@pytest.mark.parametrize(
    ("rank", "world_size", "message"),
    [
        (0, 3, "`world_size` must be ulysses x cfg = 4 but is 3."),
        (4, 4, "`rank` must be in 0..3 but is 4."),
    ],
)
def test_group_arguments_are_checked_before_joining(rank: int, world_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ShardGroup.init(rank, world_size, "127.0.0.1", free_port(), ulysses=2, cfg=2, timeout_s=1)
