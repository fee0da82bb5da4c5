"""The guide's Pattern 1 and Pattern 2 with a real, unmodified AIECS agent on this project's
``ContextEngine``, and agent state saved through aiecs's own ``ContextEngineAdapter``.

It needs aiecs 2.2.0 (``pip install aiecs==2.2.0``, which this project never depends on) and a
running worker (``sessions worker``) on the configured broker and database. The LLM is a stub
subclassing aiecs's ``BaseLLMClient`` (no key, no network), answering after
:data:`THINKING_SECONDS`. It prints one JSON report of what the engine holds after each pattern;
``tests/acceptance/test_aiecs_agent.py`` runs it in a virtualenv of its own and checks it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

from aiecs.domain.agent import AgentConfiguration, HybridAgent
from aiecs.domain.agent.integration import ContextEngineAdapter
from aiecs.llm import BaseLLMClient, LLMMessage, LLMResponse

from sessions import ContextEngine

#: How long the stub LLM takes to answer: each task's processing time is at least this.
THINKING_SECONDS = 0.05


class StubLLM(BaseLLMClient):
    """Answers every task at once and the same way. aiecs asks a ``HybridAgent``'s client for
    function calling (a ``tools`` parameter) when the agent has tools."""

    def __init__(self) -> None:
        super().__init__("stub")
        self.prompts: list[list[tuple[str, str]]] = []

    async def generate_text(
        self,
        messages: list[LLMMessage],
        model: str | None = None,
        temperature: float = 0.7,
        max_tokens: int | None = None,
        context: dict[str, Any] | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        **kwargs: Any,
    ) -> LLMResponse:
        self.prompts.append([(m.role, str(m.content)) for m in messages])
        await asyncio.sleep(THINKING_SECONDS)
        task = str(messages[-1].content).removeprefix("Task: ")
        return LLMResponse(content=f"Answer to {task}", provider="stub", model="stub-1")

    async def stream_text(self, messages: list[LLMMessage], **kwargs: Any) -> Any:
        yield "Answer"

    async def close(self) -> None:
        pass


class ErrorLog(logging.Handler):
    """Every ERROR (or worse) aiecs logs: a call it makes on the engine that fails is one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


async def guide_agent(context_engine: ContextEngine, llm_client: StubLLM) -> HybridAgent:
    """The agent both patterns make, as the guide makes it (HybridAgent also needs ``name``)."""
    agent = HybridAgent(
        agent_id="agent-1",
        name="agent-1",
        llm_client=llm_client,
        tools=["search"],
        config=AgentConfiguration(),
        context_engine=context_engine,
    )
    await agent.initialize()
    return agent


async def pattern_1(context_engine: ContextEngine, llm_client: StubLLM) -> None:
    """The guide's "Pattern 1: Basic Lifecycle"."""
    agent = await guide_agent(context_engine, llm_client)

    # 1. Create session (automatic on first request)
    session_id = "user-123"
    await agent.execute_task({"description": "Hello"}, {"session_id": session_id})
    # 2. Use session for multiple requests
    for i in range(5):
        await agent.execute_task({"description": f"Request {i}"}, {"session_id": session_id})
    # 3. End session explicitly
    await context_engine.end_session(session_id, status="completed")


async def pattern_2(context_engine: ContextEngine, llm_client: StubLLM) -> HybridAgent:
    """The guide's "Pattern 2: Explicit Session Creation"."""
    await context_engine.create_session(
        session_id="user-123",
        user_id="user-456",
        metadata={"source": "web", "device": "mobile", "ip_address": "192.168.1.1"},
    )
    agent = await guide_agent(context_engine, llm_client)
    await agent.execute_task({"description": "Hello"}, {"session_id": "user-123"})
    await context_engine.end_session("user-123", status="completed")
    return agent


async def checkpoints(context_engine: ContextEngine, agent: HybridAgent) -> dict[str, Any]:
    """Agent state through aiecs's ContextEngineAdapter, as an agent's persistence uses it."""
    adapter = ContextEngineAdapter(context_engine, user_id="user-456")
    state = {"answered": 7, "topics": ["greeting", "requests"]}
    version = await adapter.save_agent_state(agent.agent_id, state)
    loaded = await adapter.load_agent_state(agent.agent_id, version)
    await adapter.save(agent)  # agent.to_dict(): datetimes and all
    latest = await context_engine.get_checkpoint(agent.agent_id)
    versions = await adapter.list_agent_versions(agent.agent_id)
    return {
        "saved": state,
        "loaded": loaded,
        "versions": [v["version"] for v in versions],
        "first_version": version,
        "latest_state_agent_id": latest["data"]["state"]["agent_id"] if latest else None,
    }


async def history(context_engine: ContextEngine, session_id: str) -> list[list[str]]:
    return [[m.role, m.content] for m in await context_engine.get_conversation_history(session_id)]


async def main() -> dict[str, Any]:
    errors = ErrorLog()
    logging.getLogger("aiecs").addHandler(errors)
    llm_client = StubLLM()
    report: dict[str, Any] = {}
    context_engine = ContextEngine()
    await context_engine.initialize()
    try:
        await pattern_1(context_engine, llm_client)
        session = await context_engine.get_session("user-123")
        report["pattern_1"] = {
            "session": None if session is None else session.to_dict(),
            "conversation": await history(context_engine, "user-123"),
        }
        agent = await pattern_2(context_engine, llm_client)
        session = await context_engine.get_session("user-123")
        report["pattern_2"] = {
            "session": None if session is None else session.to_dict(),
            "conversation": await history(context_engine, "user-123"),
        }
        report["checkpoints"] = await checkpoints(context_engine, agent)
        # What each prompt held of the conversation before it: the history the agent read
        # from the engine at the start of each task.
        report["prompts"] = llm_client.prompts
    finally:
        await context_engine.close()
    report["thinking_seconds"] = THINKING_SECONDS
    report["aiecs_errors"] = errors.messages
    return report


if __name__ == "__main__":
    json.dump(asyncio.run(main()), sys.stdout, indent=2)
    print()
