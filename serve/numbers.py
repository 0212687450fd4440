"""Whole numbers as JSON Schema's `integer` means them: 3 and 3.0 (a number without a fraction), never
true, "3" or 3.5. The published schema says `integer`, so a client may send 3.0 and must not be refused."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, StrictInt


def integral(value: object) -> object:
    """3.0 -> 3; anything else as it is (for StrictInt to accept or refuse)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def whole_number(**bounds: Any) -> Any:
    """The type of a whole number within pydantic's `bounds` (ge, gt, le, lt). The bounds sit on the
    integer itself, under the 3.0 -> 3 step, so the JSON schema states them as minimum/maximum."""
    return Annotated[StrictInt, Field(**bounds), BeforeValidator(integral)]


WholeNumber = whole_number()
