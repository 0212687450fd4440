"""Structured shots: a director describes a shot as fields and Previz compiles one T2V prompt.

A shot spec has five optional text fields, each also accepted under its Chinese label:

    character / 人物    action / 动作    environment / 环境    camera / 镜头    style / 风格

`ShotSpec.to_prompt()` compiles them, in this fixed order, in the language of the fields' text:

    English: "<character> <action>, in <environment>. Camera: <camera>. Style: <style>."
    Chinese: "<人物><动作>，在<环境>。镜头：<镜头>。风格：<风格>。"

Missing fields drop out with their glue (see `ShotSpec.to_prompt`). The compiler is versioned, because its
output is what a shot sends to the model: version 1 glued English words into every shot, version 2 speaks
the shot's language, version 3 (PROMPT_COMPILER_VERSION) also joins the lines of a multi-line Chinese
field without the space version 2 left in the Chinese text. A job stores the text it was compiled to and the
version, and a promote repeats that stored text rather than compiling the shot again.

The spec is a plain pydantic model so the HTTP API can embed it in its request schema; `parse_shot` and
`load_shot_file` are for the CLI and turn validation errors into one `ShotSpecError` a director can act on.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_FIELD_CHARS = 2_000  # per field, as sent; the whole prompt still goes through the tokenizer
# 1: English glue for every shot ("in", "Camera:", "Style:"); 2: the glue of the fields' language; 3: as 2,
# and a Chinese field's lines join as Chinese text does (no space, but between two Latin letters or digits).
PROMPT_COMPILER_VERSION = 3
COMPILER_VERSIONS = (1, 2, 3)

# English field name -> Chinese label; the order is the order the prompt is compiled in.
FIELD_LABELS: dict[str, str] = {
    "character": "人物",
    "action": "动作",
    "environment": "环境",
    "camera": "镜头",
    "style": "风格",
}
ALLOWED_KEYS = ", ".join(f"{name}/{label}" for name, label in FIELD_LABELS.items())
SHOT_FILE_SUFFIXES = (".json", ".yaml", ".yml")

_SENTENCE_ENDS = (".", "!", "?", "。", "！", "？", "…")


class ShotSpecError(ValueError):
    """A shot spec (mapping or file) that cannot be used; the message names every problem."""


def _shot_field(name: str, description: str) -> Any:
    label = FIELD_LABELS[name]
    return Field(
        default=None,
        validation_alias=AliasChoices(name, label),
        max_length=MAX_FIELD_CHARS,
        description=f"{description} Also accepted as `{label}`. At most {MAX_FIELD_CHARS:,} characters.",
    )


class ShotSpec(BaseModel):
    """One shot described as fields instead of a free prompt; at least one field must be non-empty."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    character: str | None = _shot_field(
        "character", 'Who is in the shot and how they look, e.g. "a detective in a wet trench coat".'
    )
    action: str | None = _shot_field("action", 'What they do, e.g. "walks slowly toward the neon sign".')
    environment: str | None = _shot_field(
        "environment", 'Where and when the shot happens, e.g. "a rainy Shanghai street at night".'
    )
    camera: str | None = _shot_field("camera", 'Framing and movement, e.g. "low-angle slow dolly-in, 35 mm".')
    style: str | None = _shot_field("style", 'Look of the clip, e.g. "film noir, high contrast, anamorphic".')

    @model_validator(mode="before")
    @classmethod
    def _reject_field_given_twice(cls, data: object) -> object:
        # Without this, pydantic would report the second name as an "extra input", which misleads.
        if isinstance(data, Mapping):
            for name, label in FIELD_LABELS.items():
                if name in data and label in data:
                    raise PydanticCustomError(
                        "shot_field_given_twice",
                        "`{name}` and `{label}` are the same field; give only one of them",
                        {"name": name, "label": label},
                    )
            english = sorted(key for key in data if key in FIELD_LABELS)
            chinese = sorted(key for key in data if key in FIELD_LABELS.values())
            if english and chinese:  # one language of names per shot: what the published schema states
                raise PydanticCustomError(
                    "shot_names_mixed",
                    "name a shot's fields all in English or all in Chinese, not {english} with {chinese}",
                    {"english": ", ".join(english), "chinese": ", ".join(chinese)},
                )
        return data

    @field_validator(*FIELD_LABELS, mode="before")
    @classmethod
    def _length_as_sent(cls, value: object) -> object:
        # str_strip_whitespace strips before max_length is checked; the limit holds for what was sent
        if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            raise PydanticCustomError(
                "string_too_long",
                "a shot field has at most {max_length} characters, not {length}",
                {"max_length": MAX_FIELD_CHARS, "length": len(value)},
            )
        return value

    @field_validator(*FIELD_LABELS, mode="after")
    @classmethod
    def _blank_is_missing(cls, value: str | None) -> str | None:
        return value or None  # already stripped; "" means the director left the field empty

    @model_validator(mode="after")
    def _require_one_field(self) -> ShotSpec:
        if not any((self.character, self.action, self.environment, self.camera, self.style)):
            raise PydanticCustomError(
                "shot_spec_empty",
                "at least one shot field must be non-empty ({allowed})",
                {"allowed": ALLOWED_KEYS},
            )
        return self

    @property
    def language(self) -> Literal["en", "zh"]:
        """`zh` when the fields' text is Chinese (at least as many Han characters as Latin words: one
        character says about as much as one word), else `en`."""
        text = " ".join(
            part for part in (self.character, self.action, self.environment, self.camera, self.style) if part
        )
        han = len(_HAN.findall(text))
        return "zh" if han and han >= len(_LATIN_WORD.findall(text)) else "en"

    def to_prompt(self, version: int = PROMPT_COMPILER_VERSION) -> str:
        """Compile the fields into one prompt, deterministically, with compiler `version`.

        Templates, with each present field's whitespace collapsed and its text otherwise verbatim; version
        1 always uses the English one, versions 2 and 3 the one of the fields' `language`:

            "<character> <action>, in <environment>. Camera: <camera>. Style: <style>."
            "<人物><动作>，在<环境>。镜头：<镜头>。风格：<风格>。"

        - character and action join with a space (in Chinese: directly, a space only between two Latin
          letters or digits); with neither, the environment opens the sentence as "In <environment>."
          ("在<环境>。"; no second 在 when the field starts with 在 or 于).
        - "Camera: ..." and "Style: ..." ("镜头：", "风格：") are separate sentences, left out when their
          field is missing.
        - A sentence whose field already ends in . ! ? 。 ！ ？ or … gets no extra full stop.
        - Version 3, Chinese: a field's line breaks join its lines as character and action join (a space
          only between two Latin letters or digits); version 2 collapsed them into a space.
        """
        if version not in COMPILER_VERSIONS:
            raise ValueError(f"`version` must be one of {COMPILER_VERSIONS} but is {version}.")
        chinese = version >= 2 and self.language == "zh"
        collapse = _collapse_lines if chinese and version >= 3 else _collapse
        character, action, environment, camera, style = (
            collapse(text)
            for text in (self.character, self.action, self.environment, self.camera, self.style)
        )
        if chinese:
            return _chinese_prompt(character, action, environment, camera, style)
        sentences: list[str] = []
        subject = " ".join(part for part in (character, action) if part)
        if subject and environment:
            sentences.append(f"{subject}, in {environment}")
        elif subject:
            sentences.append(subject)
        elif environment:
            sentences.append(f"In {environment}")
        if camera:
            sentences.append(f"Camera: {camera}")
        if style:
            sentences.append(f"Style: {style}")
        return " ".join(_end_sentence(sentence) for sentence in sentences)


