"""sessions.deep_json: a read of a document nested too deep answers, cut, instead of failing;
one within the read depth is read as it is."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from sessions import deep_json


def _nested(depth: int, leaf: str = "1") -> str:
    return '{"a":' * depth + leaf + "}" * depth


def _depth(value: Any) -> tuple[int, Any]:
    depth = 0
    while isinstance(value, dict):
        value, depth = value["a"], depth + 1
    return depth, value


@pytest.mark.parametrize("depth", [1, 100, deep_json.MAX_READ_DEPTH])
def test_a_document_within_the_read_depth_is_read_as_it_is(depth: int) -> None:
    # ``depth`` levels, the innermost an array; brackets in a string are text, not nesting.
    document = _nested(depth - 1, '["x]{\\"", 2]')
    assert deep_json.loads(document) == json.loads(document)
    assert deep_json.loads(document.encode()) == json.loads(document)  # psycopg hands bytes


@pytest.mark.parametrize("depth", [deep_json.MAX_READ_DEPTH + 1, 300, 990, 5_000, 100_000])
def test_a_document_nested_deeper_is_cut_at_the_read_depth(depth: int) -> None:
    """Within reach of ``json`` (below about 1,000 levels) and beyond it, alike."""
    read = deep_json.loads(_nested(depth).encode())
    assert _depth(read) == (deep_json.MAX_READ_DEPTH, deep_json.CUT)
    json.dumps(read)  # and the answer serializes, which the stored document would not


def test_only_the_deep_branch_is_cut_and_the_rest_kept() -> None:
    deep = _nested(sys.getrecursionlimit() + 100)
    document = f'{{"note": "kept", "items": [1, 2], "deep": {deep}}}'
    read = deep_json.loads(document)
    assert read["note"] == "kept" and read["items"] == [1, 2]
    assert _depth(read["deep"]) == (deep_json.MAX_READ_DEPTH - 1, deep_json.CUT)
    assert deep_json.cut_text(document).startswith('{"note": "kept", "items": [1, 2], "deep": ')


def test_a_text_that_is_not_json_is_still_an_error() -> None:
    with pytest.raises(json.JSONDecodeError):
        deep_json.loads('{"a": ')
