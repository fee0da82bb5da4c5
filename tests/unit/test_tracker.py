"""SessionTracker without a broker: batching, retries, never blocking, flushing and closing."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sessions import batching, sending
from sessions.errors import BrokerUnavailableError, FlushTimeoutError, UnserializableBatchError
from sessions.events import Batch
from sessions.publisher import CeleryPublisher, Publisher
from sessions.settings import Settings
from sessions.store import SessionStore
from sessions.tracker import SessionTracker
from tests.support.workers_harness import DEADLINE, wait_until

#: A flush interval no test waits for: batches are cut by size, flush or close only.
NEVER = 3600.0


class RecordingPublisher:
    """A publisher that keeps every message, and can fail or hang on demand."""

    def __init__(self, failures: int = 0) -> None:
        self.messages: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []
        self.failures = failures
        self.hang = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        #: Threads that called the publisher: the agent's own thread must never be one.
        self.threads: set[int] = set()

    def __call__(self, message: dict[str, Any]) -> None:
        with self.lock:
            self.calls.append(message)
            self.threads.add(threading.get_ident())
        if self.hang.is_set():
            self.release.wait(30)
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("broker down")
            self.messages.append(message)

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [event for message in self.messages for event in message["events"]]


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sending, "PUBLISH_RETRY_DELAYS", (0.01, 0.01))
    monkeypatch.setattr(sending, "BROKER_DOWN_PAUSE", 0.05)


@pytest.fixture
def recorder() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def make_tracker(recorder: RecordingPublisher) -> Iterator[Any]:
    made: list[SessionTracker] = []

    def make(**options: Any) -> SessionTracker:
        options.setdefault("publisher", recorder)
        options.setdefault("flush_interval", NEVER)
        made.append(SessionTracker(Settings(), **options))
        return made[-1]

    yield make
    for tracker in made:
        recorder.release.set()
        tracker.close(timeout=DEADLINE)


def test_a_full_buffer_is_published_at_once_in_batches_of_max_size(
    make_tracker: Any, recorder: RecordingPublisher
) -> None:
    tracker = make_tracker(max_batch_events=10)
    for index in range(25):
        tracker.record("s-1", processing_time=index)

    wait_until(lambda: len(recorder.messages) == 2, message="two full batches")
    assert [len(m["events"]) for m in recorder.messages] == [10, 10]
    assert tracker.stats.events_pending == 5  # the rest waits for the interval or a flush

    tracker.flush()
    wait_until(lambda: len(recorder.messages) == 3, message="the partial batch")
    assert [e["processing_time"] for e in recorder.events()] == list(range(25))
    assert len({m["batch_id"] for m in recorder.messages}) == 3


def test_a_partial_batch_goes_out_after_the_flush_interval(
    make_tracker: Any, recorder: RecordingPublisher
) -> None:
    tracker = make_tracker(flush_interval=0.05, max_batch_events=1000)
    tracker.record("s-1")
    tracker.create("s-2", user_id="u-2", metadata={"a": 1})
    tracker.end("s-1", status="failed")

    wait_until(lambda: recorder.messages, message="the interval flush")
    assert [e["kind"] for e in recorder.events()] == ["record", "create", "end"]
    assert recorder.events()[1]["metadata"] == {"a": 1}
    assert recorder.events()[2]["status"] == "failed"
    stats = tracker.stats
    assert (stats.events_recorded, stats.events_sent, stats.batches_sent) == (3, 3, 1)


def test_a_retried_publish_keeps_its_batch_id(
    make_tracker: Any, recorder: RecordingPublisher
) -> None:
    recorder.failures = 2
    tracker = make_tracker()
    for _ in range(3):
        tracker.record("s-1")
    tracker.flush()

    wait_until(lambda: recorder.messages, message="the third attempt")
    assert len(recorder.calls) == 3
    assert len({call["batch_id"] for call in recorder.calls}) == 1
    assert recorder.calls[0] == recorder.calls[2]
    stats = tracker.stats
    assert (stats.batches_sent, stats.events_sent, stats.batches_failed) == (1, 3, 0)


def test_record_never_raises_or_blocks_when_the_publisher_fails(
    make_tracker: Any, recorder: RecordingPublisher
) -> None:
    recorder.failures = 10**9
    unsent: list[tuple[Batch, BaseException]] = []
    tracker = make_tracker(max_batch_events=50, on_unsent=lambda b, e: unsent.append((b, e)))

    for index in range(2000):
        tracker.record(f"s-{index % 7}")
    tracker.flush()

    wait_until(lambda: tracker.stats.events_pending == 0, message="every batch given up")
    stats = tracker.stats
    assert stats.events_failed == 2000 and stats.events_sent == 0
    assert stats.batches_failed == 40 == len(unsent)
    # Every publish attempt ran on the tracker's thread, never on the recording one.
    assert recorder.threads and threading.get_ident() not in recorder.threads
    assert sum(len(batch.events) for batch, _ in unsent) == 2000
    # Only the first batch of the outage (and one per pause) was actually tried.
    assert len(recorder.calls) < 40 * sending.PUBLISH_ATTEMPTS
    with pytest.raises(BrokerUnavailableError, match="40 batches"):
        tracker.flush(wait=True, timeout=DEADLINE)


def test_a_batch_over_the_byte_limit_goes_out_halved_each_part_a_batch_of_its_own(
    make_tracker: Any, recorder: RecordingPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large messages fill a batch's bytes long before its event count: it is halved until
    each part's text fits (a broker refuses a message past its limit), every event once."""
    monkeypatch.setattr(batching, "MAX_BATCH_BYTES", 4096)
    tracker = make_tracker(max_batch_events=1000)
    for seq in range(20):
        tracker.message("s-1", "assistant", "é" * 500, seq=seq)  # 1,000 bytes of UTF-8 each
    tracker.record("s-1", processing_time=0.5)
    tracker.flush(wait=False)

    wait_until(lambda: tracker.stats.events_pending == 0, message="every part published")
    sizes = [len(json.dumps(m, ensure_ascii=False).encode()) for m in recorder.messages]
    assert len(recorder.messages) > 1 and max(sizes) <= 4096, sizes
    seqs = [e["seq"] for e in recorder.events() if e["kind"] == "message"]
    assert seqs == list(range(20))  # in order, each once
    assert [e["kind"] for e in recorder.events()][-1] == "record"
    assert len({m["batch_id"] for m in recorder.messages}) == len(recorder.messages)
    stats = tracker.stats
    assert (stats.events_sent, stats.batches_sent) == (21, len(recorder.messages))