_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_CHINESE_ENDS = ("。", "！", "？", "…", ".", "!", "?")


def _chinese_prompt(character: str, action: str, environment: str, camera: str, style: str) -> str:
    sentences: list[str] = []
    subject = _join_chinese(character, action)
    place = environment if environment.startswith(("在", "于")) else f"在{environment}"
    if subject and environment:
        sentences.append(f"{subject}，{place}")
    elif subject:
        sentences.append(subject)
    elif environment:
        sentences.append(place)
    if camera:
        sentences.append(f"镜头：{camera}")
    if style:
        sentences.append(f"风格：{style}")
    return "".join(
        sentence if sentence.endswith(_CHINESE_ENDS) else f"{sentence}。" for sentence in sentences
    )


def _join_chinese(first: str, second: str) -> str:
    if not (first and second):
        return first or second
    latin_seam = first[-1].isascii() and first[-1].isalnum() and second[0].isascii() and second[0].isalnum()
    return f"{first} {second}" if latin_seam else f"{first}{second}"


def _collapse(text: str | None) -> str:
    return " ".join(text.split()) if text else ""


def _collapse_lines(text: str | None) -> str:
    """A Chinese field: each line's whitespace collapsed, the lines joined as Chinese text joins."""
    lines = [_collapse(line) for line in (text or "").splitlines()]
    return functools.reduce(_join_chinese, (line for line in lines if line), "")


