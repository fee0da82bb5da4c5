"""A stored row whose metadata is nested deeper than its readers handle (written before
writes were depth-bounded, or by hand) is still read, cut at ``MAX_READ_DEPTH``, on both
backends, through the store and ContextEngine; the stored document is not changed."""

from __future__ import annotations

import asyncio

import pytest

from sessions import deep_json
from sessions.context_engine import ContextEngine
from sessions.records import SessionRecord
from sessions.store import SessionStore
from tests.integration.support import (
    batch,
    create,
    nested_document,
    nesting,
    store_metadata_text,
    stored_metadata_is,
)


@pytest.mark.parametrize("depth", [300, 5_000], ids=["beyond-pydantic", "beyond-json"])
def test_a_stored_row_nested_too_deep_is_read_cut_and_kept_whole(
    context_engine: ContextEngine, task_store: SessionStore, depth: int
) -> None:
    """Metadata nested deeper than any reader serializes (pydantic: 255 levels, ``json``:
    about 1,000) in a row written before writes were bounded: every read answers, with the
    document cut at MAX_READ_DEPTH levels; the row itself is not changed."""
    task_store.apply(batch(create("deep", 0, metadata={"a": 1}), create("plain", 0)))
    document = nested_document(depth)
    store_metadata_text(task_store, "deep", document)

    read = task_store.get("deep")
    assert read is not None and nesting(read.metadata) == (deep_json.MAX_READ_DEPTH, deep_json.CUT)
    assert SessionRecord.model_validate_json(read.model_dump_json()) == read  # serializes
    # the page answers
    assert [r.session_id for r in task_store.list_sessions()] == ["deep", "plain"]
    guide = asyncio.run(context_engine.get_session("deep"))
    assert guide is not None and guide.metadata == read.metadata
    assert stored_metadata_is(task_store, "deep", document)  # nothing written back


def test_a_row_within_the_read_depth_is_read_as_stored(store: SessionStore) -> None:
    store.apply(batch(create("deep", 0)))
    document = nested_document(deep_json.MAX_READ_DEPTH)
    store_metadata_text(store, "deep", document)
    read = store.get("deep")
    assert read is not None and nesting(read.metadata) == (deep_json.MAX_READ_DEPTH, 1)
