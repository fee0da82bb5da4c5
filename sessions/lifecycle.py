"""What happens to live trackers when the process forks, exits or is asked to terminate.

* At normal interpreter exit (:mod:`atexit`) every tracker not yet closed is closed: its buffer
  goes to the broker or the spool, unconfirmed batches to the spool.
* On SIGTERM, when the application has not installed a handler of its own, the same, and then
  the process dies of the signal as it would have. An application with its own handler
  (Celery, uvicorn, ...) should call ``tracker.close()`` from it.
* In a forked child (:func:`os.register_at_fork`) every tracker restarts empty: the buffered
  events, and the connections, are the parent's.

A SIGKILL loses at most what was recorded since the last cut (one flush interval, or one
batch), plus any published batch that a worker lost in the same moment.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import weakref
from typing import Protocol


class Tracked(Protocol):
    """What the lifecycle needs of a tracker."""

    def close(self) -> None: ...

    def restart_after_fork(self) -> None: ...


#: Trackers not yet closed: closed at interpreter exit, restarted in a forked child.
_live: weakref.WeakSet[Tracked] = weakref.WeakSet()
_sigterm_installed = False


def track(tracker: Tracked) -> None:
    """Close ``tracker`` at exit and on SIGTERM, restart it in a forked child, until
    :func:`untrack`; installs the SIGTERM handler (see :func:`install_sigterm_handler`)."""
    _live.add(tracker)
    install_sigterm_handler()


def untrack(tracker: Tracked) -> None:
    _live.discard(tracker)


def install_sigterm_handler() -> None:
    """On SIGTERM, close every tracker (to the broker or the spool), then die as asked.

    Once per process, from the main thread only (Python allows signal handlers nowhere
    else), and only where nobody else handles SIGTERM.
    """
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    _sigterm_installed = True
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def _on_sigterm(signum: int, _frame: object) -> None:
        # Not closing here: the signal may have interrupted the main thread inside ``record``,
        # holding the buffer's lock that ``close`` takes (a handler runs in the main thread, so
        # it would wait on itself forever). A thread closes, then the process dies as asked; a
        # second SIGTERM meanwhile kills it at once.
        signal.signal(signum, signal.SIG_DFL)
        threading.Thread(
            target=_close_then_die, args=(signum,), name="sessions-sigterm", daemon=True
        ).start()

    signal.signal(signal.SIGTERM, _on_sigterm)


def _close_then_die(signum: int) -> None:
    try:
        close_all()
    finally:
        os.kill(os.getpid(), signum)


#: Held while trackers close, so that an exit meanwhile waits for a SIGTERM's close to finish
#: instead of ending the process under it.
_closing = threading.Lock()


@atexit.register
def close_all() -> None:
    """Close every live tracker (at exit, and on SIGTERM); a second caller waits for the
    first to finish."""
    with _closing:
        for tracker in list(_live):
            tracker.close()


def _restart_in_child() -> None:
    global _closing
    _closing = threading.Lock()  # a fork while another thread closed must not leave it held
    for tracker in list(_live):
        tracker.restart_after_fork()


os.register_at_fork(after_in_child=_restart_in_child)
