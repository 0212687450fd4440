"""Request and model specs: presets resolve to exact sizes, durations to 4k+1 frames, bad values teach."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.spec import ModelSpec, RequestSpec, describe_validation_error, resolve

MODEL = ModelSpec()


def test_model_spec_defaults_are_the_official_wan22_t2v_settings() -> None:
    assert (MODEL.boundary_ratio, MODEL.flow_shift, MODEL.num_steps) == (0.875, 12.0, 40)
    assert (MODEL.guidance_high, MODEL.guidance_low, MODEL.fps) == (4.0, 3.0, 16)


@pytest.mark.parametrize(
    ("resolution", "aspect", "size"),
    [
        ("480p", None, (832, 480)),
        ("480p", "16:9", (832, 480)),
        ("480p", "9:16", (480, 832)),
        ("720p", None, (1280, 720)),
        ("720p", "9:16", (720, 1280)),
        ("960x544", None, (960, 544)),
        ("96X64", None, (96, 64)),
    ],
)
def test_resolution_resolves_to_exact_pixels(
    resolution: str, aspect: str | None, size: tuple[int, int]
) -> None:
    assert RequestSpec(prompt="p", resolution=resolution, aspect=aspect).size == size


@pytest.mark.parametrize(
    ("duration", "frames"), [(1, 17), (5, 81), (0.25, 5), (2.5, 41), (10, 161), (1.1, 17)]
)
def test_duration_becomes_4k_plus_1_frames(duration: float, frames: int) -> None:
    assert RequestSpec(prompt="p", duration=duration).num_frames(MODEL) == frames


def test_resolve_fills_defaults_and_draws_a_seed_when_missing() -> None:
    resolved = resolve(RequestSpec(prompt="p"), MODEL)
    assert (resolved.steps, resolved.guidance_high, resolved.guidance_low, resolved.fps) == (40, 4.0, 3.0, 16)
    assert 0 <= resolved.seed < 2**31
    assert resolve(RequestSpec(prompt="p", seed=7, steps=12), MODEL).seed == 7


def test_tokens_per_forward_match_the_model_facts() -> None:
    for resolution, tokens in (("720p", 75_600), ("480p", 32_760)):
        resolved = resolve(RequestSpec(prompt="p", resolution=resolution, duration=5), MODEL)
        assert resolved.num_tokens(MODEL) == tokens


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": ""}, "`prompt` must not be empty."),
        ({"prompt": "   "}, "`prompt` must not be empty."),
        ({"prompt": "x" * 4001}, "`prompt` has 4001 characters; at most 4000 are allowed."),
        ({"resolution": "1080p"}, "`resolution` must be 480p, 720p or WxH (e.g. 832x480) but is '1080p'."),
        (
            {"resolution": "100x96"},
            "`resolution` width must be a multiple of 16 between 32 and 1920 but is 100.",
        ),
        (
            {"resolution": "96x4000"},
            "`resolution` height must be a multiple of 16 between 32 and 1920 but is 4000.",
        ),
        ({"resolution": "96x64", "aspect": "9:16"}, "`aspect` applies to the presets 480p/720p only"),
        ({"aspect": "4:3"}, "aspect"),
        ({"duration": 0}, "`duration` must be between 0.25 and 10.0 seconds but is 0.0."),
        ({"duration": 12}, "`duration` must be between 0.25 and 10.0 seconds but is 12.0."),
        ({"steps": 0}, "`steps` must be between 1 and 100 but is 0."),
        ({"steps": 101}, "`steps` must be between 1 and 100 but is 101."),
        ({"seed": -1}, "`seed` must be between 0 and 9007199254740991 but is -1."),
        ({"guidance_high": 25}, "`guidance_high` must be between 0 and 20 but is 25.0."),
        ({"fps": 24}, "fps"),
    ],
)
def test_invalid_values_are_rejected_naming_field_value_and_allowed(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        RequestSpec(**({"prompt": "p"} | fields))
    assert message in describe_validation_error(caught.value)
