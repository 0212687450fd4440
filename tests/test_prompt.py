"""Structured shot specs: field names, compiled prompt template, error texts, shot files, compose_prompt."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.prompt import ShotSpec, ShotSpecError, compose_prompt, load_shot_file, parse_shot

ALLOWED = "character/人物, action/动作, environment/环境, camera/镜头, style/风格"

FULL_EN = {
    "character": "A detective in a wet trench coat",
    "action": "walks slowly toward the neon sign",
    "environment": "a rainy Shanghai street at night",
    "camera": "low-angle slow dolly-in, 35 mm",
    "style": "film noir, high contrast",
}
FULL_EN_PROMPT = (
    "A detective in a wet trench coat walks slowly toward the neon sign, "
    "in a rainy Shanghai street at night. "
    "Camera: low-angle slow dolly-in, 35 mm. Style: film noir, high contrast."
)
FULL_ZH = {
    "人物": "一位穿着湿风衣的侦探",
    "动作": "慢慢走向霓虹灯招牌",
    "环境": "雨夜的上海街头",
    "镜头": "低角度缓慢推进",
    "风格": "黑色电影，高对比度",
}
FULL_ZH_PROMPT = (
    "一位穿着湿风衣的侦探慢慢走向霓虹灯招牌，在雨夜的上海街头。"
    "镜头：低角度缓慢推进。风格：黑色电影，高对比度。"
)
# what compiler version 1 made of it (English glue in a Chinese brief): stored jobs of that time keep it
FULL_ZH_PROMPT_V1 = (
    "一位穿着湿风衣的侦探 慢慢走向霓虹灯招牌, in 雨夜的上海街头. "
    "Camera: 低角度缓慢推进. Style: 黑色电影，高对比度."
)
ENGLISH_GLUE = re.compile(r"\b(in|In|Camera|Style)\b|[,.:]")


# --- field names -------------------------------------------------------------------------------------


def test_english_keys_populate_fields():
    shot = parse_shot(FULL_EN)
    assert shot.character == "A detective in a wet trench coat"
    assert shot.action == "walks slowly toward the neon sign"
    assert shot.environment == "a rainy Shanghai street at night"
    assert shot.camera == "low-angle slow dolly-in, 35 mm"
    assert shot.style == "film noir, high contrast"


def test_chinese_keys_populate_the_same_fields():
    shot = parse_shot(FULL_ZH)
    assert shot.character == "一位穿着湿风衣的侦探"
    assert shot.action == "慢慢走向霓虹灯招牌"
    assert shot.environment == "雨夜的上海街头"
    assert shot.camera == "低角度缓慢推进"
    assert shot.style == "黑色电影，高对比度"


def test_a_shot_names_its_fields_in_one_language():
    with pytest.raises(ShotSpecError) as info:
        parse_shot({"人物": "一位侦探", "action": "lights a cigarette", "镜头": "close-up"})
    assert str(info.value) == (
        "shot spec: name a shot's fields all in English or all in Chinese, not action with 人物, 镜头"
    )
    shot = parse_shot({"人物": "一位侦探", "动作": "lights a cigarette", "镜头": "close-up"})
    assert (shot.character, shot.action, shot.camera) == ("一位侦探", "lights a cigarette", "close-up")
    assert shot.environment is None and shot.style is None


def test_model_is_usable_directly_with_english_keywords_and_dumps_english_names():
    shot = ShotSpec(character="a robot", camera="wide shot")
    assert shot.model_dump(exclude_none=True) == {"character": "a robot", "camera": "wide shot"}
    assert ShotSpec.model_validate(shot.model_dump()) == shot


def test_json_schema_documents_every_field_under_its_english_name():
    properties = ShotSpec.model_json_schema()["properties"]
    assert list(properties) == ["character", "action", "environment", "camera", "style"]
    for name, label in zip(properties, ["人物", "动作", "环境", "镜头", "风格"], strict=True):
        assert f"Also accepted as `{label}`" in properties[name]["description"]


def test_fields_are_stripped_and_blank_fields_count_as_missing():
    shot = parse_shot({"character": "  a dancer \n", "style": "   "})
    assert shot.character == "a dancer"
    assert shot.style is None


# --- compiled prompt ---------------------------------------------------------------------------------


def test_full_english_spec_compiles_to_the_template():
    assert parse_shot(FULL_EN).to_prompt() == FULL_EN_PROMPT


def test_full_chinese_spec_keeps_its_text_verbatim_with_chinese_connectives():
    prompt = parse_shot(FULL_ZH).to_prompt()
    assert prompt == FULL_ZH_PROMPT
    assert not ENGLISH_GLUE.search(prompt), prompt  # no "in", "Camera:", "Style:", no ASCII punctuation


def test_compiler_version_1_still_compiles_as_it_did():
    assert parse_shot(FULL_ZH).to_prompt(version=1) == FULL_ZH_PROMPT_V1
    assert parse_shot(FULL_EN).to_prompt(version=1) == FULL_EN_PROMPT
    assert compose_prompt("雨", parse_shot(FULL_ZH), version=1) == f"{FULL_ZH_PROMPT_V1} 雨"
    with pytest.raises(ValueError, match="`version` must be one of"):
        parse_shot(FULL_EN).to_prompt(version=4)


def test_the_language_is_the_fields_text_not_their_names():
    assert parse_shot(FULL_ZH).language == "zh" and parse_shot(FULL_EN).language == "en"
    english_text = dict(zip(FULL_ZH, FULL_EN.values(), strict=True))  # Chinese names, English text
    assert parse_shot(english_text).language == "en"
    # a Chinese brief naming a lens or a brand in Latin letters is still Chinese
    assert parse_shot({"人物": "一个拿着 AK-47 的男人", "镜头": "35mm 推镜"}).language == "zh"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"人物": "一只猫"}, "一只猫。"),
        ({"人物": "一只猫", "动作": "跳过篱笆"}, "一只猫跳过篱笆。"),
        ({"环境": "雾气弥漫的森林"}, "在雾气弥漫的森林。"),
        ({"环境": "在沙漠里", "风格": "墨比斯"}, "在沙漠里。风格：墨比斯。"),
        ({"人物": "一只猫", "环境": "于雾中"}, "一只猫，于雾中。"),
        ({"镜头": "航拍！"}, "镜头：航拍！"),
        ({"人物": "穿 Prada 的女人", "动作": "Vogue 式走步"}, "穿 Prada 的女人Vogue 式走步。"),
        ({"人物": "穿风衣的 Neo", "动作": "Matrix 式闪避"}, "穿风衣的 Neo Matrix 式闪避。"),
    ],
)
def test_partial_chinese_specs_compile_with_chinese_glue(fields, expected):
    assert parse_shot(fields).to_prompt() == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"character": "A cat"}, "A cat."),
        ({"action": "jumps over a fence"}, "jumps over a fence."),
        ({"character": "A cat", "action": "jumps over a fence"}, "A cat jumps over a fence."),
        ({"environment": "a misty forest"}, "In a misty forest."),
        ({"character": "A cat", "environment": "a misty forest"}, "A cat, in a misty forest."),
        ({"action": "rain falls", "environment": "a misty forest"}, "rain falls, in a misty forest."),
        ({"camera": "aerial drone shot"}, "Camera: aerial drone shot."),
        ({"style": "watercolor"}, "Style: watercolor."),
        ({"environment": "a desert", "style": "Moebius"}, "In a desert. Style: Moebius."),
        (
            {"character": "A cat", "camera": "handheld", "style": "Super 8"},
            "A cat. Camera: handheld. Style: Super 8.",
        ),
    ],
)
def test_partial_specs_compile_without_dangling_glue(fields, expected):
    assert parse_shot(fields).to_prompt() == expected


def test_whitespace_inside_fields_is_collapsed():
    shot = parse_shot({"character": "A  cat\n\twith   stripes", "camera": "slow\npan"})
    assert shot.to_prompt() == "A cat with stripes. Camera: slow pan."


def test_a_multi_line_chinese_field_joins_its_lines_as_chinese_text_from_version_3():
    action = "从塔顶跃下，\n  风衣在风中展开，\n落在 GoPro\nHero 镜头前"
    shot = parse_shot({"动作": action, "镜头": "低角度\n慢动作"})
    assert shot.to_prompt() == "从塔顶跃下，风衣在风中展开，落在 GoPro Hero 镜头前。镜头：低角度慢动作。"
    # version 2 (stored jobs of that time keep it) left a space where each line broke
    v2 = "从塔顶跃下， 风衣在风中展开， 落在 GoPro Hero 镜头前。镜头：低角度 慢动作。"
    assert shot.to_prompt(version=2) == v2


def test_fields_already_ending_a_sentence_get_no_second_full_stop():
    shot = parse_shot({"action": "Run!", "camera": "low-angle dolly-in…", "style": "noir."})
    assert shot.to_prompt() == "Run! Camera: low-angle dolly-in… Style: noir."
    assert (
        parse_shot({"动作": "跑！", "镜头": "低角度缓慢推进。"}).to_prompt() == "跑！镜头：低角度缓慢推进。"
    )


def test_compiled_prompt_is_deterministic_and_independent_of_key_order():
    reordered = dict(reversed(list(FULL_EN.items())))
    prompts = {parse_shot(FULL_EN).to_prompt() for _ in range(3)} | {parse_shot(reordered).to_prompt()}
    assert prompts == {FULL_EN_PROMPT}


def test_english_and_chinese_keys_compile_identically():
    zh_keys = dict(zip(FULL_ZH, FULL_EN.values(), strict=True))
    assert parse_shot(zh_keys).to_prompt() == FULL_EN_PROMPT


# --- validation errors -------------------------------------------------------------------------------


def test_unknown_field_is_named_with_the_allowed_keys():
    with pytest.raises(ShotSpecError) as info:
        parse_shot({"character": "A cat", "lighting": "golden hour"})
    assert str(info.value) == f"shot spec: unknown field `lighting` (allowed: {ALLOWED})"


def test_several_problems_are_listed_in_one_message():
    with pytest.raises(ShotSpecError) as info:
        parse_shot({"lighting": "golden hour", "lens": "35mm", "camera": 35})
    assert str(info.value) == (
        f"shot spec: unknown fields `lighting`, `lens` (allowed: {ALLOWED}); `camera` must be text, got int"
    )


def test_same_field_under_both_names_is_an_error_naming_both_keys():
    with pytest.raises(ShotSpecError) as info:
        parse_shot({"camera": "dolly-in", "镜头": "推镜头"})
    assert str(info.value) == "shot spec: `camera` and `镜头` are the same field; give only one of them"


@pytest.mark.parametrize("fields", [{}, {"character": "", "camera": "  \n "}, {"style": None}])
def test_spec_without_any_non_empty_field_is_an_error(fields):
    with pytest.raises(ShotSpecError) as info:
        parse_shot(fields)
    assert str(info.value) == f"shot spec: at least one shot field must be non-empty ({ALLOWED})"


def test_field_longer_than_2000_characters_is_an_error():
    assert parse_shot({"环境": "雨" * 2000}).environment == "雨" * 2000
    with pytest.raises(ShotSpecError) as info:
        parse_shot({"环境": "雨" * 2001})
    assert str(info.value) == "shot spec: `环境` is too long: 2,001 characters (at most 2,000)"


def test_non_mapping_is_an_error():
    with pytest.raises(ShotSpecError, match=r"^shot spec: expected a mapping of shot fields, got a list$"):
        parse_shot(["A cat"])  # type: ignore[arg-type]


def test_model_used_directly_raises_pydantic_validation_error():
    # The HTTP API embeds ShotSpec in its request schema and turns these into 422 responses.
    with pytest.raises(ValidationError) as info:
        ShotSpec.model_validate({"lighting": "golden hour"})
    assert [(e["type"], e["loc"]) for e in info.value.errors()] == [("extra_forbidden", ("lighting",))]
    with pytest.raises(ValidationError, match="`camera` and `镜头` are the same field"):
        ShotSpec.model_validate({"camera": "a", "镜头": "b"})
    with pytest.raises(ValidationError, match="at least one shot field must be non-empty"):
        ShotSpec()


# --- shot files --------------------------------------------------------------------------------------


def test_yaml_file_with_english_keys(tmp_path: Path):
    path = tmp_path / "shot.yaml"
    path.write_text("\n".join(f"{key}: {value!r}" for key, value in FULL_EN.items()), encoding="utf-8")
    assert load_shot_file(path).to_prompt() == FULL_EN_PROMPT


def test_chinese_yaml_file_is_read_as_utf8(tmp_path: Path):
    path = tmp_path / "镜头01.yml"
    path.write_text(
        "人物: 一位穿着湿风衣的侦探\n"
        "动作: 慢慢走向霓虹灯招牌\n"
        "环境: 雨夜的上海街头\n"
        "镜头: 低角度缓慢推进\n"
        "风格: 黑色电影，高对比度\n",
        encoding="utf-8",
    )
    assert load_shot_file(path).to_prompt() == FULL_ZH_PROMPT


def test_json_file(tmp_path: Path):
    path = tmp_path / "shot.JSON"  # the extension is matched case-insensitively
    path.write_text(json.dumps(FULL_ZH, ensure_ascii=False), encoding="utf-8")
    assert load_shot_file(path).to_prompt() == FULL_ZH_PROMPT


def test_unsupported_extension_names_the_allowed_ones(tmp_path: Path):
    path = tmp_path / "shot.toml"
    path.write_text('character = "A cat"\n', encoding="utf-8")
    with pytest.raises(ShotSpecError) as info:
        load_shot_file(path)
    assert str(info.value) == f"shot file {path}: unsupported extension `.toml` (allowed: .json, .yaml, .yml)"


def test_missing_file_is_an_error_naming_it(tmp_path: Path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(ShotSpecError) as info:
        load_shot_file(path)
    assert str(info.value) == f"shot file {path}: cannot read it (No such file or directory)"


def test_malformed_yaml_names_the_file_and_the_problem(tmp_path: Path):
    path = tmp_path / "shot.yaml"
    path.write_text('character: "A cat\ncamera: wide\n', encoding="utf-8")
    with pytest.raises(ShotSpecError) as info:
        load_shot_file(path)
    assert str(info.value) == (
        f"shot file {path}: invalid YAML: found unexpected end of stream (line 3, column 1)"
    )


def test_malformed_json_names_the_file_and_the_problem(tmp_path: Path):
    path = tmp_path / "shot.json"
    path.write_text('{"character": "A cat" "camera": "wide"}', encoding="utf-8")
    with pytest.raises(ShotSpecError) as info:
        load_shot_file(path)
    assert str(info.value) == (f"shot file {path}: invalid JSON: Expecting ',' delimiter (line 1, column 23)")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("shot.yaml", "camera: wide\ncamera: close-up\n"),
        ("shot.json", '{"camera": "wide", "camera": "close"}'),
    ],
)
def test_key_repeated_inside_a_file_is_an_error_not_silently_dropped(tmp_path: Path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ShotSpecError, match=r"key `camera` appears twice"):
        load_shot_file(path)


@pytest.mark.parametrize(
    ("text", "got"),
    [("- A cat\n- jumps\n", "a list"), ("just a sentence\n", "a str"), ("", "nothing (the file is empty)")],
)
def test_top_level_that_is_not_a_mapping_is_an_error(tmp_path: Path, text: str, got: str):
    path = tmp_path / "shot.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ShotSpecError) as info:
        load_shot_file(path)
    assert str(info.value) == f"shot file {path}: the top level must be a mapping of shot fields, got {got}"


def test_invalid_fields_in_a_file_name_the_file(tmp_path: Path):
    path = tmp_path / "shot.yaml"
    path.write_text("character: A cat\nlighting: golden hour\n", encoding="utf-8")
    with pytest.raises(ShotSpecError) as info:
        load_shot_file(path)
    assert str(info.value) == f"shot file {path}: unknown field `lighting` (allowed: {ALLOWED})"


def test_file_that_is_not_utf8_is_an_error(tmp_path: Path):
    path = tmp_path / "shot.yaml"
    path.write_bytes("人物: 侦探\n".encode("gbk"))
    with pytest.raises(ShotSpecError, match=r"^shot file .*shot\.yaml: not UTF-8 text"):
        load_shot_file(path)


# --- compose_prompt ----------------------------------------------------------------------------------


def test_compose_shot_then_free_prompt():
    shot = parse_shot({"character": "A cat", "camera": "close-up"})
    assert compose_prompt("It starts to rain.", shot) == "A cat. Camera: close-up. It starts to rain."


def test_compose_free_prompt_only():
    assert compose_prompt("  A cat on a roof at dusk.  ", None) == "A cat on a roof at dusk."


def test_compose_shot_only():
    shot = parse_shot(FULL_ZH)
    assert compose_prompt(None, shot) == FULL_ZH_PROMPT
    assert compose_prompt("   ", shot) == FULL_ZH_PROMPT


@pytest.mark.parametrize("prompt", [None, "", " \n\t "])
def test_compose_without_any_text_is_an_error(prompt):
    with pytest.raises(ValueError) as info:
        compose_prompt(prompt, None)
    assert str(info.value) == "`prompt` must not be empty: give a prompt or a shot spec."
