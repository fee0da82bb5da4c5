"""kombu's filesystem transport, with message files that appear whole or not at all.

The embedded default broker (``filesystem://``) is kombu's filesystem transport, whose
producer (kombu 5.x up to at least 5.7.0, ``kombu.transport.filesystem.Channel._put``) opens
the message file under its final name and only then locks it and writes the body. A consumer
polling the folder (``_get``) takes no lock: it can move the file away and read it while it is
still empty, and ``loads("")`` raises ``JSONDecodeError`` in the worker's main process, which
Celery reports as ``Unrecoverable error`` before it exits (kombu #1551). On a busy machine a
producer is preempted between the ``open`` and the ``write`` often enough for a demo's worker
to die this way.

:class:`Transport` is the same transport with one change: a message is written under a name
no consumer reads (a leading dot and a ``.part`` suffix) and renamed to its final name when
complete. A rename within a folder is atomic, so a consumer finds the whole message or none.
Celery uses it through ``broker_transport`` (see ``sessions.worker.config.from_settings``); the
folders, names and format are kombu's, so producers and consumers of either kind read each other's
messages.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


def message_filename(queue: str) -> str:
    """kombu's name for a message file of ``queue``: its sort order is its queue order."""
    return f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"


def partial_filename(final: str) -> str:
    """Where a message is written before it is complete: a name no consumer takes.

    kombu's consumer takes a file whose name, after its first dot, is ``<queue>.msg``; with a
    leading dot and a suffix this name never matches.
    """
    return f".{final}.part"


class Channel(filesystem.Channel):
    """A filesystem channel whose ``_put`` publishes each message file atomically."""

    # kombu names the body `message` in its virtual base and `payload` here; callers pass it
    # by position.
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Write ``payload`` beside the queue under a private name, then rename it into place.

        :raises kombu.exceptions.ChannelError: the folder cannot be written.
        """
        folder = self.data_folder_out
        final = os.path.join(folder, message_filename(queue))
        partial = os.path.join(folder, partial_filename(os.path.basename(final)))
        try:
            with open(partial, "wb", buffering=0) as file:
                file.write(str_to_bytes(dumps(payload)))  # type: ignore[no-untyped-call]
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    """kombu's filesystem transport with :class:`Channel`."""

    Channel = Channel
