"""Wan2.2-I2V-A14B through the same engine: the `tiny-i2v` preset (real diffusers classes, 36 input
channels) conditioned on a storyboard panel equals diffusers' WanImageToVideoPipeline, with and without a
last frame; I2V requests batch with each other (each row as if alone) and never with T2V rows; a draft
(distill LoRA) batched in the engine equals its one-process run; the preset round-trips the Diffusers
layout."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
from PIL import Image
from transformers import UMT5EncoderModel

from pipeline.denoise import DenoiseEngine, DenoiseState, EngineRequest
from pipeline.denoise.experts import expert_step_indices
from pipeline.denoise.state import initial_state, tier_solvers
from pipeline.local import LocalPipeline
from pipeline.spec import I2V_MODEL, RequestSpec, model_spec, resolve
from pipeline.text import TextEncoder
from pipeline.vae_encode import Keyframes, VAEEncoder, condition_mask
from pipeline.weights import (
    PRESETS,
    WanComponents,
    build_preset,
    load_components,
    save_components,
    source_task,
    wan_pipeline,
)
from serve.jobs.keyframes import save_keyframes
from serve.stages.encoder import KeyframeConditions
from serve.stages.payloads import EncodeImageCall
from serve.storage import JobArtifacts, LocalArtifactStore
from tests.support.wan_reference import MAX_ABS_DIFF, panel, run_diffusers_i2v_latents, tiny_request

WIDTH, HEIGHT = 96, 64


@pytest.fixture(scope="module")
def tiny_i2v() -> WanComponents:
    return build_preset("tiny-i2v")


@pytest.fixture(scope="module")
def pipeline(tiny_i2v: WanComponents, tmp_path_factory: pytest.TempPathFactory) -> LocalPipeline:
    return LocalPipeline(tiny_i2v, cache_dir=tmp_path_factory.mktemp("loras"))


def keyframes(seed: int = 1, *, last: bool = False) -> Keyframes:
    return Keyframes(
        first=panel(WIDTH, HEIGHT, seed), last=panel(WIDTH, HEIGHT, seed + 100) if last else None
    )


# ---- the presets and the recipe ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-i2v", "small-i2v"])
def test_i2v_presets_are_the_real_classes_with_the_condition_channels(name: str) -> None:
    components = build_preset(name)
    assert components.task == "i2v" and source_task(name) == "i2v"
    for expert in (components.transformer, components.transformer_2):
        assert isinstance(expert, WanTransformer3DModel)
        assert (expert.config.in_channels, expert.config.out_channels) == (36, 16)
        assert expert.config.image_dim is None  # Wan2.2 I2V has no image encoder
    assert isinstance(components.vae, AutoencoderKLWan) and components.vae.config.z_dim == 16
    assert isinstance(components.text_encoder, UMT5EncoderModel)
    assert components.model == I2V_MODEL
    assert isinstance(wan_pipeline(components), WanImageToVideoPipeline)
    t2v = build_preset(name.removesuffix("-i2v"))
    assert t2v.task == "t2v" and t2v.transformer.config.in_channels == 16
    # its own seed: not the T2V preset's weights with wider input
    assert PRESETS[name].seed != PRESETS[name.removesuffix("-i2v")].seed


def test_i2v_recipe_is_the_official_one_and_the_boundary_gives_its_split() -> None:
    i2v = model_spec("i2v")
    assert (i2v.num_steps, i2v.flow_shift, i2v.boundary_ratio) == (40, 5.0, 0.9)
    assert (i2v.guidance_high, i2v.guidance_low) == (3.5, 3.5)
    components = build_preset("tiny-i2v")
    solvers = tier_solvers(i2v, components.scheduler)
    for quality in ("final", "draft"):
        recipe = i2v.recipe(quality)
        high = expert_step_indices(solvers[quality], recipe.steps, i2v.boundary_ratio, "high")
        assert len(high) == recipe.num_high_steps, quality  # 15 of 40; the draft's 2 of 4
    assert i2v.recipe("draft").adapter == "distill"


def test_i2v_preset_saved_in_the_diffusers_layout_loads_back_the_same(tmp_path: Path) -> None:
    components = build_preset("tiny-i2v")
    folder = save_components(components, tmp_path / "wan-i2v")
    index = (folder / "model_index.json").read_text()
    assert '"WanImageToVideoPipeline"' in index and '"boundary_ratio": 0.9' in index
    loaded = load_components(str(folder), device="cpu")
    assert loaded.task == "i2v" and source_task(str(folder)) == "i2v"
    assert loaded.model.boundary_ratio == 0.9 and loaded.model.flow_shift == 5.0
    assert loaded.scheduler.config.flow_shift == 5.0
    for name in ("transformer", "transformer_2", "vae", "text_encoder"):
        original, back = getattr(components, name).state_dict(), getattr(loaded, name).state_dict()
        assert original.keys() == back.keys()
        assert all(torch.equal(original[key], back[key]) for key in original), name


# ---- the condition -----------------------------------------------------------------------------------------


def test_condition_mask_marks_the_given_frames_as_diffusers_lays_them_out() -> None:
    mask = condition_mask(9, (3, 2, 2), has_last=False)
    assert mask.shape == (4, 3, 2, 2)
    assert mask[:, 0].eq(1).all() and mask[:, 1:].eq(0).all()  # the first latent frame is frame 0 four times
    with_last = condition_mask(9, (3, 2, 2), has_last=True)
    assert with_last[:, 0].eq(1).all() and with_last[:, 1].eq(0).all()
    assert with_last[:, 2].tolist() == [[[0.0] * 2] * 2] * 3 + [[[1.0] * 2] * 2]  # frame 8 is slot 3


def test_vae_encoder_refuses_keyframes_it_cannot_encode(tiny_i2v: WanComponents) -> None:
    encoder = VAEEncoder(tiny_i2v.vae)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        encoder.encode(keyframes(), 8)
    with pytest.raises(ValueError, match="uint8"):
        Keyframes(first=panel(WIDTH, HEIGHT, 1).astype(np.float32))
    with pytest.raises(ValueError, match="same size"):
        Keyframes(first=panel(WIDTH, HEIGHT, 1), last=panel(WIDTH + 16, HEIGHT, 2))


def test_a_retried_i2v_job_reuses_its_kept_condition_and_does_not_encode_again(
    tiny_i2v: WanComponents, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VAEEncoder's first attempt at a job encodes its stored keyframes and keeps the condition beside
    them; a retry of the job (on a fresh replica: a lost one is why jobs retry) reads it back without
    calling the encoder and gets the very same array. A clip of another length is encoded again."""
    artifacts = LocalArtifactStore(tmp_path)
    given = keyframes(7, last=True)
    save_keyframes(artifacts, "p", "vid_retry", Image.fromarray(given.first), Image.fromarray(given.last))
    encoder = VAEEncoder(tiny_i2v.vae)
    real_encode, encoded = encoder.encode, []

    def counted(frames: Keyframes, num_frames: int) -> torch.Tensor:  # the real encoder, its calls counted
        encoded.append(num_frames)
        return real_encode(frames, num_frames)

    monkeypatch.setattr(encoder, "encode", counted)
    call = EncodeImageCall(project="p", job_id="vid_retry", num_frames=9)
    first_try, seconds = asyncio.run(KeyframeConditions(encoder, artifacts).condition(call))
    assert encoded == [9] and seconds > 0 and artifacts.exists(JobArtifacts("p", "vid_retry").condition)
    np.testing.assert_array_equal(first_try, real_encode(given, 9).numpy())  # the stored PNGs are lossless

    retry = KeyframeConditions(encoder, artifacts)
    again, seconds = asyncio.run(retry.condition(call))
    assert encoded == [9] and (retry.num_encodes, retry.num_reused, seconds) == (0, 1, 0.0)
    assert again.dtype == first_try.dtype and again.shape == first_try.shape
    assert again.tobytes() == first_try.tobytes()

    longer_clip = EncodeImageCall(project="p", job_id="vid_retry", num_frames=13)
    longer, _seconds = asyncio.run(retry.condition(longer_clip))
    assert encoded == [9, 13] and longer.shape[1] == 4  # 13 frames: 4 latent frames, not the kept 3


