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
from . import cache as kv_cache
from . import lora, road
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

    FOLD_AFTER = 16
    """Decode steps a shared mix runs with per-row tables before it is folded into the weights: a mix change never
    waits for a fold (30 ms with every projection of SmolLM2 adapted), and only replies long enough to win it
    back pay for it (folding saves about 2% of a step)."""

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
        self._row_lora: list[lora.Factors | None] = []
        self._packed = _Packed()
        self._layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lora_layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._shared = None  # the mix every running row carries, when they all carry one (folded)
        self._shared_steps = 0  # steps it has run so far

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
        rows = list(rows)
        if not rows:
            return rows
        eng = self.engine
        t0 = time.perf_counter()
        with eng._lock, torch.no_grad():
            split = [eng._split(r.mix, i) for i, r in enumerate(rows)]
            tables = [s[0][0] if s[0] is not None else None for s in split]
            loras = [s[0][1] if s[0] is not None else None for s in split]
            packed = self._packed.rows(tables, self._row_tables)  # raises MixError / ConflictError
            new_layers = self._packed.views(packed)
            n = max(len(r.input_ids) for r in rows)
            pad = eng._pad_id()
            ids = torch.tensor([[pad] * (n - len(r.input_ids)) + list(r.input_ids) for r in rows])
            mask = torch.tensor([[0] * (n - len(r.input_ids)) + [1] * len(r.input_ids) for r in rows])
            emb, mask, pos, _ = eng._inputs(ids, mask, [s[1] for s in split])
            cache = kv_cache.new(eng.model.config)
            shared = eng.shared([s[0] for s in split])  # folded for the prefill only if it already is
            applied = eng._folded(shared) if shared is not None and eng.is_folded(shared) else \
                eng._layers_applied(eng._placed(new_layers), eng._placed(lora.batch_factors(loras)))
            t1 = time.perf_counter()
            with applied:
                logits = eng.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                   use_cache=True, logits_to_keep=1).logits[:, -1].cpu()
            t2 = time.perf_counter()
            gens = [generator(r.seed) if r.temperature > 0 else None for r in rows]
            temp = torch.tensor([r.temperature for r in rows])
            top_p = torch.tensor([r.top_p for r in rows])
            nxt = pick_rows(logits, temp, top_p, gens)
            t3 = time.perf_counter()
            self._merge(cache, mask.cpu(), pos[:, -1].cpu(), nxt, temp, top_p, gens, tables, loras, packed)
            self.rows.extend(rows)
        self.stats["prefill"] += t2 - t1
        self.stats["sample"] += t3 - t2
        self.stats["joined"] += len(rows)
        self._record(rows, nxt.tolist())
        self.stats["bookkeeping"] += (t1 - t0) + (time.perf_counter() - t3)
        return rows

    def _merge(self, cache, mask, pos, last, temp, top_p, gens, tables, loras, packed) -> None:
        if self._cache is None or not self.rows:
            self._cache = cache
            self._mask = mask
        else:
            old, new = self.width, mask.shape[1]
            w = max(old, new)
            for mine, theirs in zip(self._cache.layers, cache.layers):
                kv_cache.stack(mine, theirs, w - old, w - new)
            self._mask = torch.cat((F.pad(self._mask, (w - old, 0)), F.pad(mask, (w - new, 0))))
        self._pos = torch.cat((self._pos, pos))
        self._last = torch.cat((self._last, last))
        self._temp = torch.cat((self._temp, temp))
        self._top_p = torch.cat((self._top_p, top_p))
        self._gens.extend(gens)
        self._row_tables.extend(tables)
        self._row_lora.extend(loras)
        self._packed.append(packed)
        self._gathered()

    def _gathered(self) -> None:
        """After a join or leave: each layer's per-row tables and factors, or the one mix all rows share."""
        eng = self.engine
        self._layers = eng._placed(self._packed.views())
        self._lora_layers = eng._placed(lora.batch_factors(self._row_lora))  # gathered again on join and leave
        shared = eng.shared([None if t is None and f is None else (t, f)
                             for t, f in zip(self._row_tables, self._row_lora)])
        if shared is None or self._shared is None or shared[0] is not self._shared[0] \
                or shared[1] is not self._shared[1]:
            self._shared_steps = 0
        self._shared = shared

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
            shared = self._shared
            fold = shared is not None and (self._shared_steps >= self.FOLD_AFTER or eng.is_folded(shared))
            applied = eng._folded(shared) if fold else eng._layers_applied(self._layers, self._lora_layers)
            self._shared_steps += shared is not None
            with applied:
                # Bookkeeping stays on the CPU; on an accelerator the small inputs go over and the last logits back.
                dev = eng._embed.weight.device
                logits = eng.model(input_ids=self._last[:, None].to(dev), attention_mask=self._mask.to(dev),
                                   position_ids=self._pos[:, None].to(dev), past_key_values=self._cache,
                                   use_cache=True).logits[:, -1].cpu()
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
        cut = int(mask.any(0).to(torch.int8).argmax())
        self._mask = mask[:, cut:]
        for layer in self._cache.layers:
            kv_cache.keep(layer, idx, cut)
        self._pos = self._pos.index_select(0, idx)
        self._last = self._last.index_select(0, idx)
        self._temp = self._temp.index_select(0, idx)
        self._top_p = self._top_p.index_select(0, idx)
        self._gens = [self._gens[i] for i in keep]
        self._row_tables = [self._row_tables[i] for i in keep]
        self._row_lora = [self._row_lora[i] for i in keep]
        self._packed.keep(idx, self._row_tables)
        self._gathered()
        self.rows = [self.rows[i] for i in keep]


