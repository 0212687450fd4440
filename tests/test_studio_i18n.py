"""The studio page's words (serve/web/js/i18n.js): English and Chinese catalogues hold the same keys with
the same placeholders, every Chinese entry is translated, and every key a screen asks for exists."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

WEB = Path(__file__).resolve().parents[1] / "serve" / "web"
ENTRY = re.compile(r'^\s*"([\w.]+)":\s*"((?:[^"\\]|\\.)*)",\s*$')
# words that stay as they are in Chinese: file formats and product names
SAME_IN_BOTH = re.compile(
    r"mp4|OTIO|EDL|FCP XML|Previz|pvz_|API|AI|GPU|LUT|JSON|YAML|PNG|JPEG|WebP|MB|previz submit --storyboard"
)


def catalogues() -> dict[str, dict[str, str]]:
    """{"en": {key: text}, "zh": {key: text}} as written in i18n.js."""
    found: dict[str, dict[str, str]] = {}
    language = None
    for line in (WEB / "js" / "i18n.js").read_text(encoding="utf-8").splitlines():
        opened = re.match(r"^  (en|zh): \{$", line)
        if opened:
            language = opened.group(1)
            found[language] = {}
        elif line.startswith("  },"):
            language = None
        elif language is not None:
            entry = ENTRY.match(line)
            assert entry, f"i18n.js: not a catalogue entry: {line!r}"
            found[language][entry.group(1)] = entry.group(2)
    return found


def test_both_catalogues_hold_the_same_keys_and_placeholders() -> None:
    words = catalogues()
    assert set(words) == {"en", "zh"} and len(words["en"]) > 50
    assert words["en"].keys() == words["zh"].keys()
    for key, english in words["en"].items():
        assert set(re.findall(r"\{\w+\}", english)) == set(re.findall(r"\{\w+\}", words["zh"][key])), key


def test_every_chinese_entry_is_translated() -> None:
    words = catalogues()
    for key, chinese in words["zh"].items():
        latin = SAME_IN_BOTH.sub("", re.sub(r"\{\w+\}", "", chinese))
        assert not re.search(r"[A-Za-z]{2,}", latin), f"{key}: {chinese!r} has English left in it"
        assert re.search(r"[\u4e00-\u9fff]", chinese), f"{key}: {chinese!r} is not Chinese"


def test_every_key_a_screen_asks_for_is_in_the_catalogue() -> None:
    words = catalogues()["en"]
    asked: set[str] = set()
    for script in (WEB / "js").glob("*.js"):
        asked |= set(re.findall(r'\bt\("([\w.]+)"', script.read_text(encoding="utf-8")))
    asked |= set(re.findall(r'data-i18n(?:-label)?="([\w.]+)"', (WEB / "index.html").read_text()))
    assert asked and asked <= words.keys(), sorted(asked - words.keys())
    # keys built from an API value: every value the API can send has its words
    for prefix, values in {
        "state": ("queued", "in_progress", "completed", "failed", "cancelled"),
        "stage": ("encoding", "denoising_high", "denoising_low", "decoding", "upscaling", "finishing"),
        "wait": ("denoising_high", "denoising_low", "decoding", "upscaling"),
        "take.tier": ("draft", "final"),
        "board.state": ("queued", "in_progress", "completed", "failed"),
        "compose.field": ("character", "action", "environment", "camera", "style"),
        "compose.example": ("character", "action", "environment", "camera", "style"),
    }.items():
        assert {f"{prefix}.{value}" for value in values} <= words.keys(), prefix


def english_chunks() -> list[str]:
    """The literal parts of the English catalogue (its text between placeholders) that would give an
    untranslated string away on a Chinese page: those with a word of three letters or more, less the
    words that stay the same in both."""
    words = catalogues()
    chunks = set()
    for key, english in words["en"].items():
        if english == words["zh"][key]:
            continue
        for part in re.split(r"\{\w+\}", english):
            part = part.strip(" ·.,:()…")
            if re.search(r"[A-Za-z]{3,}", SAME_IN_BOTH.sub("", part)):
                chunks.add(part)
    return sorted(chunks)


def test_the_english_chunks_a_chinese_page_is_checked_for_are_real_words() -> None:
    chunks = english_chunks()
    assert "Waiting for the decoder" in chunks and "take" in chunks and "Download mp4" in chunks
    assert not [chunk for chunk in chunks if not chunk.strip()]


def error_codes() -> set[str]:
    """Every error code the server's source can answer with (`ApiError(status, "code", ...)`, the 401s, the
    codes chosen by condition) and every code a failed job can carry (`store.fail(..., "code", ...)`)."""
    found: set[str] = set()
    for path in (WEB.parent).rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        found |= set(re.findall(r'ApiError\(\s*\d+,\s*"([a-z_]+)"', source))
        found |= set(re.findall(r'_unauthorized\(\s*"([a-z_]+)"', source))
        for first, second in re.findall(r'\bcode = "([a-z_]+)"(?: if [^\n]* else "([a-z_]+)")?', source):
            found |= {first, second} - {""}
        found |= set(re.findall(r'fail, job\.id, job\.attempt, "([a-z_]+)"', source))
        found |= set(re.findall(r'fail_cut, cut\.id, cut\.attempt, "([a-z_]+)"', source))
        found |= set(re.findall(r'error_code="([a-z_]+)"', source))
    return found


def failure_codes() -> set[str]:
    """The codes a failed job or cut can carry (`store.fail(...)`, `store.fail_cut(...)`)."""
    found: set[str] = set()
    for path in (WEB.parent).rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        found |= set(re.findall(r'fail(?:_cut)?, (?:job|cut)\.id, (?:job|cut)\.attempt, "([a-z_]+)"', source))
        # a chained take's failures (serve/scheduling/continuity.py)
        found |= set(re.findall(r'await _fail\(\s*store,\s*job,\s*scheduler_id,\s*"([a-z_]+)"', source))
    return found


def test_every_error_the_server_can_send_has_words_in_both_languages() -> None:
    # a refusal or a failure reaches the page in the page's language, never as the server's English or a token
    words = catalogues()["en"]
    codes = error_codes()
    assert {"queue_full", "content_blocked", "invalid_value", "pipeline_error", "too_many_attempts"} <= codes
    failures = {
        "content_blocked",
        "pipeline_error",
        "storage_failed",
        "finish_failed",
        "too_many_attempts",
        "cut_failed",
    }
    missing = sorted(
        code
        for code in codes
        if f"error.{code}" not in words and not (code in failures and f"failure.{code}" in words)
    )
    failures |= failure_codes()
    assert not missing, missing
    assert {f"failure.{code}" for code in failures} <= words.keys()
    shipped = yaml.safe_load((WEB.parents[1] / "pipeline" / "safety_terms.yaml").read_text(encoding="utf-8"))
    assert shipped and {f"category.{category}" for category in shipped} <= words.keys()  # refusals name these
