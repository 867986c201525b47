"""Iteration-level scheduling: requests join a running batch at the next decode step and leave the step they end.

    running = RunningBatch(engine)
    running.join([Row(ids, mix, max_new_tokens=64, temperature=0.7, seed=1)])   # prefill: the first token
    while running.rows:
        running.step()              # one token for every row; a finished row leaves and frees its cache
        running.join([...])         # newcomers are prefilled and decode with the others from the next step
    running.leave([row])            # cancel: the row is gone before the next step

The shared KV cache holds one row per running request, right-aligned (every row appends at the end)::

    row 0   . . . . p p p p g g g g        p: prompt (and prompt-vector prefix)   g: generated
    row 1   . . p p p p p p p p g g        .: padding: attention mask 0, never attended to
    row 2   . . . . . . . . p p p g   <- joined last step: prefilled alone, then left-padded to the width
            └──────── width = the longest row (columns that are padding on every row are cut) ────────┘

A newcomer is prefilled in its own forward pass (with the other newcomers of that step), then its keys and
values are left-padded to the batch's width and stacked on the batch, or the batch is left-padded to the
newcomer's. Positions count each row's real tokens only, so every row's logits are those it would get
alone, up to float rounding. Each row keeps its own mix (its RoAd tables are gathered per batch membership,
not per step), its own temperature/top_p/max_new_tokens and its own seeded ``torch.Generator``
(:func:`~app.engine.sampling.pick_rows`), so its tokens depend only on its own request.

``stats`` keeps wall seconds per phase (``prefill``, ``decode`` forward passes, ``sample`` and ``bookkeeping``:
joining, leaving and table gathers) for ``bench/serve_load.py``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import MixError, RequestError
from . import road
from .sampling import check_sampling, generator, pick_rows

if TYPE_CHECKING:
    from .engine import Engine


class ConflictError(MixError):
    """Rows that are fine alone but cannot share the running batch (they adapt a layer with another group size
    than a running row): join them once those rows have left."""


@dataclass(eq=False)
class Row:
    """One request in a :class:`RunningBatch`: its prompt, mix and sampling settings, and what it made.

    Attributes:
        input_ids: the prompt's token ids (chat template applied, no padding).
        mix: the row's mix (as for :meth:`Engine.forward`).
        max_new_tokens: the row leaves after this many tokens.
        temperature: 0 for greedy, > 0 to sample.
        top_p: nucleus sampling mass.
        seed: seed of the row's own generator (``None``: fresh entropy).
        tokens: the tokens made so far (an end token, when reached, is the last one).
        finish: ``None`` while running, then ``"end"`` (an end token), ``"length"`` or ``"cancelled"``.
        owner: anything the caller wants to find the row's request by.
    """

    input_ids: Sequence[int]
    mix: Any = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    owner: Any = None

    def __post_init__(self) -> None:
        self.temperature, self.top_p = check_sampling(self.temperature, self.top_p)
        try:
            self.max_new_tokens = int(self.max_new_tokens)
        except (TypeError, ValueError, OverflowError):
            raise RequestError(f"max_new_tokens must be a whole number, got {self.max_new_tokens!r}.",
                               field="max_new_tokens", value=self.max_new_tokens) from None
        if self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.",
                               field="max_new_tokens", value=self.max_new_tokens)
        if not len(self.input_ids):
            raise RequestError("A row needs at least one prompt token.", field="input_ids", value=[])

    @property
    def done(self) -> bool:
        return self.finish is not None


class RunningBatch:
    """The rows decoding together on one engine; rows join and leave between steps.

    Not thread-safe: one thread (the batcher's worker) drives it. Each forward pass holds the engine's lock,
    so :meth:`Engine.exclusive` (a fit) runs between two steps.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rows: list[Row] = []
        self.stats: Counter = Counter()
        self._eos_set = frozenset(engine.eos_token_ids)
        self._reset()

    def _reset(self) -> None:
        self._cache = None
        self._mask = torch.zeros(0, 0, dtype=torch.long)   # (rows, width)
        self._pos = torch.zeros(0, dtype=torch.long)       # position of each row's last token
        self._last = torch.zeros(0, dtype=torch.long)      # each row's last token: the next step's input
        self._temp = torch.zeros(0)
        self._top_p = torch.zeros(0)
        self._gens: list[torch.Generator | None] = []
        self._row_tables: list[road.Tables | None] = []
        self._layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def width(self) -> int:
        """Columns of the shared cache (the longest row, prompt prefix included)."""
        return int(self._mask.shape[1])

    # ------------------------------------------------------------------------------------------- join
    def join(self, rows: Sequence[Row]) -> list[Row]:
        """Prefill ``rows`` in one forward pass, pick each one's first token and add them to the batch.

        Rows that end with that first token (an end token, or ``max_new_tokens=1``) leave at once.

        Returns:
            The rows given, each with its first token.

        Raises:
            MixError: a row's mix does not fit the model (nothing joins; the running rows are untouched).
            ConflictError: the rows adapt a layer with another group size than a running row (a
                :class:`MixError`; they can join once those rows have left).
        """
        from transformers import DynamicCache

        rows = list(rows)
        if not rows:
            return rows
        eng = self.engine
        t0 = time.perf_counter()
        with eng._lock, torch.no_grad():
            split = [eng._split(r.mix, i) for i, r in enumerate(rows)]
            tables = [s[0] for s in split]
            try:
                layers = road.batch_tables(self._row_tables + tables)
            except MixError as e:
                if not self.rows:
                    raise
                road.batch_tables(tables)  # raises if the newcomers cannot even run together alone
                raise ConflictError(f"{e} (the rows wait until the running rows that conflict have left)",
                                    module=e.module) from e
            new_layers = {m: (c[len(self.rows):], s[len(self.rows):]) for m, (c, s) in layers.items()}
            n = max(len(r.input_ids) for r in rows)
            pad = eng._pad_id()
            ids = torch.tensor([[pad] * (n - len(r.input_ids)) + list(r.input_ids) for r in rows])
            mask = torch.tensor([[0] * (n - len(r.input_ids)) + [1] * len(r.input_ids) for r in rows])
            emb, mask, pos, _ = eng._inputs(ids, mask, [s[1] for s in split])
            cache = DynamicCache(config=eng.model.config)
            t1 = time.perf_counter()
            with eng._layers_applied(new_layers):
                logits = eng.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                   use_cache=True, logits_to_keep=1).logits[:, -1]
            t2 = time.perf_counter()
            gens = [generator(r.seed) if r.temperature > 0 else None for r in rows]
            temp = torch.tensor([r.temperature for r in rows])
            top_p = torch.tensor([r.top_p for r in rows])
            nxt = pick_rows(logits, temp, top_p, gens)
            t3 = time.perf_counter()
            self._merge(cache, mask, pos[:, -1], nxt, temp, top_p, gens, tables, layers)
            self.rows.extend(rows)
        self.stats["prefill"] += t2 - t1
        self.stats["sample"] += t3 - t2
        self.stats["joined"] += len(rows)
        self._record(rows, nxt.tolist())
        self.stats["bookkeeping"] += (t1 - t0) + (time.perf_counter() - t3)
        return rows

    def _merge(self, cache, mask, pos, last, temp, top_p, gens, tables, layers) -> None:
        if self._cache is None or not self.rows:
            self._cache = cache
            self._mask = mask
        else:
            old, new = self.width, mask.shape[1]
            w = max(old, new)
            for mine, theirs in zip(self._cache.layers, cache.layers):
                mine.keys = torch.cat((_pad_left(mine.keys, w - old), _pad_left(theirs.keys, w - new)))
                mine.values = torch.cat((_pad_left(mine.values, w - old), _pad_left(theirs.values, w - new)))
            self._mask = torch.cat((F.pad(self._mask, (w - old, 0)), F.pad(mask, (w - new, 0))))
        self._pos = torch.cat((self._pos, pos))
        self._last = torch.cat((self._last, last))
        self._temp = torch.cat((self._temp, temp))
        self._top_p = torch.cat((self._top_p, top_p))
        self._gens.extend(gens)
        self._row_tables.extend(tables)
        self._layers = layers

    # ------------------------------------------------------------------------------------------- step
    def step(self) -> list[Row]:
        """One decoding step for every running row; rows that end leave at once.

        Returns:
            The rows that got a token (all rows that were running).
        """
        if not self.rows:
            return []
        eng = self.engine
        with eng._lock, torch.no_grad():
            t0 = time.perf_counter()
            self._mask = torch.cat((self._mask, self._mask.new_ones(len(self.rows), 1)), 1)
            self._pos = self._pos + 1
            t1 = time.perf_counter()
            with eng._layers_applied(self._layers):
                logits = eng.model(input_ids=self._last[:, None], attention_mask=self._mask,
                                   position_ids=self._pos[:, None], past_key_values=self._cache,
                                   use_cache=True).logits[:, -1]
            t2 = time.perf_counter()
            nxt = pick_rows(logits, self._temp, self._top_p, self._gens)
            t3 = time.perf_counter()
            self._last = nxt
        rows = list(self.rows)
        self._record(rows, nxt.tolist())
        self.stats["decode"] += t2 - t1
        self.stats["sample"] += t3 - t2
        self.stats["steps"] += 1
        self.stats["row_steps"] += len(rows)
        self.stats["bookkeeping"] += (t1 - t0) + (time.perf_counter() - t3)
        return rows

    def _record(self, rows: list[Row], tokens: list[int]) -> None:
        eos = self._eos_set
        ended = []
        for r, t in zip(rows, tokens):
            r.tokens.append(t)
            if t in eos:
                r.finish = "end"
            elif len(r.tokens) >= r.max_new_tokens:
                r.finish = "length"
            if r.finish:
                ended.append(r)
        if ended:
            self._drop(ended)

    # ------------------------------------------------------------------------------------------ leave
    def leave(self, rows: Sequence[Row]) -> None:
        """Cancel ``rows`` (those still running): they leave before the next step and free their cache."""
        gone = [r for r in rows if r in self.rows]
        for r in gone:
            r.finish = "cancelled"
        if gone:
            t0 = time.perf_counter()
            self._drop(gone)
            self.stats["bookkeeping"] += time.perf_counter() - t0

    def _drop(self, rows: list[Row]) -> None:
        gone = set(map(id, rows))
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        self.stats["left"] += len(self.rows) - len(keep)
        if not keep:
            self.rows = []
            self._reset()
            return
        idx = torch.tensor(keep)
        mask = self._mask.index_select(0, idx)
        # Columns that are padding on every remaining row (a long row left) are cut off.
        cut = int((mask.any(0).to(torch.int8).argmax()))
        self._mask = mask[:, cut:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, cut:]
            layer.values = layer.values.index_select(0, idx)[:, :, cut:]
        self._pos = self._pos.index_select(0, idx)
        self._last = self._last.index_select(0, idx)
        self._temp = self._temp.index_select(0, idx)
        self._top_p = self._top_p.index_select(0, idx)
        self._gens = [self._gens[i] for i in keep]
        self._row_tables = [self._row_tables[i] for i in keep]
        self._layers = {m: (c.index_select(0, idx), s.index_select(0, idx)) for m, (c, s) in self._layers.items()}
        self.rows = [self.rows[i] for i in keep]


def _pad_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` ``(batch, heads, length, dim)`` with ``n`` zero columns before its sequence."""
    return F.pad(x, (0, 0, n, 0)) if n else x
