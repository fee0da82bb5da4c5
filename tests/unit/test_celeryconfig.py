"""The Celery configuration per broker: what RabbitMQ gets (quorum queues, confirms, delayed
delivery for countdowns) and what Redis and the filesystem broker keep."""

from __future__ import annotations

from typing import Any

import pytest

from sessions.settings import Settings
from sessions.worker import config
from sessions.worker.celery_app import create_app

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/sessions"


def test_on_rabbitmq_both_queues_are_durable_quorum_queues_on_a_topic_exchange() -> None:
    queues = config.task_queues_for(Settings(broker_url=AMQP_URL))
    assert [queue.name for queue in queues] == ["sessions.events", "sessions.maintenance"]
    for queue in queues:
        assert queue.durable and not queue.auto_delete
        assert queue.queue_arguments == {"x-queue-type": "quorum", "x-delivery-limit": 1_000_000}
        assert queue.exchange.type == "topic" and queue.exchange.durable
        assert queue.routing_key == queue.name


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "filesystem://"])
def test_other_brokers_keep_plain_queues_on_a_direct_exchange(url: str) -> None:
    for queue in config.task_queues_for(Settings(broker_url=url)):
        assert queue.queue_arguments is None
        assert queue.exchange.type == "direct"


def test_on_rabbitmq_publishes_wait_for_confirms_and_messages_are_persistent() -> None:
    app = create_app(Settings(broker_url=AMQP_URL))
    assert app.conf.broker_transport_options == {"confirm_publish": True}
    assert app.conf.task_default_delivery_mode == "persistent"
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    # Celery sees the quorum queues: per-consumer QoS, and native delayed delivery.
    assert app.conf.worker_detect_quorum_queues
    assert app.conf.broker_native_delayed_delivery_queue_type == "quorum"


def test_on_rabbitmq_a_retry_countdown_goes_through_native_delayed_delivery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not held unacknowledged in the worker: routed to Celery's delay exchanges (no broker is
    contacted; the message the app would publish is captured)."""
    app = create_app(Settings(broker_url=AMQP_URL))
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(
        app.amqp,
        "send_task_message",
        lambda producer, name, message, **options: sent.append(options),
    )
    app.send_task("sessions.ingest", args=["{}"], countdown=300)
    app.send_task("sessions.ingest", args=["{}"])
    delayed, plain = sent
    assert delayed["exchange"].name == "celery_delayed_27"
    assert delayed["routing_key"].endswith(".sessions.events")
    assert plain["queue"].name == "sessions.events"


@pytest.mark.parametrize(
    ("url", "reserved"),
    [
        ("redis://127.0.0.1:6379/0", 1),
        ("rediss://127.0.0.1:6379/0", 1),
        (AMQP_URL, 1),
        ("filesystem://", 4),
    ],
)
def test_each_pool_process_reserves_one_message_ahead_unless_the_broker_is_polled(
    url: str, reserved: int
) -> None:
    # A polled broker is looked at again only a poll later once the reservations are full.
    settings = Settings(broker_url=url)
    assert config.prefetch_multiplier(settings) == reserved
    assert create_app(settings).conf.worker_prefetch_multiplier == reserved


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", AMQP_URL, "filesystem://"])
def test_a_prefetch_multiplier_set_is_kept_on_every_broker(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SESSIONS_WORKER_PREFETCH_MULTIPLIER", "3")
    settings = Settings(broker_url=url)
    assert settings.worker_prefetch_multiplier == 3
    assert create_app(settings).conf.worker_prefetch_multiplier == 3


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_a_prefetch_multiplier_must_be_a_positive_integer(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("SESSIONS_WORKER_PREFETCH_MULTIPLIER", value)
    with pytest.raises(ValidationError, match="worker_prefetch_multiplier"):
        Settings()
