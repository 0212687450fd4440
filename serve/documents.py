"""The one reader of request documents written by hand (storyboards, shots, settings): JSON or YAML text
to a mapping. The CLI reads files with it and the Ingress reads `application/yaml` bodies with it, so a
board file means the same thing to `previz submit --storyboard` and to a page it is dropped on."""

from __future__ import annotations

import datetime
import json
from typing import Any, Literal

import yaml

DocumentFormat = Literal["json", "yaml"]
YAML_MEDIA_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})


class DocumentError(ValueError):
    """Text that is not a JSON/YAML mapping; the message says where it went wrong."""


def load_mapping(text: str, document_format: DocumentFormat) -> dict[str, Any]:
    """Parse `text` as JSON or YAML (YAML's safe subset: no objects); it must hold a mapping. YAML's dates
    and times become ISO text, as they would be in JSON."""
    try:
        data = json.loads(text) if document_format == "json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise DocumentError(f"not valid {document_format.upper()}: {error}") from None
    if not isinstance(data, dict):
        raise DocumentError(f"not a mapping but {type(data).__name__}")
    return _iso_dates(data)


def _iso_dates(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _iso_dates(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_iso_dates(item) for item in value]
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return value
