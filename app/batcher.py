"""A small batcher: chat requests from concurrent sessions run together as one engine batch.

Gradio's own batching does not take streaming functions, so the app queues its requests here instead::

    session threads                         worker thread
    ───────────────                         ─────────────
    batcher.submit(messages, mix) ──┐
    batcher.submit(messages, mix) ──┼──►  queue ──► gather for ``wait_ms`` (up to ``max_batch`` rows)
    batcher.submit_many(rows)     ──┘                ──► one Engine.generate_tokens batch
          ▲                                               │
          └──── per-request queue ◄── each row's text ────┘  (a session only reads its own rows)

A job (one ``submit`` or one ``submit_many`` group) is never split across batches, so a compare request
(base, each adapter, the mix) is answered in one batch. Jobs with different sampling settings (temperature,
top_p, seed) run in different batches; ``max_new_tokens`` is per row. Long conversations are cut to the
model's context before they are queued, and the returned :class:`Stream` says so in ``note``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from composer import limits

from .engine import Engine, Request
from .engine.sampling import check_sampling
from .errors import RequestError

_DONE = object()


@dataclass
class _Job:
    requests: list[Request]
    limits: list[int]
    sampling: tuple[float, float, int | None]
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple[float, float, int | None]:
        return self.sampling


class Stream:
    """What :meth:`Batcher.submit_many` returns: iterate for every row's text so far.

    Attributes:
        notes: one note per row (``None`` unless the row's prompt was truncated to fit the context).
    """

    def __init__(self, job: _Job, notes: list[str | None]) -> None:
        self._job = job
        self.notes = notes

    @property
    def note(self) -> str | None:
        """The notes of all rows joined (``None`` when nothing was truncated)."""
        parts = [n for n in self.notes if n]
        return " ".join(dict.fromkeys(parts)) if parts else None

    def __iter__(self) -> Iterator[list[str]]:
        try:
            while True:
                item = self._job.out.get()
                # Skip to the newest text when the reader fell behind the worker.
                while item is not _DONE and not isinstance(item, BaseException):
                    try:
                        nxt = self._job.out.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _DONE or isinstance(nxt, BaseException):
                        yield item
                    item = nxt
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._job.cancelled.set()

    def close(self) -> None:
        """Stop generating for this request (the rest of its batch goes on)."""
        self._job.cancelled.set()


class Batcher:
    """Gather chat requests for a few milliseconds and run them as one batch on ``engine``.

    Args:
        engine: the :class:`~app.engine.Engine` to run.
        max_batch: at most this many rows per batch (a single larger group still runs as one batch).
        wait_ms: how long the worker waits for more requests after the first one arrives.
        context: the model's context length in tokens (default: ``max_position_embeddings`` of the model).
    """

    def __init__(self, engine: Engine, *, max_batch: int = 8, wait_ms: float = 15.0,
                 context: int | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}.")
        self.engine = engine
        self.max_batch = int(max_batch)
        self.wait = float(wait_ms) / 1000.0
        cfg = getattr(engine.model, "config", None)
        self.context = int(context or getattr(cfg, "max_position_embeddings", 0) or 2048)
        self.batches: list[int] = []  # rows per batch run, newest last (kept short; for tests and stats)
        self._queue: queue.Queue = queue.Queue()
        self._pending: list[_Job] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="app-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ submit
    def submit(self, messages: list[dict[str, str]], mix: Any = None, **sampling: Any) -> Iterator[str]:
        """Queue one chat request; iterate the returned stream for the answer so far.

        Sampling keywords as for :meth:`submit_many`. The returned object has ``note`` (truncation).
        """
        return _Single(self.submit_many([(messages, mix)], **sampling))

    def submit_many(self, rows: Sequence[tuple[list[dict[str, str]], Any]], *, max_new_tokens: int = 128,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Stream:
        """Queue rows ``(messages, mix)`` that must run in one batch; iterate for every row's text so far.

        Raises:
            RuntimeError: the batcher was closed.
            ValueError: no rows, or ``max_new_tokens`` below 1.
        """
        if self._closed:
            raise RuntimeError("The batcher is closed; start the app again.")
        if not rows:
            raise ValueError("submit_many() needs at least one (messages, mix) row.")
        temperature, top_p = check_sampling(temperature, top_p)
        for messages, _ in rows:
            check_history(messages)
        try:
            max_new_tokens = int(max_new_tokens)
        except (TypeError, ValueError, OverflowError):
            raise RequestError(f"max_new_tokens must be a whole number, got {max_new_tokens!r}.",
                               field="max_new_tokens", value=max_new_tokens) from None
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        # Leave at least half the context for the prompt.
        max_new_tokens = min(max_new_tokens, max(1, self.context // 2))
        requests, notes = [], []
        for messages, mix in rows:
            prefix = _prefix_width(mix)
            fitted, note = fit_messages(self.engine.tokenizer, messages, self.context - max_new_tokens - prefix)
            requests.append(Request(fitted, mix))
            notes.append(note)
        job = _Job(requests, [max_new_tokens] * len(requests),
                   (float(temperature), float(top_p), None if seed is None else int(seed)))
        self._queue.put(job)
        return Stream(job, notes)

    def close(self) -> None:
        """Stop the worker after the batch in flight."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------------------ worker
    def _gather(self, first: _Job) -> list[_Job]:
        batch, rows = [first], len(first.requests)
        keep = []
        for job in self._pending:  # earlier leftovers first, in arrival order
            if job.key == first.key and rows + len(job.requests) <= self.max_batch:
                batch.append(job)
                rows += len(job.requests)
            else:
                keep.append(job)
        self._pending = keep
        deadline = time.monotonic() + self.wait
        while rows < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)
                break
            if job.key == first.key and rows + len(job.requests) <= self.max_batch:
                batch.append(job)
                rows += len(job.requests)
            else:
                self._pending.append(job)
        return [j for j in batch if not j.cancelled.is_set()]

    def _loop(self) -> None:
        while True:
            first = self._pending.pop(0) if self._pending else self._queue.get()
            if first is None:
                for job in self._pending:
                    job.out.put(RuntimeError("The app is shutting down."))
                return
            batch = self._gather(first)
            if batch:
                self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        try:
            self._generate(batch)
        except Exception as e:  # noqa: BLE001 - the worker must survive any bad request
            if len(batch) > 1:
                # One bad mix must not take other sessions down: run each job alone to isolate it.
                for job in batch:
                    self._run([job])
            else:
                batch[0].out.put(e)

    def _generate(self, batch: list[_Job]) -> None:
        engine, tok = self.engine, self.engine.tokenizer
        requests = [r for j in batch for r in j.requests]
        limits = [n for j in batch for n in j.limits]
        owners = [(j, i) for j in batch for i in range(len(j.requests))]
        self.batches = (self.batches + [len(requests)])[-1000:]
        temperature, top_p, seed = batch[0].sampling
        input_ids, mask, mixes = engine.encode(requests)
        eos = engine.eos_token_ids
        finished = [False] * len(requests)
        texts = [""] * len(requests)
        open_jobs = set(range(len(batch)))
        steps = engine.generate_tokens(input_ids, mask, mixes, max_new_tokens=max(limits),
                                       temperature=temperature, top_p=top_p, seed=seed)
        try:
            for ids in steps:
                for r, (job, i) in enumerate(owners):
                    if finished[r]:
                        continue
                    row = ids[r][:limits[r]]
                    texts[r] = tok.decode(row, skip_special_tokens=True)
                    if len(row) >= limits[r] or (row and row[-1] in eos):
                        finished[r] = True
                for b, job in enumerate(batch):
                    if b not in open_jobs:
                        continue
                    rows = [r for r, (j, _) in enumerate(owners) if j is job]
                    job.out.put([texts[r] for r in rows])
                    if job.cancelled.is_set() or all(finished[r] for r in rows):
                        job.out.put(_DONE)
                        open_jobs.discard(b)
                        for r in rows:
                            finished[r] = True
                if not open_jobs:
                    break
        finally:
            steps.close()
        for b in open_jobs:
            batch[b].out.put(_DONE)