# ---- equality with diffusers -------------------------------------------------------------------------------


@pytest.mark.parametrize("with_last", [False, True], ids=["first", "first+last"])
def test_tiny_i2v_through_the_engine_equals_diffusers_wan_image_to_video_pipeline(
    tiny_i2v: WanComponents, pipeline: LocalPipeline, with_last: bool
) -> None:
    request = tiny_request(resolution=f"{WIDTH}x{HEIGHT}")
    frames = keyframes(3, last=with_last)
    ours = pipeline.latents(request, frames)
    # a fresh build of the seeded preset: the same weights, and no LoRA adapter loaded into them
    reference = run_diffusers_i2v_latents(build_preset("tiny-i2v"), request, frames.first, frames.last)
    assert ours.shape == reference.shape == (16, 3, HEIGHT // 8, WIDTH // 8)
    diff = float((ours - reference).abs().max())
    print(f"I2V engine vs WanImageToVideoPipeline ({'first+last' if with_last else 'first'}): {diff:.3e}")
    assert diff <= MAX_ABS_DIFF
    # the keyframes matter: another panel gives other latents
    other = pipeline.latents(request, keyframes(4, last=with_last))
    assert float((other - ours).abs().max()) > 1e-3


def test_the_local_pipeline_asks_for_keyframes_on_i2v_and_refuses_them_on_t2v(
    pipeline: LocalPipeline, tmp_path: Path
) -> None:
    request = tiny_request(resolution=f"{WIDTH}x{HEIGHT}")
    with pytest.raises(ValueError, match="needs `keyframes`"):
        pipeline.latents(request)
    with pytest.raises(ValueError, match="resize and crop"):
        pipeline.latents(request, Keyframes(first=panel(WIDTH + 16, HEIGHT, 1)))
    t2v = LocalPipeline(build_preset("tiny"), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="image-to-video model"):
        t2v.latents(request, keyframes())


# ---- the engine: I2V batches with I2V ----------------------------------------------------------------------


def engine(components: WanComponents, expert: str, banks: dict | None = None) -> DenoiseEngine:
    """An engine of `expert`; `banks`: the adapters loaded into the experts (expert -> AdapterBank), which
    it switches per plan (without them a LoRA left active by an earlier draft would stay on)."""
    clock = itertools.count()
    return DenoiseEngine(
        components.transformer if expert == "high" else components.transformer_2,
        components.scheduler,
        expert=expert,
        boundary_ratio=components.model.boundary_ratio,
        max_sequence_length=components.model.max_sequence_length,
        clock=lambda: float(next(clock)),
        solvers=tier_solvers(components.model, components.scheduler),
        adapters=(banks or {}).get(expert),
    )


def i2v_case(components: WanComponents, name: str, seed: int, **fields) -> dict:
    spec = RequestSpec(
        **{"prompt": f"{name}: the hero leaps out of the fireball", "negative_prompt": "blurry"}
        | {"resolution": f"{WIDTH}x{HEIGHT}", "duration": 0.5, "steps": 4, "seed": seed, "cache": None}
        | fields
    )
    resolved = resolve(spec, components.model)
    text = TextEncoder(components.tokenizer, components.text_encoder)
    prompt, negative = text.encode([resolved.prompt, resolved.negative_prompt])
    frames = keyframes(seed, last=name.endswith("last"))
    return {
        "spec": spec,
        "keyframes": frames,
        "state": initial_state(resolved, components.model),
        "condition": VAEEncoder(components.vae).encode(frames, resolved.num_frames),
        "prompt": prompt,
        "negative": negative,
        "guidance": {"high": resolved.guidance_high, "low": resolved.guidance_low},
        "quality": resolved.quality,
        "adapters": resolved.adapters(components.model),
    }


def engine_request(name: str, case: dict, expert: str, state: DenoiseState, **fields) -> EngineRequest:
    return EngineRequest(
        request_id=name,
        state=state,
        prompt=case["prompt"],
        negative_prompt=case["negative"],
        guidance=case["guidance"][expert],
        quality=case["quality"],
        adapters=case["adapters"],
        condition=case["condition"],
        **fields,
    )


def banks_of(pipeline: LocalPipeline) -> dict:
    return {expert: pipeline.denoisers[expert].engine.adapters for expert in ("high", "low")}


def through_both(components: WanComponents, cases: dict[str, dict], banks: dict):
    """name -> final latents, every case submitted together to one high and one low engine; and the
    largest batch either engine ran."""
    states = {name: case["state"] for name, case in cases.items()}
    largest = 0
    for expert in ("high", "low"):
        run = engine(components, expert, banks)
        futures = {
            name: run.submit(engine_request(name, case, expert, states[name])) for name, case in cases.items()
        }
        while not all(future.done() for future in futures.values()):
            largest = max(largest, run.step().num_requests)
        states = {name: future.result() for name, future in futures.items()}
    return {name: state.latents for name, state in states.items()}, largest


def test_batched_i2v_rows_each_equal_running_alone(tiny_i2v: WanComponents, pipeline: LocalPipeline) -> None:
    cases = {
        "a": i2v_case(tiny_i2v, "a", 11),
        "b": i2v_case(tiny_i2v, "b", 12, guidance_high=5.0),
        "c-last": i2v_case(tiny_i2v, "c-last", 13),  # first and last frame, in the same batch
        "d": i2v_case(tiny_i2v, "d", 14, guidance_high=1.0, guidance_low=1.0),  # no CFG: one row
    }
    batched, largest = through_both(tiny_i2v, cases, banks_of(pipeline))
    assert largest == len(cases)
    for name, case in cases.items():
        alone = pipeline.latents(case["spec"], case["keyframes"])  # the one-process run
        diff = float((batched[name] - alone).abs().max())
        print(f"batched I2V row {name} vs alone: {diff:.3e}")
        assert diff <= MAX_ABS_DIFF, name


def test_an_i2v_draft_batched_in_the_engine_equals_its_one_process_run(
    tiny_i2v: WanComponents, pipeline: LocalPipeline
) -> None:
    cases = {name: i2v_case(tiny_i2v, name, seed, quality="draft") for name, seed in (("x", 21), ("y", 22))}
    assert cases["x"]["adapters"] == (("distill", 1.0),)
    batched, largest = through_both(tiny_i2v, cases, banks_of(pipeline))
    assert largest == 2
    for name, case in cases.items():
        alone = pipeline.latents(case["spec"], case["keyframes"])
        diff = float((batched[name] - alone).abs().max())
        print(f"I2V draft {name} batched vs one-process: {diff:.3e}")
        assert diff <= MAX_ABS_DIFF, name
    final = cases["x"]["spec"].model_copy(update={"quality": "final", "steps": 4})
    base = pipeline.latents(final, keyframes(21))
    assert float((base - batched["x"]).abs().max()) > 1e-3  # the distill LoRA changed the take


def test_an_i2v_engine_refuses_t2v_requests_and_a_t2v_engine_refuses_conditions(
    tiny_i2v: WanComponents,
) -> None:
    case = i2v_case(tiny_i2v, "a", 11)
    i2v = engine(tiny_i2v, "high")
    with pytest.raises(ValueError, match="image-to-video and needs a `condition`"):
        i2v.submit(engine_request("t2v-row", case | {"condition": None}, "high", case["state"]))
    wrong = case["condition"][:, :2]
    with pytest.raises(ValueError, match="`condition` must be"):
        i2v.submit(engine_request("short", case | {"condition": wrong}, "high", case["state"]))
    t2v = build_preset("tiny")
    t2v_case = i2v_case(t2v, "b", 12)
    with pytest.raises(ValueError, match="text-to-video and takes no `condition`"):
        engine(t2v, "high").submit(engine_request("i2v-row", t2v_case, "high", t2v_case["state"]))


def test_an_i2v_preset_shares_its_twins_text_encoder_and_vae_as_wan22_does() -> None:
    i2v, t2v = build_preset("tiny-i2v"), build_preset("tiny")
    for name in ("vae", "text_encoder"):
        mine, twin = getattr(i2v, name).state_dict(), getattr(t2v, name).state_dict()
        assert all(torch.equal(mine[key], twin[key]) for key in twin), name
    assert not torch.equal(
        i2v.transformer.blocks[0].ffn.net[2].weight, t2v.transformer.blocks[0].ffn.net[2].weight
    )


def test_an_i2v_model_from_s3_loads_as_i2v_and_equals_diffusers(
    s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.s3sync import upload_folder

    folder = save_components(build_preset("tiny-i2v"), tmp_path / "wan-i2v")
    client = s3_server.client()
    client.create_bucket(Bucket="previz-i2v-models")
    assert upload_folder(folder, "s3://previz-i2v-models/wan2.2/i2v", client=client) > 0
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    source = "s3://previz-i2v-models/wan2.2/i2v"
    loaded = load_components(source, device="cpu", cache_dir=tmp_path / "cache")
    assert loaded.task == "i2v" and loaded.model == I2V_MODEL
    request = tiny_request(resolution=f"{WIDTH}x{HEIGHT}", steps=4)
    ours = LocalPipeline(loaded, draft_lora=None, cache_dir=tmp_path).latents(request, keyframes(7))
    reference = run_diffusers_i2v_latents(
        load_components(source, device="cpu", cache_dir=tmp_path / "cache"), request, keyframes(7).first
    )
    assert float((ours - reference).abs().max()) <= MAX_ABS_DIFF
