"""Ctrl-C around a commit: a push either has not happened or has happened, never "interrupted" in between.

A push records itself with one ``git update-ref --stdin`` transaction (:mod:`hub.store`). A Ctrl-C from the
terminal reaches every process of the foreground group: it could kill git between moving ``main`` and creating
the tag, and the ``KeyboardInterrupt`` it raises in Python, after the transaction, would make the command exit
130 for a push that happened. So, around the transaction:

- :func:`held` holds SIGINT until the block ends (in the main thread, where Python runs signal handlers), then
  hands it to the handler that was there before: the default raises ``KeyboardInterrupt`` *after* the version
  is recorded; the command line's handler (``app.cli``) has been told by then that the push is complete, and
  only notes it;
- git runs in a session of its own (``start_new_session``), out of reach of the terminal's Ctrl-C.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold SIGINT while the block runs; one that came meanwhile is raised again when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only; nothing to hold here
        return
    came: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    if previous is None:  # installed outside Python: give back Python's own
        previous = signal.default_int_handler
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if came:
            signal.raise_signal(signal.SIGINT)  # to the previous handler, as if it came now