class _Single:
    """A one-row :class:`Stream` that yields strings instead of one-element lists."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self.note = stream.note

    def __iter__(self) -> Iterator[str]:
        for texts in self._stream:
            yield texts[0]

    def close(self) -> None:
        self._stream.close()


def _prefix_width(mix: Any) -> int:
    parts = mix if isinstance(mix, (list, tuple)) else [mix]
    return max((p.shape[0] for p in parts if getattr(p, "kind", None) == "prompt"), default=0)


def _count(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    return len(ids)


def check_history(messages: Sequence[dict]) -> None:
    """Refuse a conversation over the turn or character limits (``ADAPTER_HUB_MAX_HISTORY_TURNS`` /
    ``_CHARS``) before any tokenizing: a request must not hold a worker for minutes.

    Raises:
        RequestError: naming the limit and the variable that raises it.
    """
    try:
        limits.check("history_turns", len(messages), "The conversation")
        total = sum(len(m.get("content") or "") if isinstance(m.get("content"), str) else 0 for m in messages)
        limits.check("history_chars", total, "The conversation's length")
    except limits.LimitExceededError as e:
        raise RequestError(f"{e} Start a new conversation (or clear the chat) to go on.",
                           field=e.limit, value=e.value) from e


def fit_messages(tokenizer: Any, messages: list[dict[str, str]], budget: int
                 ) -> tuple[list[dict[str, str]], str | None]:
    """Cut a conversation to at most ``budget`` prompt tokens.

    Older turns go first (a leading system message stays); if the last message alone is still too long,
    its end is cut.

    Returns:
        ``(messages, note)``; ``note`` is ``None`` when nothing was cut, else a sentence for the user.
    """
    budget = max(1, int(budget))
    msgs = [dict(m) for m in messages]
    n = _count(tokenizer, msgs)
    if n <= budget:
        return msgs, None
    first = 1 if msgs and msgs[0].get("role") == "system" and len(msgs) > 2 else 0
    # The fewest oldest messages to drop, by bisection: O(log n) renders of the conversation, where dropping
    # one at a time re-rendered it once per dropped message (quadratic: 1,000 turns took 46 s).
    lo, hi = 0, len(msgs) - first - 1  # hi: keep only the last message

    def fits(k: int) -> bool:
        return _count(tokenizer, msgs[:first] + msgs[first + k:]) <= budget

    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    dropped = lo
    msgs = msgs[:first] + msgs[first + dropped:]
    note = []
    if dropped:
        note.append(f"dropped the {dropped} oldest message{'s' if dropped > 1 else ''}")
    if _count(tokenizer, msgs) > budget:
        last = msgs[-1]
        overhead = _count(tokenizer, msgs[:-1] + [{**last, "content": ""}])
        toks = tokenizer.encode(last["content"], add_special_tokens=False)
        keep = max(0, budget - overhead)
        while True:
            cut = tokenizer.decode(toks[:keep], skip_special_tokens=True)
            trial = msgs[:-1] + [{**last, "content": cut}]
            if keep == 0 or _count(tokenizer, trial) <= budget:
                break
            keep = max(0, keep - max(1, keep // 50))
        msgs = trial
        note.append(f"kept the first {keep} of {len(toks)} tokens of your message")
    return msgs, (f"Note: the conversation was {n} tokens, more than the {budget} that fit the model's "
                  f"context, so the app {' and '.join(note)}.")
