"""kombu's filesystem transport with messages that appear whole (the embedded default broker).

kombu 5.7's ``filesystem`` transport (and every release before it) writes a message by
opening its final name, ``<ms>_<uuid>.<queue>.msg``, and then writing the body, while a
consumer lists the folder, moves each matching file away (a rename: the producer's advisory
lock stops nothing) and reads it. A consumer that comes between the producer's open and its
write reads an empty file: ``JSONDecodeError: Expecting value`` in the consumer's loop, which
kills the worker ("Unrecoverable error"), and the message is gone with the file it removed.
The window is tiny on an idle machine and wide on a busy one (seen in ``make demo``'s worker
under load; kombu issue #1551 reports the same error, still open).

Here a message is written under a name no consumer matches (``.<name>.part``) and renamed
into place, so a consumer sees a complete message or none. Reading is unchanged, so workers
and producers with and without this module share a folder safely in either direction of an
upgrade (an unpatched producer keeps its race). Selected with ``broker_transport`` in
``celeryconfig`` whenever the broker URL is ``filesystem://``.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    """A filesystem channel whose messages become visible only once completely written."""

    # kombu's bases name the second parameter differently (``message``, ``payload``).
    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # The same name kombu gives a message: consumers take them in this order.
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        staging = os.path.join(self.data_folder_out, f".{name}.part")
        try:
            with open(staging, "wb") as file:
                file.write(str_to_bytes(dumps(payload)))  # type: ignore[no-untyped-call]
            os.replace(staging, final)  # atomic within a folder
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    """kombu's filesystem transport with :class:`Channel`."""

    Channel = Channel
