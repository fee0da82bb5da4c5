"""JSON as the store reads it back (session metadata): nested at most :data:`MAX_READ_DEPTH`.

A stored document may be nested deeper than its readers can handle: Python's ``json`` raises
``RecursionError`` near 1,000 levels, pydantic refuses to serialize beyond 255 and to parse
JSON beyond 200 (so ``SessionRecord.model_dump``, every ``--json`` and dashboard answer, and
whoever parses them would fail), and rows written before writes were bounded may be that
deep. The store's engines decode JSON with :func:`loads`, which keeps a document as it is up
to :data:`MAX_READ_DEPTH` levels and replaces every object or array below that with
:data:`CUT`, so a read of such a row answers (and says what it left out) instead of failing,
and costs no other row of a page. Nothing is written back: the stored document stays whole.

:func:`deeper_than` measures the nesting of a decoded value without recursion, for whoever
must refuse a value before code that recurses over it (pickle, ``json``) raises
``RecursionError`` on it. :func:`read_int` reads an integer of more digits than Python
converts as a value beyond any bound, rather than failing the whole document.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

#: Deepest nesting a read returns (an object in an object is two levels): at least the depth
#: the event model accepts for new writes, and far enough below pydantic's JSON limit of 200
#: levels that a record in a list in an envelope still parses.
MAX_READ_DEPTH = 128
#: What stands for an object or array nested deeper than :data:`MAX_READ_DEPTH`.
CUT = f"<cut: nested deeper than {MAX_READ_DEPTH} levels>"
#: The JSON tokens that change the depth, and strings (skipped whole: they may hold brackets).
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def loads(document: str | bytes) -> Any:
    """``json.loads``, with anything nested deeper than :data:`MAX_READ_DEPTH` levels replaced
    by :data:`CUT`; raises what ``json.loads`` raises for a text that is not JSON."""
    # psycopg hands over bytes, SQLite a str
    text = document.decode() if isinstance(document, bytes) else document
    try:
        value = json.loads(text)
    except RecursionError:
        # Too deep for the decoder itself: cut the text first (linear, no recursion).
        return json.loads(cut_text(text))
    # A document with fewer brackets than the limit cannot be nested deeper (the usual case).
    return value if text.count("{") + text.count("[") <= MAX_READ_DEPTH else _cut(value, 1)


class OversizedInt(int):
    """An integer written with more digits than Python converts from text (``sys``'s
    ``int_max_str_digits``, 4,300 by default): its value stands in as ``±10**4300``, beyond
    every numeric bound a field has, so that the field's own rule refuses it (and, like the
    real number, it cannot be written back as JSON). ``repr`` shows its first digits."""

    literal: str

    def __new__(cls, literal: str) -> OversizedInt:
        made = super().__new__(cls, -(10**4300) if literal.startswith("-") else 10**4300)
        made.literal = literal
        return made

    def __repr__(self) -> str:
        return f"{self.literal[:24]}... ({len(self.literal.lstrip('-'))} digits)"


def read_int(literal: str) -> int:
    """A ``parse_int`` for ``json.loads``: ``int``, or an :class:`OversizedInt` for a literal
    ``int`` refuses as too long (instead of failing the whole document)."""
    limit = sys.get_int_max_str_digits()
    if limit and len(literal.lstrip("-")) > limit:
        return OversizedInt(literal)
    return int(literal)


def deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects and arrays (dicts, lists, tuples) more than ``limit``
    levels deep, ``value`` itself being level 1 if it is one.

    A loop over an explicit stack, not recursion, so that any depth costs an answer, not a
    ``RecursionError``; it stops at the first container beyond ``limit`` (a cycle is deeper
    than any limit).
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _cut(value: Any, depth: int) -> Any:
    """``value`` (at ``depth``) with its containers below :data:`MAX_READ_DEPTH` cut."""
    if isinstance(value, dict):
        if depth > MAX_READ_DEPTH:
            return CUT
        return {key: _cut(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        if depth > MAX_READ_DEPTH:
            return CUT
        return [_cut(item, depth + 1) for item in value]
    return value


def cut_text(text: str) -> str:
    """A JSON text with every object or array nested deeper than :data:`MAX_READ_DEPTH`
    replaced by :data:`CUT` (as a JSON string), without parsing it."""
    parts: list[str] = []
    depth = 0
    kept_until = 0  # text[:kept_until] is in parts, or cut
    cut_from: int | None = None  # where the container being cut began
    for token in _TOKENS.finditer(text):
        symbol = token.group()
        if symbol in "{[":
            depth += 1
            if depth == MAX_READ_DEPTH + 1 and cut_from is None:
                parts.append(text[kept_until : token.start()])
                cut_from = token.start()
        elif symbol in "}]":
            depth -= 1
            if depth == MAX_READ_DEPTH and cut_from is not None:
                parts.append(json.dumps(CUT))
                kept_until = token.end()
                cut_from = None
    parts.append(text[kept_until:] if cut_from is None else text[kept_until:cut_from])
    return "".join(parts)
