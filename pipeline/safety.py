"""Content safety: the prompt policy (term lists per category, English and Chinese), an optional prompt
classifier and an optional check of the finished frames.

    policy = PromptPolicy.from_settings(SafetySettings())
    policy.check("a detective walks through the rain")   # None: the prompt may run
    policy.check("血肉 模糊的战场")                          # SafetyVerdict(category="violence_graphic", ...)

Matching works on NFKC-normalised, casefolded text with invisible format characters (zero-width spaces,
soft hyphens) removed, so full-width and mathematical letters (ｎｕｄｅ, 𝐧𝐮𝐝𝐞) read as ASCII. A term is a run
of Latin words and CJK characters:

- Latin words match whole words: `ass` never matches "class"; a trailing `*` matches any ending
  (`dismember*` matches "dismembered"). Words of a phrase may be split by up to MAX_SEPARATOR spaces
  or punctuation marks, or joined (`self harm` matches "self-harm" and "selfharm").
- CJK characters match as a substring, with up to MAX_SEPARATOR spaces or punctuation marks between
  any two of them (`肢解` matches "肢 解" and "肢，解").

A prompt is also read with the tricks that hide a Latin word folded away ("t o p l e s s", "t-o-p-l-e-s-s",
"tорless" with Cyrillic о and р, "t0pl3ss" all read "topless"); a term that matches any reading blocks the
prompt, so folding can only add blocks. The Latin reading folds, in this order:

- Homoglyphs: a word whose every letter is Latin or looks like a Latin letter in Unicode's confusables
  data (the `confusable-homoglyphs` package) is spelled in Latin letters. A word with any other letter
  is a real word of its script and stays as it is: "Алексей" is not folded.
- Spelled-out words: MIN_SPELLED_OUT or more single letters or digits in a row, split by spaces or
  punctuation, are joined ("t o p" -> "top"); "t o" and whole words ("top less") are not. A run that
  starts with "a" or "i" is read both with it and with it as a word ("a t o p" -> "atop", "a top").
- Punctuation inside a word (up to MAX_SEPARATOR marks, no space) is dropped: "nu.de" and "top-less"
  read "nude" and "topless".
- Leetspeak: in a word that has letters, the digits and symbols of _LEET read as letters (0 -> o,
  3 -> e, $ -> s ...). 1 and | (and I-shaped homoglyphs) stand for i or l: both readings are checked.
  A number stays a number: "3 shots at 10 am" and "5 ft" read as written.

Hooks are `module:callable` import paths, resolved once when the policy is built:

- classifier(prompt: str) -> str | None: a category name, or None to let the prompt through.
- frame check(pixels: np.ndarray (F, H, W, 3) uint8) -> str | None: the same, for a finished clip.

Both fail closed: when a hook raises or answers something that is not None or a category name,
`SafetyCheckError` is raised and the content is refused (the API answers 503 `safety_unavailable`
for a prompt; a clip's job fails), never let through unchecked.
"""

from __future__ import annotations

import functools
import pkgutil
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from confusable_homoglyphs import categories, confusables
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

DEFAULT_TERMS_FILE = Path(__file__).with_name("safety_terms.yaml")
MAX_SEPARATOR = 3  # spaces or punctuation marks tolerated between the words or characters of a term
MIN_SPELLED_OUT = 3  # single letters in a row read as one word: "t o p" is "top", "a b" stays two words
CATEGORY_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
HOOK_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"

_LETTER = "a-z\u00c0-\u024f"  # after casefolding: (accented) Latin letters
_LATIN = f"0-9{_LETTER}"  # ... and digits: what a Latin word is made of
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"  # kana, hanzi, hangul
_TOKEN = re.compile(rf"[{_LATIN}]+\*?|[{_CJK}]")
_SEPARATOR = rf"[^{_LATIN}{_CJK}]{{0,{MAX_SEPARATOR}}}"
_CATEGORY = re.compile(CATEGORY_PATTERN)

