"""The README is the settings reference: it must name every setting the code knows."""

from __future__ import annotations

from pathlib import Path

from sessions.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_starts_with_the_two_commands() -> None:
    head = README.read_text().split("## ", 1)[0]
    assert "make demo" in head and "make test" in head


def test_readme_documents_every_setting() -> None:
    text = README.read_text()
    missing = [
        f"SESSIONS_{name.upper()}"
        for name in Settings.model_fields
        if f"`SESSIONS_{name.upper()}`" not in text
    ]
    assert not missing, f"settings missing from the README's configuration table: {missing}"


def test_readme_documents_every_worker_metric_and_dead_letter_reason() -> None:
    from prometheus_client import CollectorRegistry

    from sessions.worker.metrics import DEAD_LETTER_REASONS, WorkerMetrics

    registry = CollectorRegistry()
    WorkerMetrics(registry)
    names = [
        family.name + ("_total" if family.type == "counter" else "")
        for family in registry.collect()
    ]
    text = README.read_text()
    missing = [name for name in [*names, *DEAD_LETTER_REASONS] if f"`{name}`" not in text]
    assert len(names) == 11
    assert not missing, f"metrics or reasons missing from the README's Metrics section: {missing}"


def test_readme_shows_the_testing_example_that_runs() -> None:
    example = (Path(__file__).parent / "test_testing_example.py").read_text()
    code = example[example.index("from sessions import SessionTracker") :]
    assert f"```python\n{code}```" in README.read_text()
