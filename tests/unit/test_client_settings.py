"""The client's own reader of ``SESSIONS_*`` gives what pydantic-settings gives.

:class:`ClientSettings` reads the environment without pydantic-settings (an agent's start-up
is measured, and that import costs it about 40 ms); :class:`Settings` inherits its fields and
reads them with pydantic-settings. For every client field, both readers must give the same
value, or refuse with the same errors (field, rule, no value shown).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sessions.client_model import ClientModel
from sessions.client_settings import (
    CLIENT_FIELDS,
    ENV_PREFIX,
    ClientSettings,
    client_values,
    environment_values,
)
from sessions.settings import Settings, describe_settings_error, full_settings

#: Per kind of field, values an operator might set: good ones, and ones the rule refuses.
SAMPLES: dict[str, list[str]] = {
    "int": ["1", "25", " 7 ", "0", "-3", "2.0", "2.5", "1e3", "", "ten", "99999999999999999999"],
    "float": ["0.5", "1", "7", "1e-3", "0", "-1", "nan", "inf", "", "soon", " 2.5 "],
    "bool": ["true", "false", "1", "0", "yes", "no", "on", "off", "TRUE", "", "maybe"],
    "str": ["redis://127.0.0.1:6379/3", "filesystem://", "memory://", "", " x "],
    "path": ["/tmp/spool", "relative/dir", "", "~/x"],
    "confirmer": ["auto", "redis", "ledger", "AUTO", "", "kafka"],
}


def _kind(name: str) -> str:
    annotation = str(Settings.model_fields[name].annotation)
    if name == "confirmer":
        return "confirmer"
    for kind in ("bool", "int", "float", "str"):
        if annotation == f"<class '{kind}'>":
            return kind
    assert "Path" in annotation, annotation
    return "path"


@pytest.fixture(autouse=True)
def _no_sessions_environment() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for key in list(os.environ):
            if key.upper().startswith(ENV_PREFIX):
                patch.delenv(key)
        yield


def _both(environ: dict[str, str]) -> tuple[Any, Any]:
    """What each reader makes of ``environ``: the client fields' values, or the errors."""
    outcomes = []
    with pytest.MonkeyPatch.context() as patch:
        for key, value in environ.items():
            patch.setenv(key, value)
        for read in (ClientSettings.from_environment, Settings):
            try:
                made = read()
            except ValidationError as error:
                outcomes.append(
                    (
                        "refused",
                        error.errors(include_url=False, include_input=False, include_context=False),
                    )
                )
            else:
                outcomes.append(("read", {name: getattr(made, name) for name in CLIENT_FIELDS}))
    client, full = outcomes  # a refusal's title differs (the class's name); its errors not
    return client, full


@pytest.mark.parametrize("name", CLIENT_FIELDS)
def test_each_client_field_is_read_as_pydantic_settings_reads_it(name: str) -> None:
    variable = f"{ENV_PREFIX}{name.upper()}"
    if name == "confirmer":  # 'redis' needs a Redis broker: with and without one
        cases = [{variable: value} for value in SAMPLES["confirmer"]]
        cases += [
            {variable: value, f"{ENV_PREFIX}BROKER_URL": "redis://127.0.0.1:6379"}
            for value in SAMPLES["confirmer"]
        ]
    else:
        cases = [{variable: value} for value in SAMPLES[_kind(name)]]
    for environ in cases:
        client, full = _both(environ)
        assert client == full, environ


def test_the_variable_name_is_matched_in_any_case() -> None:
    client, full = _both({"sessions_Batch_Max_Events": "17"})
    assert client == full
    assert client[1]["batch_max_events"] == 17


def test_an_unset_environment_gives_the_defaults_of_settings() -> None:
    client, full = _both({})
    assert client == full
    assert (
        client[1]["spool_dir"]
        == Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "agent-sessions"
        / "spool"
    )


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(CLIENT_FIELDS),
    value=st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
    ),
)
def test_any_value_of_any_client_field_gets_the_same_answer(name: str, value: str) -> None:
    client, full = _both({f"{ENV_PREFIX}{name.upper()}": value})
    assert client == full


