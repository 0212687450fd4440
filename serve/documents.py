"""The one reader of request documents written by hand (storyboards, shots, settings): JSON or YAML text
to a mapping. The CLI reads files with it and the Ingress reads `application/yaml` bodies with it, so a
board file means the same thing to `previz submit --storyboard` and to a page it is dropped on.

A document is guarded before it is built: its nesting depth, its number of nodes and the characters of
its scalars are counted as YAML expands them (an alias counts as the whole node it names, so a 446-byte
"billion laughs" counts as the 10⁹ nodes it would become) from the parser's event stream, which is
linear in the text and not recursive. Only a document within `DocumentLimits` is built, so reading one
never does more than linear work in its bytes, and never recurses deeper than `max_depth`.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import yaml

DocumentFormat = Literal["json", "yaml"]
YAML_MEDIA_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})
# libyaml's parser when PyYAML was built with it (its wheels are): the same events, in C
_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, slots=True)
class DocumentLimits:
    """How large a document may become once read. The defaults hold the largest storyboard the API takes
    (100 shots of full fields and labels, about 20,000 nodes and 2 MiB of text) several times over."""

    max_depth: int = 32  # nested mappings and lists (a storyboard needs 6)
    max_nodes: int = 200_000  # scalars, mappings and lists, aliases counted as what they expand to
    max_chars: int = 8 << 20  # characters of all scalars, aliases expanded


DEFAULT_LIMITS = DocumentLimits()


class DocumentError(ValueError):
    """Text that is not a JSON/YAML mapping; the message says where it went wrong."""


class DocumentTooLarge(DocumentError):
    """A document that would expand past `DocumentLimits.max_nodes` or `max_chars`."""


class DocumentTooDeep(DocumentError):
    """A document nested deeper than `DocumentLimits.max_depth`."""


def load_mapping(
    text: str, document_format: DocumentFormat, limits: DocumentLimits = DEFAULT_LIMITS
) -> dict[str, Any]:
    """Parse `text` as JSON or YAML (YAML's safe subset: no objects) within `limits`; it must hold a
    mapping. YAML's dates and times become ISO text, as they would be in JSON."""
    try:
        if document_format == "json":
            data = json.loads(text)
            check_json_value(data, limits)
        else:
            _check_yaml_events(yaml.parse(text, Loader=_YamlLoader), limits)
            data = yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a safe loader
    except DocumentError:
        raise
    except RecursionError:  # JSON's C scanner past the interpreter's limit: deeper than any limit
        raise DocumentTooDeep(f"nested deeper than {limits.max_depth} levels") from None
    except yaml.YAMLError as error:
        if "nesting depth" in str(error):  # libyaml's own limit (1000), met while scanning ahead
            raise DocumentTooDeep(f"nested deeper than {limits.max_depth} levels") from None
        raise DocumentError(f"not valid YAML: {error}") from None
    except ValueError as error:
        raise DocumentError(f"not valid {document_format.upper()}: {error}") from None
    if not isinstance(data, dict):
        raise DocumentError(f"not a mapping but {type(data).__name__}")
    return _iso_dates(data)


def check_json_value(value: Any, limits: DocumentLimits = DEFAULT_LIMITS) -> None:
    """Refuse a decoded JSON value nested deeper than `limits.max_depth` (DocumentTooDeep), without
    recursion: the routes' schemas and the text policy walk it recursively afterwards."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > limits.max_depth:
                raise DocumentTooDeep(f"nested deeper than {limits.max_depth} levels")
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def _check_yaml_events(events: Iterable[yaml.Event], limits: DocumentLimits) -> None:
    num_nodes = 0  # of the document as built, aliases expanded
    num_chars = 0
    open_collections: list[tuple[str | None, int, int]] = []  # (anchor, num_nodes, num_chars) at start
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, chars) of the node it names
    for event in events:
        added_nodes = added_chars = 0
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_collections) >= limits.max_depth:
                raise DocumentTooDeep(f"nested deeper than {limits.max_depth} levels (line {_line(event)})")
            open_collections.append((event.anchor, num_nodes, num_chars))
            added_nodes = 1
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, nodes_before, chars_before = open_collections.pop()
            if anchor is not None:
                anchors[anchor] = (num_nodes - nodes_before, num_chars - chars_before)
        elif isinstance(event, yaml.ScalarEvent):
            added_nodes, added_chars = 1, len(event.value)
            if event.anchor is not None:
                anchors[event.anchor] = (added_nodes, added_chars)
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor not in anchors:  # undefined, or naming a node it is inside of (a cycle)
                raise DocumentError(
                    f"the alias *{event.anchor} (line {_line(event)}) names no complete node before it"
                )
            added_nodes, added_chars = anchors[event.anchor]
        num_nodes += added_nodes
        num_chars += added_chars
        if num_nodes > limits.max_nodes or num_chars > limits.max_chars:
            raise DocumentTooLarge(
                f"it expands past {limits.max_nodes:,} values or {limits.max_chars:,} characters "
                f"(line {_line(event)}; aliases count as what they repeat)"
            )


def _line(event: yaml.Event) -> int:
    return event.start_mark.line + 1 if event.start_mark is not None else 0


def _iso_dates(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _iso_dates(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_iso_dates(item) for item in value]
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return value