class _Packed:
    """Every running row's RoAd tables in one ``(rows, width)`` tensor; each layer's ``(C, S)`` is a view of it.

    Joining rows is one ``cat`` and leaving one ``index_select``, whatever the number of adapted layers (the
    model's 210 for SmolLM2 with all projections), instead of one stack per layer. Columns hold, per module
    in ``layout``, the full ``(groups, 2, h)`` C then S; a row that does not adapt a module holds the identity
    there (C = 1, S = 0, exact). The layout grows when a newcomer adapts a new module and is rebuilt from the
    running rows when they all leave or a newcomer's group size does not fit it.
    """

    def __init__(self) -> None:
        self.layout: dict[str, tuple[int, torch.Size]] = {}
        self.width = 0
        self.data = torch.zeros(0, 0)
        self._ident = torch.zeros(0)
        self._vectors: dict[int, tuple[road.Tables, torch.Tensor]] = {}
        self._scales: set[str] = set()  # modules whose columns hold pure scales only (any grouping fits them)

    def _extend(self, tables: road.Tables) -> bool:
        """Add ``tables``' modules to the layout; ``False`` when a module's shape disagrees with it.

        A pure scale (IA³: ``S = 0``) fits any grouping of its layer (its values are copied flat); a module laid
        out by pure scales only takes the grouping of the first table that rotates."""
        grown = False
        for m in sorted(tables):
            shape = road.full_tables(tables[m])[0].shape
            if m in self.layout:
                same = self.layout[m][1] == shape
                if same and m not in self._scales:
                    continue
                scale = road.scale_only(tables[m])
                if not same and not scale:
                    if m not in self._scales:
                        return False
                    self.layout[m] = (self.layout[m][0], shape)  # same width: the running rows' values stay
                if not scale:
                    self._scales.discard(m)
                continue
            if road.scale_only(tables[m]):
                self._scales.add(m)
            self.layout[m] = (self.width, shape)
            self.width += 2 * shape.numel()
            grown = True
        if grown:
            ident = []
            for _m, (_, shape) in self.layout.items():
                ident += [torch.ones(shape.numel()), torch.zeros(shape.numel())]
            old = self._ident.numel()
            self._ident = torch.cat(ident)
            # Running rows get the identity in the new columns; cached vectors are for the old width.
            self.data = torch.cat((self.data, self._ident[old:].expand(self.data.shape[0], -1)), 1)
            self._vectors.clear()
        return True

    def _vector(self, tables: road.Tables | None) -> torch.Tensor:
        if tables is None:
            return self._ident
        hit = self._vectors.get(id(tables))
        if hit is not None and hit[0] is tables:
            return hit[1]
        vec = self._ident.clone()
        for m, cs in tables.items():
            off, shape = self.layout[m]
            c, s = road.full_tables(cs)
            n = shape.numel()
            vec[off:off + n] = c.reshape(-1)
            vec[off + n:off + 2 * n] = s.reshape(-1)
        if len(self._vectors) > 256:
            self._vectors.clear()
        self._vectors[id(tables)] = (tables, vec)
        return vec

    def rows(self, tables: list[road.Tables | None], running: list[road.Tables | None]) -> torch.Tensor:
        """The packed rows of newcomers with ``tables`` (the layout grows to fit them).

        Raises:
            MixError: newcomers adapt one layer with different group sizes.
            ConflictError: they fit alone but not beside the running rows.
        """
        new = [t for t in tables if t is not None]
        if not all(self._extend(t) for t in new):
            # Rebuild the layout from the running rows only (modules of rows gone may be in the way).
            self.reset()
            for t in running:
                if t is not None:
                    self._extend(t)
            self.data = torch.stack([self._vector(t) for t in running]) if running else torch.zeros(0, self.width)
            if not all(self._extend(t) for t in new):
                alone = _Packed()
                if not all(alone._extend(t) for t in new):
                    raise MixError("Rows of this request adapt one layer with different group sizes; serve them "
                                   "separately or retrain with one group size.")
                raise ConflictError("These rows adapt a layer with other group sizes than running rows; they "
                                    "wait until those rows have left.")
        return torch.stack([self._vector(t) for t in tables]) if tables else torch.zeros(0, self.width)

    def append(self, rows: torch.Tensor) -> None:
        self.data = torch.cat((self.data, rows)) if self.data.numel() or self.data.shape[0] else rows

    def keep(self, idx: torch.Tensor, running: list[road.Tables | None]) -> None:
        if all(t is None for t in running):
            self.reset()  # only base-model rows: no layer needs the update
            self.data = torch.zeros(len(running), 0)
            return
        self.data = self.data.index_select(0, idx)

    def reset(self) -> None:
        self.layout, self.width = {}, 0
        self._scales.clear()
        self._ident = torch.zeros(0)
        self._vectors.clear()
        self.data = torch.zeros(0, 0)

    def views(self, data: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each module's ``(C, S)`` as ``(rows, 1, groups, 2, h)`` views of ``data`` (default: every row)."""
        data = self.data if data is None else data
        b = data.shape[0]
        out = {}
        for m, (off, shape) in self.layout.items():
            n = shape.numel()
            out[m] = (data[:, off:off + n].view(b, 1, *shape), data[:, off + n:off + 2 * n].view(b, 1, *shape))
        return out