def test_the_tracker_publishes_again_once_the_broker_is_back(
    make_tracker: Any, recorder: RecordingPublisher
) -> None:
    recorder.failures = sending.PUBLISH_ATTEMPTS  # the first batch is given up
    tracker = make_tracker()
    tracker.record("s-1")
    tracker.flush()
    wait_until(lambda: tracker.stats.batches_failed == 1, message="the first batch given up")

    def sent_after_the_pause() -> bool:
        tracker.record("s-2")
        tracker.flush()
        return tracker.stats.batches_sent > 0

    wait_until(
        sent_after_the_pause,
        timeout=sending.BROKER_DOWN_PAUSE + DEADLINE,
        message="a batch sent after the pause",
    )
    assert recorder.events()[-1]["session_id"] == "s-2"


def test_record_never_blocks_when_the_publisher_hangs(
    make_tracker: Any, recorder: RecordingPublisher
) -> None:
    recorder.hang.set()
    # Without a spool a full buffer has nowhere to spill (test_tracker_spool.py has the spill).
    tracker = make_tracker(max_batch_events=10, max_buffered_events=100, spool=None)
    tracker.record("s-1")
    tracker.flush()
    wait_until(lambda: recorder.calls, message="the publisher to be stuck")

    # The publisher now waits forever (until released): a record that published, or waited
    # for the publisher, would never return.
    for _ in range(1000):
        tracker.record("s-1")
    assert threading.get_ident() not in recorder.threads
    stats = tracker.stats
    assert stats.events_recorded == 101  # the one being published, and a full buffer
    assert stats.events_dropped == 900

    with pytest.raises(FlushTimeoutError, match="not published"):
        tracker.flush(wait=True, timeout=0.2)
    tracker.close(timeout=0.2)  # returns although the publisher is still stuck
    assert not recorder.release.is_set()
    recorder.release.set()


