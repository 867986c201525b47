"""One browser session's chat: the turns on screen, the messages waiting for a reply, the reply streaming now.

A message sent while a reply streams is never dropped: every send is its own Gradio event (``trigger_mode=
"multiple"``), and the first one of a session becomes the *runner*, answering the queue in order::

    send "a"  ─► queue [a]        runner: a ─► stream ─► done ─► b ─► stream ─► done ─► queue empty: stop
    send "b"  ─► queue [a, b]     (this event shows "b" as waiting and ends; the runner answers it)

Every reply starts with a line naming the mix it was made with (:func:`labelled`); that line is display only,
and is cut again before the conversation goes back to the model (:func:`unlabelled`).

The object lives in a ``gr.State``: Gradio hands every event of a session the same object, and calls
:meth:`Conversation.stop` when the tab is closed, so a closed page cancels its row in the batch.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from composer.expr import short_shas

from .mixer import plain

_LABEL = "*mix: "


def mix_label(expression: str) -> str:
    """What a reply says it was made with: the expression (pinned commits shortened), or ``base model``."""
    return short_shas(expression) if expression else "base model"


def labelled(label: str, text: str) -> str:
    """The reply as shown: a first line naming the mix, then the text."""
    return f"{_LABEL}{plain(label)}*\n\n{text}"


def unlabelled(content: str) -> tuple[str | None, str]:
    """``(label as shown or None, reply text)`` of a chat message made by :func:`labelled`."""
    if content.startswith(_LABEL):
        head, sep, rest = content.partition("*\n\n")
        if sep:
            return head[len(_LABEL):], rest
    return None, content


@dataclass
class Pending:
    """A sent message waiting for its reply, with the mix and settings it was sent with."""

    message: str
    mix: Any
    label: str
    max_new_tokens: int
    temperature: float


class Conversation:
    """See the module docstring. Thread-safe: concurrent events of one session share it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pending: deque[Pending] = deque()
        self.busy = False
        self.stream: Any = None
        self.stopped = False
        self.turns: list[dict] = []     # what the runner shows: finished turns and the reply streaming now
        self.current: Pending | None = None  # the message being answered (already in ``turns``)

    def __deepcopy__(self, memo: dict) -> Conversation:
        # gr.State copies its initial value for every session: each one starts empty.
        return Conversation()

    def send(self, item: Pending) -> bool:
        """Queue ``item``; ``True`` when the caller must answer the queue (no reply is running)."""
        with self._lock:
            self.pending.append(item)
            self.stopped = False
            if self.busy:
                return False
            self.busy = True
            return True

    def next(self) -> Pending | None:
        """The next message to answer, or ``None`` (and the runner's turn ends) when the queue is empty."""
        with self._lock:
            if not self.pending:
                self.busy = False
                return None
            return self.pending[0]

    def done(self, item: Pending) -> None:
        with self._lock:
            if self.pending and self.pending[0] is item:
                self.pending.popleft()
            self.stream = None
            self.current = None

    def waiting(self) -> list[Pending]:
        """Messages sent but not answered yet, the one being answered first."""
        with self._lock:
            return list(self.pending)

    def stop(self, *_: Any) -> None:
        """Cancel the reply streaming now and forget the queued messages (the stop button, a closed tab)."""
        with self._lock:
            self.stopped = True
            stream, self.stream = self.stream, None
            self.pending.clear()
        if stream is not None:
            stream.close()

    def release(self) -> None:
        """The runner ended (finished, failed or cancelled): the next send starts a new runner."""
        with self._lock:
            self.busy = False
            self.pending.clear()
            self.current = None
            stream, self.stream = self.stream, None
        if stream is not None:
            stream.close()
