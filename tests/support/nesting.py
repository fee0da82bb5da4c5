"""Values nested to a given depth, for the probes of deep nesting (issue 12)."""

from __future__ import annotations

from typing import Any


def nested_list(levels: int) -> list[Any]:
    """``[[[...]]]``, ``levels`` lists deep (about 2 bytes a level as JSON)."""
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def nested_object(levels: int) -> dict[str, Any]:
    """``{"a": {"a": ...}}``, ``levels`` objects deep (about 6 bytes a level as JSON)."""
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value