def test_close_publishes_what_is_buffered_and_drops_later_events(
    make_tracker: Any, recorder: RecordingPublisher
) -> None:
    with make_tracker() as tracker:
        for index in range(5):
            tracker.record(f"s-{index}")
    assert len(recorder.events()) == 5
    assert tracker.closed
    tracker.record("s-late")  # does not raise
    tracker.close()  # closing twice is harmless
    assert tracker.stats.events_dropped == 1
    assert len(recorder.events()) == 5


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda t: t.record("has space"), "session_id"),
        (lambda t: t.record("s", processing_time=-1), "processing_time"),
        (lambda t: t.record("s", processing_time=float("nan")), "processing_time"),
        (lambda t: t.record("s", error="yes"), "error"),
        (lambda t: t.record("s", input_tokens=-3), "input_tokens"),
        (lambda t: t.record("s", cost=float("inf")), "cost"),
        (lambda t: t.record("s", user_id=""), "user_id"),
        (lambda t: t.record("s", at=datetime(2024, 1, 1)), "at"),
        (lambda t: t.record("s", at=datetime.now(UTC) + timedelta(hours=1)), "at"),
        (lambda t: t.create("s", metadata={"x": "y" * 20_000}), "metadata"),
        (lambda t: t.end("s", status="done"), "status"),
    ],
)
def test_invalid_arguments_raise_naming_the_field(
    make_tracker: Any, recorder: RecordingPublisher, call: Any, field: str
) -> None:
    tracker = make_tracker()
    with pytest.raises(ValidationError, match=field):
        call(tracker)
    assert tracker.stats.events_recorded == 0


ONE_HOUR_EAST, ONE_HOUR_WEST = timezone(timedelta(hours=1)), timezone(timedelta(hours=-1))


def _deep(levels: int) -> dict[str, Any]:
    value: Any = "x"
    for _ in range(levels):
        value = {"a": value}
    return dict(value)


@pytest.mark.parametrize(
    ("call", "field", "rule"),
    [
        (lambda t: t.create("s", metadata={"note": "\ud800"}), "metadata", "lone surrogate"),
        (lambda t: t.create("s", metadata={"k\x00": 1}), "metadata", "NUL character"),
        (lambda t: t.create("s", metadata=_deep(300)), "metadata", "nested at most 32"),
        (lambda t: t.create("s", metadata=_deep(5_000)), "metadata", "nested at most 32"),
        (lambda t: t.record("s", input_tokens=2**64), "input_tokens", "less than or equal"),
        (lambda t: t.record("s", output_tokens=2**63 - 1), "output_tokens", "less than or equal"),
        (
            lambda t: t.record("s", at=datetime(1, 1, 1, tzinfo=ONE_HOUR_EAST)),
            "at",
            "before 2000-01-01",
        ),
        (
            lambda t: t.end("s", at=datetime(9999, 12, 31, 23, 59, tzinfo=ONE_HOUR_WEST)),
            "at",
            "5 minutes in the future",
        ),
    ],
)
def test_what_could_not_be_serialised_or_stored_is_refused_up_front_naming_the_field(
    make_tracker: Any, recorder: RecordingPublisher, call: Any, field: str, rule: str
) -> None:
    tracker = make_tracker()
    with pytest.raises(ValidationError) as caught:  # a ValueError, never an OverflowError
        call(tracker)
    (error,) = caught.value.errors()
    assert error["loc"][-1] == field and rule in error["msg"]
    assert tracker.stats.events_recorded == 0
    tracker.record("s")  # and the tracker goes on as before
    tracker.flush()
    wait_until(lambda: len(recorder.events()) == 1, message="the next event published")


