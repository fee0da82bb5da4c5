"""The README's example of testing an agent's own metrics with ``sessions.testing``, verbatim
from the line below the docstring (``test_readme.py`` checks the README still shows it)."""

from sessions import SessionTracker
from sessions.testing import InMemoryStore


def answer(tracker: SessionTracker, session_id: str, question: str) -> str:
    """The agent's own code: a model call, then a tool call that times out."""
    tracker.record(session_id, processing_time=0.8, input_tokens=len(question), output_tokens=42)
    try:
        raise TimeoutError("the search tool did not answer")
    except TimeoutError:
        tracker.record(session_id, processing_time=5.0, error=True)
    return "Sorry, I could not look that up."


def test_a_tool_call_that_times_out_counts_as_an_error() -> None:
    store = InMemoryStore()  # the store's semantics, in memory: no broker, no database
    with store.tracker() as tracker:  # a real SessionTracker, publishing into the store
        tracker.create("s-1", user_id="alice")
        answer(tracker, "s-1", "hello")
        tracker.flush(wait=True)  # returns once every event is applied, as with a worker
    record = store.get("s-1")
    assert record is not None and record.user_id == "alice"
    assert (record.request_count, record.error_count, record.input_tokens) == (2, 1, 5)
    assert record.error_rate == 0.5 and record.total_processing_time == 5.8
