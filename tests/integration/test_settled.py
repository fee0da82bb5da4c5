"""A batch set aside whole is settled in the ledger: clients stop waiting for it, and a copy of
it is a duplicate, not a second dead letter."""

from __future__ import annotations

import uuid

from sessions.store import SessionStore
from tests.integration.support import batch, record


def test_a_batch_dead_lettered_whole_is_claimed_in_the_ledger(store: SessionStore) -> None:
    message = batch(record("s-1", 1)).to_message()
    batch_id = uuid.UUID(str(message["batch_id"]))
    store.dead_letter(message, "poison: killed the worker 6 times")

    assert store.applied_batch_ids([batch_id]) == {batch_id}
    assert store.apply(message).duplicate == 1  # a copy changes nothing ...
    assert len(store.dead_letters()) == 1  # ... and is not set aside again
    assert store.get("s-1") is None


def test_a_batch_too_big_to_apply_is_settled_under_the_id_it_claims(
    store: SessionStore,
) -> None:
    limit = store.settings.store_max_batch_events
    message = batch(*(record("s-1", n) for n in range(limit + 1))).to_message()
    result = store.apply(message)

    assert result.rejected == 1 and result.applied == 0
    batch_id = uuid.UUID(str(message["batch_id"]))
    assert store.applied_batch_ids([batch_id]) == {batch_id}


def test_a_payload_without_a_uuid_is_set_aside_and_claims_nothing(store: SessionStore) -> None:
    store.dead_letter({"batch_id": "not-a-uuid", "events": []}, "malformed")
    store.dead_letter("not json at all", "malformed")
    assert len(store.dead_letters()) == 2