def test_a_refusal_names_the_variable_and_the_rule_never_the_value() -> None:
    with pytest.raises(ValidationError) as refused:
        ClientSettings.from_environment(
            {
                f"{ENV_PREFIX}BROKER_URL": "redis://u:hunter2@h",
                f"{ENV_PREFIX}FLUSH_INTERVAL_MS": "-5",
            }
        )
    text = describe_settings_error(refused.value)
    assert text == "invalid settings: SESSIONS_FLUSH_INTERVAL_MS: Input should be greater than 0"
    assert "hunter2" not in str(refused.value) and "-5" not in str(refused.value)


def test_environment_values_reads_only_the_fields_named() -> None:
    environ = {"SESSIONS_BROKER_URL": "memory://", "SESSIONS_METRICS_PORT": "9", "OTHER": "1"}
    assert environment_values(CLIENT_FIELDS, environ) == {"broker_url": "memory://"}


def test_a_client_settings_becomes_full_settings_with_its_values_kept() -> None:
    client = ClientSettings(broker_url="memory://", batch_max_events=3)
    full = full_settings(client)
    assert isinstance(full, Settings)
    assert client_values(full) == client_values(client)
    assert full_settings(full) is full


def test_the_ledger_must_outlive_the_spool_in_the_agent_too() -> None:
    # The exactly-once guard: an agent whose spool keeps batches longer than the ledger keeps
    # their ids would have a replayed batch counted twice; it is refused where it is set.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(f"{ENV_PREFIX}SPOOL_MAX_AGE_DAYS", "30")
        with pytest.raises(ValidationError, match="ledger_retention_days must outlive"):
            ClientSettings.from_environment()
        patch.setenv(f"{ENV_PREFIX}LEDGER_RETENTION_DAYS", "31")
        assert ClientSettings.from_environment().spool_max_age_days == 30


_PYTHON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["auto", "redis", "ledger", "7", " 7 ", "0.5", "true", "/tmp/x"]),
    st.builds(Path, st.sampled_from(["/tmp/spool", "relative", ""])),
)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(CLIENT_FIELDS), value=_PYTHON_VALUES)
def test_a_value_given_in_python_gets_the_answer_pydantic_gives(name: str, value: Any) -> None:
    # ClientSettings keeps plain values itself and hands the rest to ClientModel: either way
    # the outcome must be the model's, value for value and error for error.
    outcomes = []
    for make in (lambda: ClientSettings(**{name: value}), lambda: ClientModel(**{name: value})):
        try:
            made = make()
        except ValidationError as error:
            outcomes.append(
                error.errors(include_url=False, include_context=False, include_input=False)
            )
        else:
            outcomes.append(client_values(made))
    assert outcomes[0] == outcomes[1]


def test_plain_environment_values_are_read_without_pydantic(tmp_path: Path) -> None:
    # The agent's start-up: every client field set in its plain form, read and checked
    # without importing pydantic; a value that is not plain imports it to be decided.
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from sessions.client_settings import ClientSettings\n"
        "made = ClientSettings.from_environment()\n"
        "print(made.batch_max_events, made.broker_confirmations, 'pydantic' in sys.modules)\n"
    )
    plain = {
        "SESSIONS_BROKER_URL": "redis://127.0.0.1:6379/3",
        "SESSIONS_BATCH_MAX_EVENTS": "700",
        "SESSIONS_FLUSH_INTERVAL_MS": "20",
        "SESSIONS_CONFIRM_TIMEOUT_SECONDS": "0",
        "SESSIONS_SPOOL_MAX_AGE_DAYS": "2.5",
        "SESSIONS_BROKER_CONFIRMATIONS": "false",
        "SESSIONS_CONFIRMER": "redis",
        "SESSIONS_SPOOL_DIR": str(tmp_path),
    }
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    for extra, expected in (
        ({}, "700 False False"),
        ({"SESSIONS_BATCH_MAX_EVENTS": " 7 "}, "7 False True"),
    ):
        done = subprocess.run(
            [sys.executable, "-c", script],
            env={**environ, **plain, **extra},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert done.stdout.split() == expected.split(), done.stderr