# Leetspeak, read only inside a word that also has a letter. 1 and | are not here: each is i or l.
_LEET = {"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "@": "a", "$": "s", "!": "i"}
_LEET_I = str.maketrans({**_LEET, "1": "i", "|": "i"})
_LEET_L = str.maketrans({**_LEET, "1": "l", "|": "l"})
_LEET_SYMBOLS = "@$!|"  # the symbols among them, as they go in a character class
_LEET_WORD = re.compile(  # a run of letters, digits and leet symbols with at least one digit or symbol
    rf"(?<![{_LATIN}{_LEET_SYMBOLS}])[{_LATIN}{_LEET_SYMBOLS}]*[0-9{_LEET_SYMBOLS}][{_LATIN}{_LEET_SYMBOLS}]*"
)
_HAS_LETTER = re.compile(f"[{_LETTER}]")
_WORD = re.compile(rf"[^\W\d_{_CJK}]+")  # letters of any script but CJK, before casefolding
_SPELLED_OUT = re.compile(  # single letters or digits split by up to MAX_SEPARATOR non-letters
    rf"(?<![{_LATIN}])[{_LATIN}]"
    rf"(?:[^{_LATIN}{_CJK}]{{1,{MAX_SEPARATOR}}}[{_LATIN}](?![{_LATIN}])){{{MIN_SPELLED_OUT - 1},}}"
)
_NOT_LATIN = re.compile(f"[^{_LATIN}]")
_INNER_MARKS = re.compile(  # punctuation between two letters of a word; leet symbols are letters
    rf"(?<=[{_LATIN}])[^\s{_LATIN}{_CJK}{_LEET_SYMBOLS}]{{1,{MAX_SEPARATOR}}}(?=[{_LATIN}])"
)

Category = Annotated[str, StringConstraints(pattern=CATEGORY_PATTERN)]
Term = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
HookPath = Annotated[str, StringConstraints(pattern=HOOK_PATTERN)]
TermLists = dict[Category, list[Term]]
_TERM_LISTS = TypeAdapter(TermLists)

Stage = Literal["prompt", "frames"]


class SafetySettings(BaseModel):
    """The content policy of a deployment: which term lists and hooks decide what may run."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Check prompts and finished clips at all.")
    terms: TermLists = Field(
        default_factory=dict,
        description="Category -> extra terms, added to the shipped lists (or replacing them, see "
        '`replace_defaults`), e.g. {"real_person_likeness": ["jane doe", "简·多伊"]}.',
    )
    terms_file: Path | None = Field(
        None, description="A YAML file of category -> terms (the shape of pipeline/safety_terms.yaml)."
    )
    replace_defaults: bool = Field(
        False, description="Drop the shipped lists: only `terms_file` and `terms` apply."
    )
    classifier: HookPath | None = Field(
        None,
        description="`module:callable` called with each prompt; returns a category name or None. "
        "If it raises, the prompt is refused (503 `safety_unavailable`).",
    )
    frame_check: HookPath | None = Field(
        None,
        description="`module:callable` called with each finished clip's frames, a (F, H, W, 3) uint8 "
        "array; returns a category name or None. If it raises, the job fails and nothing is stored.",
    )


@dataclass(frozen=True, slots=True)
class SafetyVerdict:
    """Why content was refused."""

    category: str  # machine-readable, e.g. "sexual_explicit": what the API and metrics report
    stage: Stage  # prompt (before a job exists) | frames (the Finisher, after decoding)
    term: str | None = None  # the listed term that matched, for logs; None when a hook decided


class ContentBlocked(Exception):
    """Content the policy refuses. Picklable with its fields, so it crosses Ray calls intact."""

    def __init__(self, category: str, stage: Stage, term: str | None = None) -> None:
        super().__init__(category, stage, term)
        self.category, self.stage, self.term = category, stage, term

    @classmethod
    def of(cls, verdict: SafetyVerdict) -> ContentBlocked:
        return cls(verdict.category, verdict.stage, verdict.term)

    def __str__(self) -> str:
        what = "the prompt" if self.stage == "prompt" else "the generated clip"
        return f"{what} was blocked by the content policy (category `{self.category}`)"


class SafetyCheckError(RuntimeError):
    """A safety hook failed or gave an answer that is neither None nor a category: the content is refused."""


def normalize(text: str) -> str:
    """NFKC (full-width -> ASCII), casefold, drop invisible format characters, collapse whitespace runs."""
    return " ".join(_visible(text).casefold().split())  # a run of whitespace counts as one separator


def readings(text: str) -> list[str]:
    """`normalize(text)`, then its Latin readings where they differ (see the module docstring)."""
    visible = _visible(text)
    normalized = " ".join(visible.casefold().split())
    if not visible.isascii():
        visible = _WORD.sub(_fold_homoglyphs, visible)
    latin = " ".join(visible.casefold().split())
    joined = [_SPELLED_OUT.sub(functools.partial(_join, article=False), latin)]
    if joined[0] != latin:  # something was spelled out: a leading "a" may be the article
        joined.append(_SPELLED_OUT.sub(functools.partial(_join, article=True), latin))
    found = [normalized]
    for text in joined:
        text = _INNER_MARKS.sub("", text)
        for table in (_LEET_I, _LEET_L):
            reading = _LEET_WORD.sub(functools.partial(_read_leet, table=table), text)
            if reading not in found:
                found.append(reading)
    return found


@functools.cache
def homoglyphs() -> dict[int, str]:
    """Letter -> the ASCII letter it looks like in Unicode's confusables data (`р` -> `p`, `ο` -> `o`),
    for every letter outside ASCII that has one. I-shaped letters (Cyrillic `І`, Greek `Ι`) become `1`:
    Unicode reads them as `l`, a prompt as often means `i`, and the leet step reads `1` both ways."""
    table: dict[int, str] = {}
    for char, lookalikes in confusables.confusables_data.items():
        if len(char) != 1 or char.isascii() or not unicodedata.category(char).startswith("L"):
            continue
        for lookalike in lookalikes:
            latin = lookalike["c"]
            if len(latin) == 1 and latin.isascii() and latin.isalpha():
                table[ord(char)] = "1" if latin == "l" else latin.lower()
                break
    return table


def _visible(text: str) -> str:
    """NFKC, without invisible format characters (none of which is ASCII)."""
    if text.isascii():
        return text  # NFKC leaves ASCII as it is
    return "".join(char for char in unicodedata.normalize("NFKC", text) if unicodedata.category(char) != "Cf")


def _fold_homoglyphs(word: re.Match[str]) -> str:
    """The word in Latin letters if each of its letters is Latin or a homoglyph of one, else as it is."""
    folded = word[0].translate(homoglyphs())
    return folded if folded.isascii() or all(map(_is_latin, folded)) else word[0]


@functools.lru_cache(maxsize=4096)
def _is_latin(char: str) -> bool:
    return char.isascii() or categories.alias(char) == "LATIN"


def _join(spelled: re.Match[str], article: bool) -> str:
    """Spelled-out letters as one word; with `article`, a leading "a" or "i" as a word of its own."""
    letters = _NOT_LATIN.sub("", spelled[0])
    if article and letters[0] in "ai":
        return f"{letters[0]} {letters[1:]}"
    return letters


def _read_leet(word: re.Match[str], table: dict[int, str]) -> str:
    """The word (letters, digits, leet symbols) with its digits and symbols read as letters, unless it is a
    number: "t0pl3ss" -> "topless", "10" -> "10"."""
    return word[0].translate(table) if _HAS_LETTER.search(word[0]) else word[0]


def compile_term(term: str) -> re.Pattern[str]:
    """The pattern of one listed term (see the module docstring for what it matches)."""
    tokens = _TOKEN.findall(normalize(term))
    if not tokens:
        raise ValueError(f"the safety term {term!r} has no letters or CJK characters to match")
    parts = []
    for token in tokens:
        if token.endswith("*"):
            parts.append(re.escape(token[:-1]) + f"[{_LATIN}]*")
        else:
            parts.append(re.escape(token))
    pattern = _SEPARATOR.join(parts)
    if re.match(f"[{_LATIN}]", tokens[0]):
        pattern = f"(?<![{_LATIN}])" + pattern
    if re.match(f"[{_LATIN}]", tokens[-1]):
        pattern += f"(?![{_LATIN}])"
    return re.compile(pattern)


def load_terms(path: Path) -> dict[str, list[str]]:
    """Category -> terms from a YAML file; a ValueError names the file and what is wrong with it."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"safety terms file {str(path)!r} cannot be read: {error}") from None
    try:
        return _TERM_LISTS.validate_python(data or {})
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        raise ValueError(
            f"safety terms file {str(path)!r}: {where}: {first['msg']} "
            f"(expected a mapping of category names like `hate` to lists of terms)"
        ) from None


def merged_terms(settings: SafetySettings) -> dict[str, list[str]]:
    """The shipped lists (unless replaced), then `terms_file`, then `terms`: each category's terms joined."""
    sources = [] if settings.replace_defaults else [load_terms(DEFAULT_TERMS_FILE)]
    if settings.terms_file is not None:
        sources.append(load_terms(settings.terms_file))
    sources.append(settings.terms)
    merged: dict[str, list[str]] = {}
    for source in sources:
        for category, terms in source.items():
            listed = merged.setdefault(category, [])
            listed.extend(term for term in terms if term not in listed)
    return merged


def load_hook(path: str, what: str) -> Callable[..., object]:
    """Resolve a `module:callable` path; a ValueError says which setting is wrong and why."""
    try:
        hook = pkgutil.resolve_name(path)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"`safety.{what}` {path!r} cannot be imported: {error}") from None
    if not callable(hook):
        raise ValueError(f"`safety.{what}` {path!r} is a {type(hook).__name__}, not a callable")
    return hook


