"""One request's replies, from the batcher's worker thread to the event loop::

    batcher.submit_many(...) ─► Stream ─► pump thread ─┐          (one stream and one thread per choice)
    batcher.submit_many(...) ─► Stream ─► pump thread ─┼─► asyncio queue ─► Generation.next(gone)
                                                       │     each choice's newest text, cut at a stop string
    client gone / stop string / finished ─► Stream.close(): the row leaves the batch before its next step

A stream yields each row's whole text so far; :meth:`Generation.deltas` turns that into the pieces a streamed
answer sends, holding back the end of the text while it could still become a stop string (or is half a
character), so a streamed reply never shows text that the whole reply does not have.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

_END = object()


class ClientGone(Exception):
    """The client closed the connection before its reply ended."""


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first place where a stop string starts, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could still be the start of a stop string."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


@dataclass
class Choice:
    """One choice of a request: its batcher stream and what it has made so far."""

    stream: Any
    text: str = ""  # the reply so far, cut at a stop string
    finish: str | None = None  # "stop" or "length" once it ended
    tokens: int = 0
    started: bool = False
    sent: int = 0  # characters already sent in a streamed answer
    reported: bool = False  # its finish_reason was sent


class Generation:
    """The choices of one request, read from their batcher streams by one thread each.

    Args:
        streams: one single-row :class:`~app.batcher.Stream` per choice.
        stops: stop strings: a reply ends before the first one it makes (finish reason ``"stop"``).

    Create it on the event loop that reads it.
    """

    def __init__(self, streams: Sequence[Any], stops: Sequence[str]) -> None:
        self.choices = [Choice(s) for s in streams]
        self.stops = list(stops)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        for i, s in enumerate(streams):
            threading.Thread(target=self._pump, args=(i, s), name="api-stream", daemon=True).start()

    def _pump(self, i: int, stream: Any) -> None:
        try:
            for texts in stream:
                if not self._post(i, texts[0]):
                    stream.close()
                    return
            self._post(i, _END)
        except Exception as e:  # noqa: BLE001 - the worker's error (a mix the model refuses) goes to the reader
            self._post(i, e)

    def _post(self, i: int, item: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (i, item))
            return True
        except RuntimeError:  # the loop is closed: the server stopped, nobody reads this reply any more
            return False

    @property
    def started(self) -> bool:
        """Every choice has its first token (or ended): the mixes were accepted by the engine."""
        return all(c.started or c.finish is not None for c in self.choices)

    @property
    def done(self) -> bool:
        return all(c.finish is not None for c in self.choices)

    @property
    def prompt_tokens(self) -> int:
        return self.choices[0].stream.prompt_tokens[0]

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    @property
    def notes(self) -> str | None:
        return self.choices[0].stream.note

    async def next(self, gone: asyncio.Future) -> None:
        """Wait for news from any choice and take in all that arrived.

        Raises:
            ClientGone: ``gone`` finished first (the client closed the connection).
            Exception: a choice's row failed in the worker (e.g. :class:`~app.errors.MixError`).
        """
        if gone.done():
            raise ClientGone()
        items = []
        if self._queue.empty():
            get = asyncio.ensure_future(self._queue.get())
            try:
                await asyncio.wait((get, gone), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not get.done():
                    get.cancel()
            if get.cancelled() or not get.done():
                raise ClientGone()
            items.append(get.result())
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        for i, item in items:
            self._take(i, item)

    def _take(self, i: int, item: Any) -> None:
        c = self.choices[i]
        if c.finish is not None:
            return  # ended at a stop string: what its row made after it is not part of the reply
        if isinstance(item, BaseException):
            raise item
        if item is _END:
            c.started = True
            c.tokens = c.stream.completion_tokens[0]
            c.finish = "length" if c.stream.finish_reasons[0] == "length" else "stop"
            return
        c.started = True
        c.text, hit = cut_at_stop(item, self.stops)
        c.tokens = c.stream.completion_tokens[0]
        if hit:
            c.finish = "stop"
            c.stream.close()  # its row leaves the batch now

    def visible(self, c: Choice) -> str:
        """What may be sent of a choice now: all of an ended one; of a running one, not an end that may become a
        stop string or that is half a character (a byte-level token decodes to U+FFFD until its other bytes
        come)."""
        if c.finish is not None:
            return c.text
        text = c.text[:len(c.text) - held_back(c.text, self.stops)]
        return text.rstrip("\ufffd")

    def deltas(self) -> Iterator[tuple[int, str, str | None]]:
        """``(index, new text, finish reason or None)`` for each choice with something new to send."""
        for i, c in enumerate(self.choices):
            text = self.visible(c)
            delta = text[c.sent:] if len(text) > c.sent else ""
            c.sent = max(c.sent, len(text))
            finish = c.finish if c.finish is not None and not c.reported else None
            if finish is not None:
                c.reported = True
            if delta or finish is not None:
                yield i, delta, finish

    def close(self) -> None:
        """Cancel every choice still running (their rows leave the batch before the next step)."""
        for c in self.choices:
            c.stream.close()
