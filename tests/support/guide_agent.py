"""An agent around the guide's pool and timeout patterns (``examples/guide_patterns.py`` has
their code as the guide writes it): one that went quiet an hour ago, one that serves."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from sessions.context_engine import ContextEngine

#: Activity an hour old: idle past the guide's 30 minutes.
AN_HOUR = timedelta(hours=1)


async def agent_went_quiet(context_engine: ContextEngine, session_id: str, requests: int) -> None:
    """An agent that served ``requests`` an hour ago and then nothing (event times are kept)."""
    tracker, hour_ago = context_engine.tracker, datetime.now(UTC) - AN_HOUR
    tracker.create(session_id, user_id=session_id.removeprefix("user-"), at=hour_ago)
    for _ in range(requests):
        tracker.record(session_id, processing_time=1.0, at=hour_ago)
    await asyncio.to_thread(tracker.flush, wait=True)


async def serve(context_engine: ContextEngine, session_id: str, requests: int) -> None:
    """What the agent does with the id the pool hands out (the guide's ``update_session``)."""
    for _ in range(requests):
        await context_engine.update_session(
            session_id, increment_requests=True, add_processing_time=0.25
        )