def _category_of(answer: object, what: str) -> str | None:
    if answer is None:
        return None
    if isinstance(answer, str) and _CATEGORY.match(answer):
        return answer
    raise SafetyCheckError(
        f"{what} answered {answer!r}; it must return None or a category name "
        f"(lowercase letters, digits and _)"
    )


class PromptPolicy:
    """Decides whether a prompt may run: the term lists first, then the classifier (if any)."""

    def __init__(
        self,
        terms: Mapping[str, Iterable[str]],
        classifier: Callable[[str], str | None] | None = None,
        classifier_name: str = "classifier",
    ) -> None:
        self.classifier = classifier
        self.classifier_name = classifier_name
        homoglyphs()  # loaded once, here, rather than on the first prompt
        # (category, term as listed, pattern), in the lists' order: the first match names the category
        self._patterns: list[tuple[str, str, re.Pattern[str]]] = []
        for category, listed in terms.items():
            if not _CATEGORY.match(category):
                raise ValueError(f"safety category {category!r} must match {CATEGORY_PATTERN}")
            self._patterns.extend((category, term, compile_term(term)) for term in listed)

    @classmethod
    def from_settings(cls, settings: SafetySettings) -> PromptPolicy:
        """The configured policy; one that lets everything through when `enabled` is false."""
        if not settings.enabled:
            return cls({})
        classifier = None
        if settings.classifier is not None:
            classifier = load_hook(settings.classifier, "classifier")
        return cls(merged_terms(settings), classifier, settings.classifier or "classifier")

    @property
    def categories(self) -> list[str]:
        return list(dict.fromkeys(category for category, _term, _pattern in self._patterns))

    def check(self, text: str) -> SafetyVerdict | None:
        """None when `text` may run, else the verdict. Raises SafetyCheckError if the classifier fails."""
        texts = readings(text)
        for category, term, pattern in self._patterns:
            for reading in texts:
                if pattern.search(reading):
                    return SafetyVerdict(category=category, stage="prompt", term=term)
        if self.classifier is None:
            return None
        return _ask_hook(self.classifier, text, f"the prompt classifier `{self.classifier_name}`", "prompt")


