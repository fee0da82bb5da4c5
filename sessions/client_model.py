"""The client's settings as a pydantic model: what decides a value the plain reader does not.

:class:`~sessions.client_settings.ClientSettings` takes plain values itself and hands the rest
to :class:`ClientModel` (an agent imports this module, and pydantic, only then);
:class:`~sessions.settings.Settings` is a ``ClientModel`` too, so the worker's, the CLI's and
the agent's settings accept and refuse each client field in the same words.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sessions.client_settings import ClientSettings, client_rule_problem, default_spool_dir
from sessions.redact import mask_value


class ClientModel(BaseModel, ClientSettings):
    """:class:`~sessions.client_settings.ClientSettings`' fields (collected by pydantic from
    the dataclass, with their :class:`~sessions.client_settings.Bounds`), validated by
    pydantic, and the client's rules between them."""

    # hide_input_in_errors: a ValidationError shows no input, since the input may hold a
    # credential (a URL's password).
    model_config = ConfigDict(
        extra="ignore", frozen=True, hide_input_in_errors=True, title="ClientSettings"
    )

    # Pydantic reads a dataclass field's default, not its default_factory: said again here.
    spool_dir: Path = Field(default_factory=default_spool_dir)

    @model_validator(mode="after")
    def _check_client_rules(self) -> ClientModel:
        problem = client_rule_problem(self)
        if problem is not None:
            raise ValueError(problem)
        return self

    def __repr_args__(self) -> Any:
        # repr() and str() mask what could hold a credential (the URLs' passwords).
        for name, value in super().__repr_args__():
            yield name, mask_value(name or "", value)
