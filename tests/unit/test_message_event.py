"""``message`` events: valid ones travel in batches like the others, bad ones are refused with
the field and the rule named."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pydantic import ValidationError

from sessions.decoding import decode_batch, describe_error, parse_event
from sessions.events import Batch, MessageEvent
from sessions.plain import batch_json
from sessions.rules import MAX_MESSAGE_BYTES

AT = "2024-01-01T12:00:00Z"


def message(**fields: Any) -> dict[str, Any]:
    return {
        "kind": "message",
        "session_id": "user-123",
        "at": AT,
        "message_id": str(uuid.uuid4()),
        "seq": 1,
        "role": "user",
        "content": "Hello",
        **fields,
    }


def rejection(payload: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        parse_event(payload)
    return describe_error(caught.value)


def test_a_message_round_trips_through_a_batch() -> None:
    event = parse_event(message(metadata={"source": "web"}))
    assert isinstance(event, MessageEvent) and isinstance(event.message_id, uuid.UUID)
    batch = Batch(events=(event,))
    decoded = decode_batch(batch_json(batch.batch_id, batch.events), max_events=10)
    assert decoded.events == (event,) and not decoded.rejected


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"role": "User"}, "message.role: must be 1 to 32 lowercase letters"),
        ({"role": ""}, "message.role: must be 1 to 32 lowercase letters"),
        ({"content": "a\x00b"}, "message.content: must not contain NUL characters"),
        ({"content": "\ud800"}, "message.content: must be valid Unicode (no lone surrogates)"),
        (
            {"content": "é" * (MAX_MESSAGE_BYTES // 2 + 1)},
            f"message.content: must be at most {MAX_MESSAGE_BYTES} bytes as UTF-8 "
            f"(got {MAX_MESSAGE_BYTES + 2})",
        ),
        ({"content": 42}, "message.content: Input should be a valid string"),
        ({"seq": -1}, "message.seq: Input should be greater than or equal to 0"),
        ({"seq": "1"}, "message.seq: Input should be a valid integer"),
        ({"metadata": {"x": float("nan")}}, "message.metadata: must be a JSON object"),
    ],
)
def test_a_bad_message_is_refused_naming_the_field_and_the_rule(
    fields: dict[str, Any], reason: str
) -> None:
    assert rejection(message(**fields)).startswith(reason)


def test_a_message_on_the_wire_carries_the_id_its_producer_made() -> None:
    payload = message()
    del payload["message_id"]
    assert rejection(payload) == "message.message_id: Field required"


def test_one_bad_message_costs_no_other_event_of_its_batch() -> None:
    payload = {
        "batch_id": str(uuid.uuid4()),
        "events": [message(), message(role="Nope"), message(seq=2, role="assistant")],
    }
    decoded = decode_batch(payload, max_events=10)
    assert [event.seq for event in decoded.events] == [1, 2]  # type: ignore[union-attr]
    assert [r.reason.split(" must")[0] for r in decoded.rejected] == ["events[1]: message.role:"]