class FrameCheck:
    """Decides whether finished frames may be stored, with the configured hook."""

    def __init__(self, hook: Callable[[np.ndarray], str | None], name: str = "frame_check") -> None:
        self.hook = hook
        self.name = name

    @classmethod
    def from_settings(cls, settings: SafetySettings) -> FrameCheck | None:
        """The configured check, or None when there is no hook (or safety is disabled)."""
        if not settings.enabled or settings.frame_check is None:
            return None
        return cls(load_hook(settings.frame_check, "frame_check"), settings.frame_check)

    def check(self, pixels: np.ndarray) -> SafetyVerdict | None:
        """`pixels`: (F, H, W, 3) uint8. Raises SafetyCheckError if the hook fails."""
        return _ask_hook(self.hook, pixels, f"the frame check `{self.name}`", "frames")


def _ask_hook(hook: Callable[[Any], str | None], value: Any, what: str, stage: Stage) -> SafetyVerdict | None:
    """The hook's verdict on `value`; a hook that raises or answers nonsense fails closed."""
    try:
        answer = hook(value)
    except Exception as error:
        raise SafetyCheckError(f"{what} failed: {type(error).__name__}: {error}") from error
    category = _category_of(answer, what)
    return None if category is None else SafetyVerdict(category=category, stage=stage)
