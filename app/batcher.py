"""The batcher: chat requests from concurrent sessions share the engine, one decode step at a time.

Gradio's own batching does not take streaming functions, so the app queues its requests here instead::

    session threads                          worker thread (scheduler="continuous", the default)
    ───────────────                          ──────────────────────────────────────────────────
    batcher.submit(messages, mix) ──┐        loop:
    batcher.submit(messages, mix) ──┼──► waiting queue ─► admit jobs while the batch has room (max_batch)
    batcher.submit_many(rows)     ──┘   (at most          ─► prefill passes: first tokens  (RunningBatch.admit,
          ▲                              max_queue rows;       from cached prefixes, in chunks   .prefill)
          │                              past it: BusyError)─► one decode step for every running row
          │                                                    finished or cancelled rows leave at once
          └──── per-request queue ◄── each row's text after every step (a session only reads its own rows)

A job (one ``submit`` or one ``submit_many`` group) is admitted as a whole and its rows are prefilled together
when they fit one pass (a compare request: base, each adapter, the mix); its texts go out once every row has
its first token. A prompt starts from the longest prefix already prefilled under its mix (the chat template's
system prompt, an earlier turn of the conversation), and prompts go in passes of at most ``prefill_chunk``
token slots between decode steps, so a long prompt does not stall the running rows for its whole length;
newcomers that arrive during a pass get a pass of their own before the step while that budget lasts.
Every row keeps its own sampling settings and seeded generator, so jobs with different temperatures share the
batch and a row's answer never depends on its batch mates.
Closing a stream (a closed tab, a stop button) cancels its rows before the next step.

``scheduler="gather"`` keeps the earlier path for comparison (``bench/serve_load.py``): gather jobs with the
same sampling settings for ``wait_ms``, then run them as one :meth:`Engine.generate_tokens` batch to the
end; a request arriving meanwhile waits for the whole batch.

Long conversations are cut to the model's context before they are queued, and the returned :class:`Stream`
says so in ``note``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from composer import limits

from .engine import Engine, Request
from .engine.continuous import ConflictError, PrefillError, Row, RunningBatch
from .engine.sampling import check_sampling
from .errors import BusyError, RequestError

_DONE = object()
SCHEDULERS = ("continuous", "gather")


@dataclass(eq=False)
class _Job:
    requests: list[Request]
    limits: list[int]
    sampling: tuple[float, float, int | None]
    ids: list[list[int]] = field(default_factory=list)
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    rows: list[Row] = field(default_factory=list)
    closed: bool = False
    cancel_hook: Any = None
    prompt_tokens: list[int] = field(default_factory=list)  # per row: the chat template's ids, after any cut
    tokens: list[int] = field(default_factory=list)  # per row: tokens made so far (set before each text goes out)
    finish: list[str | None] = field(default_factory=list)  # per row: None while running, then as Row.finish

    @property
    def key(self) -> tuple[float, float, int | None]:
        return self.sampling

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.cancelled.set()
            if self.cancel_hook is not None:
                self.cancel_hook(self)


class Stream:
    """What :meth:`Batcher.submit_many` returns: iterate for every row's text so far.

    Attributes:
        notes: one note per row (``None`` unless the row's prompt was truncated to fit the context).
    """

    def __init__(self, job: _Job, notes: list[str | None]) -> None:
        self._job = job
        self.notes = notes

    @property
    def prompt_tokens(self) -> list[int]:
        """Each row's prompt length in tokens (the chat template's ids, after any cut to fit the context;
        a prompt vector's virtual tokens are not counted)."""
        return list(self._job.prompt_tokens)

    @property
    def completion_tokens(self) -> list[int]:
        """Tokens each row has made as of the newest text read (an end token, when reached, counts)."""
        n = len(self._job.requests)
        return list(self._job.tokens) if len(self._job.tokens) == n else [0] * n

    @property
    def finish_reasons(self) -> list[str | None]:
        """Why each row ended: ``"end"`` (an end token), ``"length"`` (``max_new_tokens``), ``"cancelled"``;
        ``None`` while it runs."""
        n = len(self._job.requests)
        return list(self._job.finish) if len(self._job.finish) == n else [None] * n

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
            # Left early (the page closed, the reader stopped): the rows leave the batch before its next step.
            self._job.cancel()

    def close(self) -> None:
        """Stop generating for this request (the rest of its batch goes on)."""
        self._job.cancel()


class Batcher:
    """Run chat requests from concurrent sessions together on ``engine``.

    Args:
        engine: the :class:`~app.engine.Engine` to run.
        max_batch: at most this many rows decode together (a single larger group still runs, alone).
        wait_ms: ``gather`` only: how long the worker waits for more requests after the first one arrives.
        context: the model's context length in tokens (default: ``max_position_embeddings`` of the model).
        scheduler: ``"continuous"`` (requests join and leave the running batch at every step) or ``"gather"``
            (gather for ``wait_ms``, then run the batch to its end; kept for comparison).
        max_queue: at most this many rows wait for a place; past it :meth:`submit_many` raises
            :class:`~app.errors.BusyError` ("busy, try again").
        prefix_cache: ``continuous`` only: start each prompt from the longest prefix already prefilled under its
            mix (:mod:`app.engine.prefix_cache`; exact, the keys and values were computed under that mix).
        prefill_chunk: ``continuous`` only: token slots one prefill pass computes at most (a long prompt goes in
            chunks between decode steps); ``None``: every waiting prompt whole in one pass.
        preempt: ``continuous`` only: a request that arrives during a decode step is prefilled right away,
            between two of the step's layers (``RunningBatch.step(between=...)``), and gets its first token
            without waiting for the step to end; ``False``: it waits for the step.

    Attributes:
        batches: ``continuous``: rows running right after each admission; ``gather``: rows per batch run
            (newest last, kept short; for tests and stats).
        cancelled: how many rows were cancelled (closed streams) before they ended.
        admitted: how many rows left the waiting queue for the batch.
    """

    def __init__(self, engine: Engine, *, max_batch: int = 8, wait_ms: float = 15.0,
                 context: int | None = None, scheduler: str = "continuous", max_queue: int = 64,
                 prefix_cache: bool = True, prefill_chunk: int | None = RunningBatch.PREFILL_CHUNK,
                 preempt: bool = True) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}.")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}.")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"Unknown scheduler {scheduler!r}; choose one of: {', '.join(SCHEDULERS)}.")
        self.engine = engine
        self.scheduler = scheduler
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self.wait = float(wait_ms) / 1000.0
        RunningBatch.check_prefill_chunk(prefill_chunk)
        self._running_options = dict(prefix_cache=bool(prefix_cache), prefill_chunk=prefill_chunk)
        self.preempt = bool(preempt)
        cfg = getattr(engine.model, "config", None)
        self.context = int(context or getattr(cfg, "max_position_embeddings", 0) or 2048)
        self.batches: list[int] = []
        self.cancelled = 0
        self.admitted = 0
        self.running: RunningBatch | None = None
        self._waiting: deque[_Job] = deque()
        self._waiting_rows = 0
        self._cv = threading.Condition()
        self._closed = False
        target = self._loop_continuous if scheduler == "continuous" else self._loop_gather
        self._thread = threading.Thread(target=target, name=f"app-batcher-{scheduler}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ submit
    def submit(self, messages: list[dict[str, str]], mix: Any = None, **sampling: Any) -> Iterator[str]:
        """Queue one chat request; iterate the returned stream for the answer so far.

        Sampling keywords as for :meth:`submit_many`. The returned object has ``note`` (truncation) and
        ``close()`` (cancel).
        """
        return _Single(self.submit_many([(messages, mix)], **sampling))

    def submit_many(self, rows: Sequence[tuple[list[dict[str, str]], Any]], *, max_new_tokens: int = 128,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Stream:
        """Queue rows ``(messages, mix)`` that must run together; iterate for every row's text so far.

        Every row samples with its own generator seeded with ``seed`` (fresh entropy when ``None``).

        Raises:
            BusyError: ``max_queue`` rows are already waiting; try again in a few seconds.
            RequestError: bad sampling settings or a conversation over the limits.
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
        self._check_room(len(rows))  # before the tokenizing below: a full queue answers at once
        # Leave at least half the context for the prompt.
        max_new_tokens = min(max_new_tokens, max(1, self.context // 2))
        requests, notes = [], []
        for messages, mix in rows:
            prefix = _prefix_width(mix)
            fitted, note = fit_messages(self.engine.tokenizer, messages, self.context - max_new_tokens - prefix)
            requests.append(Request(fitted, mix))
            notes.append(note)
        job = _Job(requests, [max_new_tokens] * len(requests),
                   (float(temperature), float(top_p), None if seed is None else int(seed)),
                   cancel_hook=self._cancelled)
        ids = [_template_ids(self.engine.tokenizer, r.messages) for r in requests]
        job.prompt_tokens = [len(i) for i in ids]
        if self.scheduler == "continuous":
            job.ids = ids
        with self._cv:
            if self._closed:
                raise RuntimeError("The batcher is closed; start the app again.")
            self._check_room(len(rows))
            self._waiting.append(job)
            self._waiting_rows += len(rows)
            self._cv.notify_all()
        return Stream(job, notes)

    def _check_room(self, n: int) -> None:
        waiting = self._waiting_rows
        # A group larger than the whole queue may still wait alone, or it could never run.
        if waiting and waiting + n > self.max_queue:
            raise BusyError(f"The server is busy: {waiting} request{'s are' if waiting != 1 else ' is'} already "
                            f"waiting for a turn (at most {self.max_queue} may wait). Try again in a few seconds.",
                            waiting=waiting, limit=self.max_queue)

    def _cancelled(self, job: _Job) -> None:
        """A stream was closed: drop the job if it still waits (the worker removes running rows)."""
        with self._cv:
            if job in self._waiting:
                self._waiting.remove(job)
                self._waiting_rows -= len(job.requests)
                self.cancelled += len(job.requests)
                job.closed = True
                job.out.put(_DONE)
            self._cv.notify_all()

    @property
    def waiting(self) -> int:
        """Rows waiting for a place in the batch."""
        return self._waiting_rows

    def close(self) -> None:
        """Stop the worker (requests in flight end with an error saying the app is shutting down)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    def _take(self) -> _Job:
        job = self._waiting.popleft()
        self._waiting_rows -= len(job.requests)
        self.admitted += len(job.requests)
        return job

    def _shut(self, jobs: Sequence[_Job]) -> None:
        with self._cv:
            jobs = list(jobs) + list(self._waiting)
            self._waiting.clear()
            self._waiting_rows = 0
        for job in jobs:
            if not job.closed:
                job.closed = True
                job.out.put(RuntimeError("The app is shutting down."))

    # ------------------------------------------------------------------------------- continuous worker
    def _loop_continuous(self) -> None:
        running = self.running = RunningBatch(self.engine, **self._running_options)
        jobs: list[_Job] = []  # jobs with rows in the running batch
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not running.rows and not running.pending:
                    self._cv.wait()
                if self._closed:
                    break
                admit = self._take_room(running)
            try:
                jobs = self._iteration(running, jobs, admit)
            except Exception as e:  # noqa: BLE001 - the worker must survive: fail the rows in flight, go on
                for job in jobs + admit:
                    if not job.closed:
                        job.closed = True
                        job.out.put(e)
                running = self.running = RunningBatch(self.engine, **self._running_options)
                jobs = []
        self._shut(jobs)

    def _take_room(self, running: RunningBatch) -> list[_Job]:
        """Waiting jobs, oldest first, while the batch has room for their rows (call with ``_cv`` held)."""
        admit, n = [], len(running.rows) + len(running.pending) + len(running.joining)
        while self._waiting:
            k = len(self._waiting[0].requests)
            if n and n + k > self.max_batch:
                break
            admit.append(self._take())
            n += k
        return admit

    def _iteration(self, running: RunningBatch, jobs: list[_Job], admit: list[_Job]) -> list[_Job]:
        """Cancelled rows leave, admitted jobs queue for their prefill, prefill passes, one step for all; returns
        the jobs still running or waiting for their prefill.

        Jobs that arrive during a prefill pass get one of their own before the step while the prefill budget
        between two steps lasts (:meth:`RunningBatch.can_prefill`): their first token need not wait for a step.
        With ``preempt``, jobs that arrive during the step are prefilled between two of its layers, under the
        same budget. They are added to ``admit``, so that the worker fails them too if the iteration fails.
        """
        for job in [j for j in jobs if j.cancelled.is_set()]:
            running.leave(job.rows)
            self.cancelled += sum(r.finish == "cancelled" for r in job.rows)
            self._finish(job)
        jobs = [j for j in jobs if not j.closed]
        if admit:
            jobs += self._admit(running, admit)
        self._prefill(running, jobs, admit)
        if running.rows:

            tried: _Job | None = None

            def between() -> None:  # inside the step's forward pass, between two layers
                nonlocal tried
                try:  # no lock for a look: a closed stream may empty the queue meanwhile (then [0] raises)
                    head = self._waiting[0]
                except IndexError:
                    return
                if head is tried:  # a job that found no room (or conflicts) waits for the step's end
                    return
                tried = head
                if self._room(running, jobs, admit):
                    self._prefill(running, jobs, admit)

            running.step(between if self.preempt else None)
        for job in jobs:
            if _started(job):
                self._emit(job)
        return [j for j in jobs if not j.closed]

    def _room(self, running: RunningBatch, jobs: list[_Job], admit: list[_Job]) -> list[_Job]:
        """Waiting jobs the batch has room for, queued for their prefill (added to ``jobs`` and ``admit``)."""
        with self._cv:
            more = self._take_room(running)
        if more:
            admit.extend(more)
            jobs.extend(self._admit(running, more))
        return more

    def _prefill(self, running: RunningBatch, jobs: list[_Job], admit: list[_Job]) -> None:
        """Prefill passes while rows are pending and the budget between two steps lasts; each job's first tokens
        go out as soon as its pass ends, and jobs that came meanwhile are queued for the next pass."""
        while running.pending and running.can_prefill():
            try:
                joined = running.prefill()
            except PrefillError as e:  # that pass's rows fail; the running rows go on
                for job in {id(r.owner): r.owner for r in e.rows}.values():
                    running.leave(job.rows)
                    job.closed = True
                    job.out.put(e.__cause__ or e)
                joined = []
            if joined:
                self.batches = (self.batches + [len(running.rows) + len(running.joining)])[-1000:]
            for job in {id(r.owner): r.owner for r in joined}.values():  # first tokens go out at once
                if _started(job):
                    self._emit(job)
            self._room(running, jobs, admit)
            jobs[:] = [j for j in jobs if not j.closed]

    def _admit(self, running: RunningBatch, admit: list[_Job]) -> list[_Job]:
        """Queue each admitted job's rows for their prefill (a bad mix fails its own job; a job whose rows
        conflict with running ones waits at the head of the queue); returns the jobs queued."""
        ok = []
        for job in admit:
            temperature, top_p, seed = job.sampling
            try:
                job.rows = [Row(ids, r.mix, max_new_tokens=n, temperature=temperature, top_p=top_p, seed=seed,
                                owner=job) for ids, r, n in zip(job.ids, job.requests, job.limits)]
                running.admit(job.rows)
            except ConflictError:  # fine alone: wait at the head of the queue until the batch changes
                with self._cv:
                    self._waiting.appendleft(job)
                    self._waiting_rows += len(job.requests)
                continue
            except Exception as e:  # noqa: BLE001 - one bad mix must not take other sessions down
                job.closed = True
                job.out.put(e)
                continue
            ok.append(job)
        return ok

    def _emit(self, job: _Job) -> None:
        tok = self.engine.tokenizer
        if job.closed:
            return
        # Counts first: a reader that sees a text sees counts at least as new.
        job.tokens = [len(r.tokens) for r in job.rows]
        job.finish = [r.finish for r in job.rows]
        job.out.put([tok.decode(r.tokens, skip_special_tokens=True) for r in job.rows])
        if all(r.done for r in job.rows):
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        if not job.closed:
            job.closed = True
            job.out.put(_DONE)

    # ----------------------------------------------------------------------------------- gather worker
    def _gather(self) -> list[_Job] | None:
        """The next batch: the first waiting job and, for ``wait_ms``, later ones with its sampling settings."""
        with self._cv:
            while not self._closed and not self._waiting:
                self._cv.wait()
            if self._closed:
                return None
            first = self._take()
            batch, rows = [first], len(first.requests)
            deadline = time.monotonic() + self.wait
            while True:
                for job in list(self._waiting):  # earlier arrivals first
                    if job.key == first.key and rows + len(job.requests) <= self.max_batch:
                        self._waiting.remove(job)
                        self._waiting_rows -= len(job.requests)
                        self.admitted += len(job.requests)
                        batch.append(job)
                        rows += len(job.requests)
                left = deadline - time.monotonic()
                if rows >= self.max_batch or left <= 0 or self._closed:
                    break
                self._cv.wait(left)
        return [j for j in batch if not j.cancelled.is_set()]

    def _loop_gather(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                break
            if batch:
                self._run(batch)
        self._shut([])

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
        counts = [0] * len(requests)
        reasons: list[str | None] = [None] * len(requests)
        open_jobs = set(range(len(batch)))
        steps = engine.generate_tokens(input_ids, mask, mixes, max_new_tokens=max(limits),
                                       temperature=temperature, top_p=top_p, seed=seed)
        try:
            for ids in steps:
                for r, (_job, _i) in enumerate(owners):
                    if finished[r]:
                        continue
                    row = ids[r][:limits[r]]
                    texts[r] = tok.decode(row, skip_special_tokens=True)
                    counts[r] = len(row)
                    if row and row[-1] in eos:
                        finished[r], reasons[r] = True, "end"
                    elif len(row) >= limits[r]:
                        finished[r], reasons[r] = True, "length"
                for b, job in enumerate(batch):
                    if b not in open_jobs:
                        continue
                    rows = [r for r, (j, _) in enumerate(owners) if j is job]
                    job.tokens = [counts[r] for r in rows]
                    job.finish = [reasons[r] or ("cancelled" if job.cancelled.is_set() else None) for r in rows]
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


def _started(job: _Job) -> bool:
    """Every row of the job has its first token (or ended): its texts can go out."""
    return all(r.tokens or r.done for r in job.rows)


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
    """The context a row's prompt-learning part takes before its tokens: the virtual tokens of a prompt vector or
    p-tuning adapter (input embeddings) or of a prefix-tuning adapter (keys and values in the cache)."""
    from composer import kinds

    from .engine.decode_mix import DecodeMix

    if isinstance(mix, DecodeMix):  # its members run side by side: the widest part's prefix counts
        return max(_prefix_width(p) for p in mix.parts)
    parts = mix if isinstance(mix, (list, tuple)) else [mix]
    widths = {"prefix": lambda p: p.shape[0], "past_kv": lambda p: p.num_virtual_tokens}
    return max((widths[kinds.of(p).engine_role](p) for p in parts
                if isinstance(p, kinds.adapter_classes()) and kinds.of(p).engine_role in widths), default=0)


def _template_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if not isinstance(ids, list) else ids)


def _count(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    return len(_template_ids(tokenizer, messages))


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