def test_an_event_that_cannot_be_serialised_costs_only_itself_and_blames_no_broker(
    make_tracker: Any,
    recorder: RecordingPublisher,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from sessions import rules

    tracker = make_tracker()
    for index in range(3):
        tracker.record("before", processing_time=index)
    # A hole in the model's rules (a bug) lets a lone surrogate through: defence in depth.
    monkeypatch.setattr(rules, "metadata_problem", lambda metadata: None)
    tracker.create("bad", metadata={"note": "\ud800"})
    for index in range(3):
        tracker.record("after", processing_time=index)
    refused = pytest.raises(UnserializableBatchError, match="1 events could not be serialised")
    with caplog.at_level(logging.ERROR, logger="sessions.tracker"), refused:
        tracker.flush(wait=True, timeout=DEADLINE)
    assert [e["session_id"] for e in recorder.events()] == ["before"] * 3 + ["after"] * 3
    stats = tracker.stats
    assert (stats.events_refused, stats.batches_failed, stats.events_spooled) == (1, 0, 0)
    assert any(
        "cannot be serialised" in r.getMessage() and "session bad" in r.getMessage()
        for r in caplog.records
    )
    tracker.record("later")  # no broker-down pause, no spool: straight out
    tracker.flush()
    wait_until(lambda: len(recorder.events()) == 7, message="the next batch published")
    assert tracker.stats.batches_failed == 0


def test_a_batch_the_publisher_cannot_encode_is_no_broker_outage(make_tracker: Any) -> None:
    sent: list[str] = []

    class Picky(Publisher):
        """Refuses to encode one batch's text, as CeleryPublisher would."""

        def publish_text(self, text: str) -> None:
            if '"poison"' in text:
                raise UnserializableBatchError("the broker client cannot encode it")
            sent.append(text)

    tracker = make_tracker(publisher=Picky(), max_batch_events=2)
    tracker.record("poison")
    tracker.record("poison")
    tracker.record("fine")
    with pytest.raises(UnserializableBatchError, match="2 events could not be serialised"):
        tracker.flush(wait=True, timeout=DEADLINE)
    assert len(sent) == 1 and '"fine"' in sent[0]
    stats = tracker.stats
    assert (stats.events_refused, stats.batches_failed, stats.events_spooled) == (2, 0, 0)


def test_the_celery_publisher_blames_the_message_when_it_cannot_be_encoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kombu.exceptions import EncodeError

    publisher = CeleryPublisher(Settings(broker_url="memory://"))
    try:
        with pytest.raises(UnserializableBatchError, match="surrogates not allowed"):
            publisher({"batch_id": str(uuid.uuid4()), "events": [{"note": "\ud800"}]})

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise EncodeError("cannot encode")

        monkeypatch.setattr("kombu.messaging.Producer.publish", refuse)
        with pytest.raises(UnserializableBatchError, match="cannot encode"):
            publisher.publish_text("{}")
    finally:
        publisher.close()


def test_flush_wait_returns_once_every_batch_is_in_the_ledger(tmp_path: Path) -> None:
    store = SessionStore(f"sqlite:///{tmp_path / 's.db'}", settings=Settings())
    store.upgrade()
    applying = threading.Event()

    def apply_later(message: dict[str, Any]) -> None:
        # A stand-in worker: applies each batch a moment after it was published.
        def apply() -> None:
            applying.wait(5)
            store.apply(message)

        threading.Thread(target=apply, daemon=True).start()

    with SessionTracker(
        Settings(), publisher=apply_later, store=store, max_batch_events=7
    ) as tracker:
        for index in range(50):
            tracker.record(f"s-{index % 3}", error=index % 5 == 0)
        with pytest.raises(FlushTimeoutError, match="not applied"):
            tracker.flush(wait=True, timeout=0.3)
        applying.set()
        tracker.flush(wait=True, timeout=DEADLINE)
        totals = store.aggregate()
        assert (totals.sessions, totals.request_count, totals.error_count) == (3, 50, 10)
    store.dispose()


def test_a_forked_child_starts_with_an_empty_buffer(
    make_tracker: Any, recorder: RecordingPublisher
) -> None:
    tracker = make_tracker()
    for _ in range(3):
        tracker.record("s-parent")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        # Whatever happens, the child must not outlive the test nor hold its output open.
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(int(2 * DEADLINE))
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        ok = tracker.stats.events_recorded == 0
        tracker.record("s-child")
        tracker.flush()
        wait_until(lambda: not tracker.stats.events_pending, message="the child's batch")
        ok = ok and [e["session_id"] for e in recorder.events()] == ["s-child"]
        os.write(write_end, b"ok" if ok else b"no")
        os._exit(0)
    os.close(write_end)
    status = None

    def child_exited() -> bool:
        nonlocal status
        done, status = os.waitpid(pid, os.WNOHANG)
        return done == pid

    try:
        wait_until(child_exited, timeout=3 * DEADLINE, message="the forked child to finish")
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    assert os.read(read_end, 2) == b"ok" and os.waitstatus_to_exitcode(status or 0) == 0
    os.close(read_end)
    tracker.close()
    assert [e["session_id"] for e in recorder.events()] == ["s-parent"] * 3


def test_batches_are_immutable_and_carry_a_uuid(
    make_tracker: Any, recorder: RecordingPublisher
) -> None:
    tracker = make_tracker()
    tracker.record("s-1")
    tracker.flush()
    wait_until(lambda: recorder.messages, message="the batch")
    batch = Batch.model_validate(recorder.messages[0])
    assert isinstance(batch.batch_id, uuid.UUID)
    with pytest.raises(ValidationError):
        batch.batch_id = uuid.uuid4()  # type: ignore[misc]


#: Audit events (``sys.addaudithook``) that mean I/O: none may come from ``record``
#: (``time.sleep`` is audited from Python 3.12 on).
IO_AUDIT_EVENTS = ("open", "socket.", "subprocess.", "os.system", "sqlite3.", "time.sleep")
#: Audit events seen on a thread while it is marked as recording (see the test below).
_seen_while_recording: list[str] = []
_recording = threading.local()


def _audit(event: str, _arguments: tuple[Any, ...]) -> None:
    if getattr(_recording, "on", False) and event.startswith(IO_AUDIT_EVENTS):
        _seen_while_recording.append(event)


def test_record_does_no_io(make_tracker: Any) -> None:
    """What ``record`` costs is measured in ``bench.ingest`` (``record_us``), never asserted
    here as a time; asserted is what keeps it cheap on a machine however busy: no file,
    socket, process or database on the calling thread (that it never waits for the
    publisher is the hanging-publisher test above)."""
    sys.addaudithook(_audit)  # for the rest of the process; it reacts to marked threads only
    tracker = make_tracker(max_batch_events=500)
    _seen_while_recording.clear()
    _recording.on = True
    try:
        for _ in range(20_000):
            tracker.record("user-123-device-789", 0.25, False, "user-123")
    finally:
        _recording.on = False
    assert _seen_while_recording == []
    assert tracker.stats.events_recorded == 20_000


def test_changing_metadata_after_create_changes_nothing_sent(
    make_tracker: Any, recorder: RecordingPublisher
) -> None:
    """Review of issue 12, finding 5: the buffered event held the caller's own list, so what
    was appended after ``create`` (a lone surrogate, 20 KB) was sent, unchecked."""
    files: list[str] = []
    tracker = make_tracker()
    tracker.create("s", metadata={"files": files})
    tracker.record("other", processing_time=0.1)
    files.append(os.fsdecode(b"\xff"))
    files.append("x" * 20_000)
    tracker.flush()  # flush(wait=True) raised UnserializableBatchError
    wait_until(lambda: len(recorder.events()) == 2, message="both events published")
    created = [e for e in recorder.events() if e["kind"] == "create"]
    assert [e["metadata"] for e in created] == [{"files": []}]
    assert tracker.stats.events_refused == 0


def test_a_tracker_whose_spool_outlives_the_ledger_is_refused_at_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review of the client's settings: the exactly-once guard (the ledger outlives the spool
    and the broker's redelivery) is checked by the agent's own settings, as it was when the
    tracker read the full Settings."""
    from pydantic import ValidationError

    monkeypatch.setenv("SESSIONS_BROKER_URL", "memory://")
    monkeypatch.setenv("SESSIONS_SPOOL_MAX_AGE_DAYS", "30")  # the ledger keeps 14 days
    with pytest.raises(ValidationError, match="ledger_retention_days must outlive"):
        SessionTracker()