def _end_sentence(text: str) -> str:
    return text if text.endswith(_SENTENCE_ENDS) else f"{text}."


def parse_shot(data: Mapping[str, object]) -> ShotSpec:
    """Validate a mapping of shot fields; raise `ShotSpecError` with one message naming each problem."""
    return _parse_shot(data, where="shot spec")


def load_shot_file(path: Path) -> ShotSpec:
    """Read a shot spec from a UTF-8 YAML (.yaml/.yml) or JSON (.json) file, chosen by extension."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SHOT_FILE_SUFFIXES:
        raise ShotSpecError(
            f"shot file {path}: unsupported extension `{suffix or '(none)'}` "
            f"(allowed: {', '.join(SHOT_FILE_SUFFIXES)})"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ShotSpecError(f"shot file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise ShotSpecError(f"shot file {path}: cannot read it ({exc.strerror or exc})") from exc

    if suffix == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_json_mapping_without_duplicates)
        except json.JSONDecodeError as exc:
            raise ShotSpecError(
                f"shot file {path}: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from exc
        except _DuplicateKeyError as exc:
            raise ShotSpecError(f"shot file {path}: invalid JSON: {exc}") from exc
    else:
        try:
            data = yaml.load(text, Loader=_ShotYamlLoader)  # a SafeLoader: no arbitrary objects
        except yaml.YAMLError as exc:
            raise ShotSpecError(f"shot file {path}: invalid YAML: {_describe_yaml_error(exc)}") from exc

    if not isinstance(data, Mapping):
        got = "nothing (the file is empty)" if data is None else f"a {type(data).__name__}"
        raise ShotSpecError(f"shot file {path}: the top level must be a mapping of shot fields, got {got}")
    return _parse_shot(data, where=f"shot file {path}")


def compose_prompt(prompt: str | None, shot: ShotSpec | None, version: int = PROMPT_COMPILER_VERSION) -> str:
    """The text sent to the encoder: the shot's compiled prompt (compiler `version`), then the free
    prompt, space-separated."""
    parts = (shot.to_prompt(version) if shot is not None else "", prompt or "")
    text = " ".join(part.strip() for part in parts if part.strip())
    if not text:
        raise ValueError("`prompt` must not be empty: give a prompt or a shot spec.")
    return text


def _parse_shot(data: object, *, where: str) -> ShotSpec:
    if not isinstance(data, Mapping):
        raise ShotSpecError(f"{where}: expected a mapping of shot fields, got a {type(data).__name__}")
    try:
        return ShotSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise ShotSpecError(f"{where}: {_describe_validation_error(exc)}") from None


def _describe_validation_error(exc: ValidationError) -> str:
    unknown: list[str] = []
    problems: list[str] = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            unknown.append(f"`{key}`")
        elif kind == "string_too_long":
            problems.append(
                f"`{key}` is too long: {len(error['input']):,} characters (at most {MAX_FIELD_CHARS:,})"
            )
        elif kind == "string_type":
            problems.append(f"`{key}` must be text, got {type(error['input']).__name__}")
        elif key:
            problems.append(f"`{key}`: {error['msg']}")
        else:
            problems.append(error["msg"])
    if unknown:
        noun = "field" if len(unknown) == 1 else "fields"
        problems.insert(0, f"unknown {noun} {', '.join(unknown)} (allowed: {ALLOWED_KEYS})")
    return "; ".join(problems)


class _DuplicateKeyError(ValueError):
    pass


def _json_mapping_without_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    mapping: dict[str, object] = {}
    for key, value in pairs:
        if key in mapping:
            raise _DuplicateKeyError(f"key `{key}` appears twice")
        mapping[key] = value
    return mapping


class _ShotYamlLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges may be overridden on purpose
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"key `{key}` appears twice",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"{exc.problem}{where}"
    return str(exc)
