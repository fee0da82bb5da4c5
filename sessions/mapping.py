"""Read-only dict access for the guide-facing objects, as aiecs's own context engine gives.

aiecs 2.2.0's ``ContextEngine`` returns plain dicts (``session["request_count"]``), the guide
reads attributes (``session.request_count``); the objects of :mod:`sessions.context_engine`
and :mod:`sessions.conversation` serve both, from their ``to_dict()``.
"""

from __future__ import annotations

from collections.abc import KeysView
from typing import Any


class MappingAccess:
    """``obj[key]``, ``obj.get(key)``, ``key in obj``, ``obj.keys()`` and ``dict(obj)`` over
    ``to_dict()``, which the class defines."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def keys(self) -> KeysView[str]:
        return self.to_dict().keys()

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()
