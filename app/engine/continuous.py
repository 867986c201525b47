"""Iteration-level scheduling: requests join a running batch at the next decode step and leave the step they end.

    running = RunningBatch(engine)
    running.join([Row(ids, mix, max_new_tokens=64, temperature=0.7, seed=1)])   # prefill: the first token
    while running.rows:
        running.step()              # one token for every row; a finished row leaves and frees its cache
        running.join([...])         # newcomers are prefilled and decode with the others from the next step
    running.leave([row])            # cancel: the row is gone before the next step

    running.admit([...])            # what the batcher does instead of join: queue newcomers, then per iteration
    running.prefill()               #   one prefill pass (a chunk's worth), the rows it completes join
    running.step()                  #   and one decode step for every running row

The shared KV cache holds one row per running request, right-aligned (every row appends at the end)::

    row 0   . . . . p p p p g g g g        p: prompt (and a prompt vector or prefix-tuning prefix)   g: generated
    row 1   . . p p p p p p p p g g        .: padding: attention mask 0, never attended to
    row 2   . . . . . . . . p p p g   <- joined last step: prefilled alone, then left-padded to the width
            └──────── width = the longest row (columns that are padding on every row are cut) ────────┘

A newcomer is prefilled in its own forward pass (with the other newcomers of that step), then its keys and
values are left-padded to the batch's width and stacked on the batch, or the batch is left-padded to the
newcomer's. The prefill starts from the longest prefix of the prompt cached under the row's mix
(:mod:`app.engine.prefix_cache`: the chat template's system prompt, an earlier turn of the conversation) and runs in
passes of at most ``prefill_chunk`` token slots (:mod:`app.engine.prefill`), so a long prompt shares the time
between decode steps with other newcomers instead of stalling the running rows for its whole length.
Positions count each row's real tokens only, so every row's logits are those it would get alone, up to float
rounding. Each row keeps its own mix (its RoAd tables are gathered per batch membership,
not per step), its own temperature/top_p/max_new_tokens and its own seeded ``torch.Generator``
(:func:`~app.engine.sampling.pick_rows`), so its tokens depend only on its own request.

A row whose mix is a :class:`~app.engine.decode_mix.DecodeMix` (decode-time combination) runs as hidden member
rows, the base model's and one per part, in ``rows`` beside the others: they are prefilled (from their own mixes'
cached prefixes, in chunks) and complete their prompts in one pass, and after every step one token picked from their
combined log-probabilities goes to all of them and to the caller's row (:mod:`app.engine.decode_mix`).

``stats`` keeps wall seconds per phase (``prefill``, ``decode`` forward passes, ``sample`` and ``bookkeeping``:
joining, leaving and table gathers) and prefill counts (``prefill_passes``, ``prefill_slots`` = rows × columns
computed, ``prefill_columns`` real ones, ``prompt_columns`` of the prompts joined, ``cached_columns`` of them
served from the prefix cache) for ``bench/serve_load.py``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import MixError, RequestError
from . import bottleneck, decode_mix, lora, road
from . import cache as kv_cache
from .decode_mix import DecodeMix, Group
from .prefill import Pending, compact, row_kv
from .prefill import inputs as prefill_inputs
from .prefill import plan as prefill_plan
from .prefix_cache import mix_parts
from .sampling import check_sampling, generator, pick_rows

if TYPE_CHECKING:
    from .engine import Engine


class ConflictError(MixError):
    """Rows that are fine alone but cannot share the running batch (they adapt a layer with another group size
    than a running row): join them once those rows have left."""


class PrefillError(RuntimeError):
    """A prefill pass failed (its cause is the model's error): its ``rows`` left the pending queue, the running
    rows are untouched."""

    def __init__(self, message: str, rows: list[Row]) -> None:
        super().__init__(message)
        self.rows = rows


@dataclass(eq=False)
class Row:
    """One request in a :class:`RunningBatch`: its prompt, mix and sampling settings, and what it made.

    Attributes:
        input_ids: the prompt's token ids (chat template applied, no padding).
        mix: the row's mix (as for :meth:`Engine.forward`; a :class:`~app.engine.decode_mix.DecodeMix` runs as
            its members, hidden rows of the batch).
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


def members(row: Row) -> list[Row]:
    """The hidden rows that run ``row`` (a :class:`~app.engine.decode_mix.DecodeMix` row): the base model's first,
    with the row's sampler, then one per part."""
    mix: DecodeMix = row.mix
    first = Row(row.input_ids, None, max_new_tokens=row.max_new_tokens, temperature=row.temperature,
                top_p=row.top_p, seed=row.seed, owner=row)
    return [first] + [Row(row.input_ids, m, max_new_tokens=row.max_new_tokens, owner=row) for m in mix.parts]


class RunningBatch:
    """The rows decoding together on one engine; rows join and leave between steps.

    Not thread-safe: one thread (the batcher's worker) drives it. Each forward pass holds the engine's lock,
    so :meth:`Engine.exclusive` (a fit) runs between two steps.

    ``rows`` are the rows that run (a decode-time row's members in its place: one per part and the base model's);
    :meth:`join`, :meth:`step`, :meth:`prefill` and ``pending`` give the caller's rows.
    """

    FOLD_AFTER = 16
    """Decode steps a shared mix runs with per-row tables before it is folded into the weights: a mix change never
    waits for a fold (30 ms with every projection of SmolLM2 adapted), and only replies long enough to win it
    back pay for it (folding saves about 2% of a step)."""

    PREFILL_CHUNK = 512
    """Token slots (rows × columns) of prefill that running rows wait for between two decode steps, by default: a
    long prompt is prefilled in chunks between decode steps (SmolLM2-135M on 2 idle CPU threads: about 0.8 s at
    most), while a burst of chat prompts (about 50 tokens each) still goes in few passes."""

    SHORT_PART = 4
    """A prompt with at most ``prefill_chunk // SHORT_PART`` columns to go is prefilled whole in the next pass, even
    past the budget (a chat turn of a burst need not wait for the long prompts' chunks and the steps between)."""

    @staticmethod
    def check_prefill_chunk(prefill_chunk: int | None) -> None:
        """Raise ``ValueError`` unless ``prefill_chunk`` is at least 1 or ``None`` (whole prompts): what the
        batcher checks when it is built, before its first running batch."""
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1 (or None for whole prompts), got {prefill_chunk}.")

    def __init__(self, engine: Engine, *, prefix_cache: bool = True, prefill_chunk: int | None = PREFILL_CHUNK
                 ) -> None:
        self.check_prefill_chunk(prefill_chunk)
        self.engine = engine
        self.rows: list[Row] = []
        self.stats: Counter = Counter()
        self._eos_set = frozenset(engine.eos_token_ids)
        # Prefixes and chunks start a row from the first columns of a cache: models with a convolution or
        # recurrent state (LFM2, Qwen3-Next) cannot, and prefill every prompt whole.
        self._sliceable = kv_cache.sliceable(engine.model.config)
        self.prefix = engine.prefix_cache if prefix_cache and self._sliceable else None
        self.prefill_chunk = prefill_chunk
        self._pending: list[Pending] = []
        self._seq = 0
        self._since_step = 0  # prefill slots computed since the last decode step while rows waited for them
        self._passes_since_step = 0
        # Decode-time rows (a DecodeMix): each runs as hidden member rows (members); pending or running.
        self._groups: dict[Row, Group] = {}  # member -> its group
        self._decode: dict[Row, Group] = {}  # the caller's row -> its group
        # Rows prefilled between two layers of a step (``step(between=...)``): they join when it ends.
        self._stepping = False
        self._in_between = False
        self._deferred: list[tuple] = []
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
        self._row_bn: list[bottleneck.Part | None] = []
        self._keys: list[tuple[Any, list[int], int]] = []  # per row: mix parts, prompt ids, virtual columns
        self._packed = _Packed()
        self._layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lora_layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._bn_places: dict = {}
        self._shared = None  # the mix every running row carries, when they all carry one (folded)
        self._shared_steps = 0  # steps it has run so far

    @property
    def width(self) -> int:
        """Columns of the shared cache (the longest row, prompt prefix included)."""
        return int(self._mask.shape[1])

    # ------------------------------------------------------------------------------------------- join
    def join(self, rows: Sequence[Row]) -> list[Row]:
        """Prefill ``rows`` now (in one forward pass, or in chunks of ``prefill_chunk``), pick each one's first
        token and add them to the batch; no decode step runs meanwhile.

        Rows that end with that first token (an end token, or ``max_new_tokens=1``) leave at once.

        Returns:
            The rows given, each with its first token.

        Raises:
            MixError: a row's mix does not fit the model (nothing joins; the running rows are untouched).
            ConflictError: the rows adapt a layer with another group size than a running row (a
                :class:`MixError`; they can join once those rows have left).
        """
        rows = self.admit(rows)
        while any(r in self.pending for r in rows):
            self._since_step = 0  # now, whatever the budget between steps
            self.prefill()
        return rows

    def admit(self, rows: Sequence[Row]) -> list[Row]:
        """Check ``rows`` and queue them for :meth:`prefill`; each starts from the longest prefix of its prompt
        cached under its mix.

        Raises:
            MixError, ConflictError: as :meth:`join` (nothing is queued).
        """
        given = list(rows)
        if not given:
            return given
        # A decode-time row runs as its members (the base model, then each part), prefilled and decoded side by side.
        groups = {r: Group(r, members(r)) for r in given if isinstance(r.mix, DecodeMix)}
        rows = [m for r in given for m in (groups[r].members if r in groups else [r])]
        eng = self.engine
        t0 = time.perf_counter()
        with eng._lock:
            split = [eng._split(r.mix, i) for i, r in enumerate(rows)]
            tables = [s[0][0] if s[0] is not None else None for s in split]
            self._packed.rows(tables, self._row_tables)  # raises MixError / ConflictError
            if self._pending and not _Packed().fits([p.tables for p in self._pending] + tables):
                raise ConflictError("These rows adapt a layer with other group sizes than rows being prefilled; "
                                    "they wait until those rows have joined and left.")
            for r, (row, prompt) in zip(rows, split):
                p = Pending(r, list(r.input_ids), prompt, tables=row[0] if row else None,
                            lora=row[1] if row else None, bn=row[2] if row else None, seq=self._seq)
                if p.past_kv:  # a prefix-tuning row: its virtual columns' keys and values are the adapter's
                    like = eng._embed.weight
                    kv = eng.tables(prompt)
                    p.kv = [(kv[str(i)][0][None].to(like), kv[str(i)][1][None].to(like))
                            for i in range(len(kv))]
                    p.done = p.virtual
                self._seq += 1
                if self.prefix is not None:
                    p.parts = mix_parts(r.mix)
                self._pending.append(p)
            for g in groups.values():
                self._decode[g.row] = g
                self._groups.update(dict.fromkeys(g.members, g))
        self.stats["bookkeeping"] += time.perf_counter() - t0
        return given

    @property
    def pending(self) -> list[Row]:
        """Rows admitted and not yet prefilled (they have no token yet)."""
        return self._callers([p.row for p in self._pending])

    def _callers(self, rows: list[Row]) -> list[Row]:
        """``rows`` as the caller knows them: a decode-time group's members are its row (once)."""
        if not self._groups:
            return rows
        out = [self._groups[r].row if r in self._groups else r for r in rows]
        return list(dict.fromkeys(out))

    def _forget(self, rows: Sequence[Row]) -> None:
        """Rows that left (ended, cancelled or failed): their decode-time groups are gone with them."""
        for r in rows:
            g = self._groups.pop(r, None)
            if g is not None:
                self._decode.pop(g.row, None)

    def group(self, row: Row) -> Group | None:
        """A decode-time row's group (:class:`~app.engine.decode_mix.Group`: its hidden members, and ``scores``,
        the ``z`` its last token was picked from) while it is pending or running; ``None`` for other rows."""
        return self._decode.get(row)

    def _budget(self) -> int | None:
        """Token slots for the next prefill pass: what is left of ``prefill_chunk`` since the last decode step
        (all of it while no row decodes: a newcomer arriving meanwhile waits for one chunk, not a whole long
        prompt); ``None`` (whole prompts) without chunks, or for a model whose cache cannot be cut
        (:func:`app.engine.cache.sliceable`)."""
        if self.prefill_chunk is None or not self._sliceable:
            return None
        if not self.rows:
            return self.prefill_chunk
        return max(0, self.prefill_chunk - self._since_step)

    def can_prefill(self) -> bool:
        """Whether a prefill pass may run before the next decode step: rows are pending, and no pass ran since
        the last step, or no row decodes, or at least half of ``prefill_chunk`` is left (a second pass serves
        rows that came during the first sooner than after a step; a sliver of budget would cost a pass for
        little). Without chunks, one pass between two steps, as whole prompts always had."""
        if not self._pending:
            return False
        if not self.rows or not self._passes_since_step:
            return True
        budget = self._budget()
        return budget is not None and (self._since_step == 0 or budget * 2 >= self.prefill_chunk)

    def prefill(self) -> list[Row]:
        """One forward pass over the pending rows (those ``prefill_chunk`` token slots take, shortest first);
        rows whose prompt is done get their first token and join the batch.

        Returns:
            The rows that joined (each with its first token).
        """
        if not self._pending:
            return []
        eng = self.engine
        t0, sampled = time.perf_counter(), self.stats["sample"]
        with eng._lock, torch.no_grad():
            if self.prefix is not None:
                # Rows that have computed nothing yet look again: a row of their mix may have been prefilled
                # since they came (newcomers of one mix arriving together share the first one's prefix).
                for p in self._pending:
                    if not p.started:
                        hit = self.prefix.lookup(p.parts, p.ids)
                        if hit is not None and hit.columns > p.done:
                            p.kv, p.done, p.cached = hit.kv, hit.columns, hit.columns
            chunk = self.prefill_chunk or 0
            group, targets = prefill_plan(self._pending, self._budget(), short=chunk // self.SHORT_PART)
            group, targets = decode_mix.together(self._pending, group, targets, self._groups)
            if not group:  # no budget left before the next decode step
                return []
            t1 = time.perf_counter()
            try:
                tables, loras, bns = [p.tables for p in group], [p.lora for p in group], [p.bn for p in group]
                packed = self._packed.rows(tables, self._row_tables)
                emb, mask, pos, cache = prefill_inputs(eng, group, targets)
                shared = eng.shared([None if p.tables is None and p.lora is None and p.bn is None
                                     else (p.tables, p.lora, p.bn) for p in group])
                applied = eng._folded(shared) if shared is not None and eng.is_folded(shared) else \
                    eng._layers_applied(eng._placed(self._packed.views(packed)),
                                        eng._placed(lora.batch_factors(loras)), eng._placed_bn(bottleneck.batch(bns)))
                t1 = time.perf_counter()
                with eng.set_aside() if self._stepping else nullcontext(), applied:
                    logits = eng.model(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                                       **kv_cache.passed(eng.model, cache), use_cache=True,
                                       logits_to_keep=1).logits[:, -1].cpu()
            except Exception as e:
                # A decode-time group fails whole: its members waiting for a later pass leave too.
                failed = {self._groups.get(p.row) for p in group} - {None}
                gone = [p for p in self._pending if p in group or self._groups.get(p.row) in failed]
                self._pending = [p for p in self._pending if p not in gone]
                rows = self._callers([p.row for p in gone])
                self._forget([p.row for p in gone])
                raise PrefillError(f"Prefilling {len(rows)} row(s) failed: {e}", rows) from e
            t2 = time.perf_counter()
            mask = compact(cache, mask)  # a prefix-tuning row's prefix and tokens side by side
            width = emb.shape[1]
            self.stats["prefill_passes"] += 1
            self.stats["prefill_slots"] += len(group) * width
            # What running rows have waited for since their last step (rows joining now have not waited yet).
            self._since_step = self._since_step + len(group) * width if self.rows else 0
            self._passes_since_step += 1
            done = []
            for i, (p, t) in enumerate(zip(group, targets)):
                p.started = True
                self.stats["prefill_columns"] += t - p.done
                if t < p.columns:
                    p.kv, p.done = row_kv(cache, i, t), t
                    continue
                done.append(i)
                self.stats["cached_columns"] += p.cached
                self.stats["prompt_columns"] += p.columns
                if self.prefix is not None:
                    self.prefix.store(p.parts, p.ids, row_kv(cache, i, t), p.virtual)
            joined: list[Row] = []
            if done:
                idx = torch.tensor(done)
                kept = [group[i] for i in done]
                joined = [p.row for p in kept]
                mask = mask.cpu().index_select(0, idx)
                cut = int(mask.any(0).to(torch.int8).argmax())
                for layer in cache.layers:
                    kv_cache.keep(layer, idx, cut)
                gens = [generator(r.seed) if r.temperature > 0 else None for r in joined]
                temp = torch.tensor([r.temperature for r in joined])
                top_p = torch.tensor([r.top_p for r in joined])
                t3 = time.perf_counter()
                picked = decode_mix.pick(joined, logits.index_select(0, idx), self._groups)
                nxt = decode_mix.share(joined, pick_rows(picked, temp, top_p, gens), self._groups)
                self.stats["sample"] += time.perf_counter() - t3
                merge = (cache, mask[:, cut:], torch.tensor([p.columns - 1 for p in kept]), nxt, temp, top_p, gens,
                         kept)
                if self._stepping:  # between two layers of a step: the rows join the batch when it ends
                    self._deferred.append(merge)
                    self.stats["prefilled_in_step"] += len(self._callers(joined))  # callers' rows
                else:
                    self._join(*merge, packed=packed.index_select(0, idx))
                self._pending = [p for p in self._pending if p not in kept]
        self.stats["prefill"] += t2 - t1
        self.stats["joined"] += len(joined)
        callers = self._callers(joined)  # before the rows that end at once leave (and their groups with them)
        if joined:
            ended = self._tokens(joined, nxt.tolist())
            if ended and not self._stepping:
                self._drop(ended)
        self.stats["bookkeeping"] += (t1 - t0) + (time.perf_counter() - t2) - (self.stats["sample"] - sampled)
        return callers

    def _join(self, cache, mask, pos, last, temp, top_p, gens, kept: list[Pending], packed=None) -> None:
        """Prefilled rows (``kept``, with their first tokens ``last``) join the running ones; ``packed`` (their RoAd
        tables' rows) is made now when not given (rows prefilled during a step: the layout may have changed)."""
        tables = [p.tables for p in kept]
        if packed is None:
            packed = self._packed.rows(tables, self._row_tables)
        self._merge(cache, mask, pos, last, temp, top_p, gens, tables, [p.lora for p in kept], [p.bn for p in kept],
                    packed)
        self._keys.extend((p.parts, p.ids, p.virtual) for p in kept)
        self.rows.extend(p.row for p in kept)

    def _merge(self, cache, mask, pos, last, temp, top_p, gens, tables, loras, bns, packed) -> None:
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
        self._row_bn.extend(bns)
        self._packed.append(packed)
        self._gathered()

    def _gathered(self) -> None:
        """After a join or leave: each layer's per-row tables and factors, or the one mix all rows share."""
        eng = self.engine
        self._layers = eng._placed(self._packed.views())
        self._lora_layers = eng._placed(lora.batch_factors(self._row_lora))  # gathered again on join and leave
        self._bn_places = eng._placed_bn(bottleneck.batch(self._row_bn))
        shared = eng.shared([None if t is None and f is None and b is None else (t, f, b)
                             for t, f, b in zip(self._row_tables, self._row_lora, self._row_bn)])
        if shared is None or self._shared is None or any(x is not y for x, y in zip(shared, self._shared)):
            self._shared_steps = 0
        self._shared = shared

    # ------------------------------------------------------------------------------------------- step
    def step(self, between: Callable[[], None] | None = None) -> list[Row]:
        """One decoding step for every running row; rows that end leave at once.

        Args:
            between: called before each decoder layer of the step's forward pass but the first. It may
                :meth:`admit` rows and :meth:`prefill` them right there (their forward passes run with the step's
                adapters set aside, :meth:`Engine.set_aside`), so that a newcomer's first token does not wait for
                the step in flight; rows prefilled so join the batch when the step ends, and run from the next.
                Not called for a model without a ``layers`` list.

        Returns:
            The rows that got a token (all rows that were running).
        """
        if not self.rows:
            return []
        eng = self.engine
        self._since_step = self._passes_since_step = 0
        with eng._lock, torch.no_grad():
            t0 = time.perf_counter()
            self._mask = torch.cat((self._mask, self._mask.new_ones(len(self.rows), 1)), 1)
            self._pos = self._pos + 1
            t1 = time.perf_counter()
            shared = self._shared
            fold = shared is not None and (self._shared_steps >= self.FOLD_AFTER or eng.is_folded(shared))
            applied = eng._folded(shared) if fold else eng._layers_applied(self._layers, self._lora_layers,
                                                                           self._bn_places)
            self._shared_steps += shared is not None
            with applied, self._interruptible(between):
                # Bookkeeping stays on the CPU; on an accelerator the small inputs go over and the last logits back.
                dev = eng._embed.weight.device
                logits = eng.model(input_ids=self._last[:, None].to(dev), attention_mask=self._mask.to(dev),
                                   position_ids=self._pos[:, None].to(dev),
                                   **kv_cache.passed(eng.model, self._cache), use_cache=True).logits[:, -1].cpu()
            t2 = time.perf_counter()
            rows = list(self.rows)
            picked = decode_mix.pick(rows, logits, self._groups)
            nxt = decode_mix.share(rows, pick_rows(picked, self._temp, self._top_p, self._gens), self._groups)
            t3 = time.perf_counter()
            self._last = nxt
        callers = self._callers(rows)  # before the rows that end leave (and their groups with them)
        self._record(rows, nxt.tolist())
        if self._deferred:  # rows prefilled during the step join now; those that ended at once leave
            deferred, self._deferred = self._deferred, []
            with eng._lock:
                for merge in deferred:
                    self._join(*merge)
                ended = [p.row for merge in deferred for p in merge[-1] if p.row.finish]
                if ended:
                    self._drop(ended)
        self.stats["decode"] += t2 - t1
        self.stats["sample"] += t3 - t2
        self.stats["steps"] += 1
        self.stats["row_steps"] += len(rows)
        self.stats["bookkeeping"] += (t1 - t0) + (time.perf_counter() - t3)
        return callers

    @contextmanager
    def _interruptible(self, between: Callable[[], None] | None) -> Iterator[None]:
        """Inside this block, ``between`` runs before every decoder layer but the first (not inside itself)."""
        layers = getattr(getattr(self.engine.model, "model", self.engine.model), "layers", None)
        if between is None or not isinstance(layers, torch.nn.ModuleList) or len(layers) < 2:
            yield
            return

        def hook(_module, _args):
            if self._in_between:
                return
            self._in_between = True
            try:
                between()
            finally:
                self._in_between = False

        handles = [layer.register_forward_pre_hook(hook) for layer in layers[1:]]
        self._stepping = True
        try:
            yield
        finally:
            self._stepping = False
            for h in handles:
                h.remove()

    @property
    def joining(self) -> list[Row]:
        """Rows prefilled during the step in flight (they have their first token and join when it ends)."""
        return self._callers([p.row for merge in self._deferred for p in merge[-1]])

    def _record(self, rows: list[Row], tokens: list[int]) -> None:
        ended = self._tokens(rows, tokens)
        if ended:
            self._drop(ended)

    def _tokens(self, rows: list[Row], tokens: list[int]) -> list[Row]:
        """Each row's next token (and each decode-time group's shared stream); returns the rows that ended."""
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
            g = self._groups.get(r)
            if g is not None and r is g.members[0]:  # the group's shared stream (every member got this token)
                g.row.tokens.append(t)
                g.row.finish = r.finish
        return ended

    # ------------------------------------------------------------------------------------------ leave
    def leave(self, rows: Sequence[Row]) -> None:
        """Cancel ``rows`` (those still running or waiting for their prefill): they leave before the next step and
        free their cache."""
        groups = [self._decode[r] for r in rows if r in self._decode]
        rows = [m for r in rows for m in (self._decode[r].members if r in self._decode else [r])]
        waiting = [p for p in self._pending if p.row in rows]
        for p in waiting:
            p.row.finish = "cancelled"
        self._pending = [p for p in self._pending if p not in waiting]
        gone = [r for r in rows if r in self.rows]
        for r in gone:
            r.finish = "cancelled"
        if gone:
            t0 = time.perf_counter()
            self._drop(gone)
            self.stats["bookkeeping"] += time.perf_counter() - t0
        self._forget([p.row for p in waiting])
        for g in groups:
            g.row.finish = "cancelled"

    def _drop(self, rows: list[Row]) -> None:
        gone = set(map(id, rows))
        self._forget(rows)
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        self.stats["left"] += len(self.rows) - len(keep)
        if self.prefix is not None:
            self._remember([i for i, r in enumerate(self.rows) if id(r) in gone])
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
        self._row_bn = [self._row_bn[i] for i in keep]
        self._keys = [self._keys[i] for i in keep]
        self._packed.keep(idx, self._row_tables)
        self._gathered()
        self.rows = [self.rows[i] for i in keep]


    def _remember(self, leaving: list[int]) -> None:
        """Keep each leaving row's prompt and reply in the prefix cache: a conversation's next turn starts with
        them (the last token has no keys and values yet: it was never an input)."""
        for i in leaving:
            parts, ids, virtual = self._keys[i]
            made = self.rows[i].tokens[:-1]
            if parts is None or not made:
                continue
            cols = virtual + len(ids) + len(made)
            kv = [(layer.keys[i:i + 1, :, -cols:], layer.values[i:i + 1, :, -cols:]) for layer in self._cache.layers]
            self.prefix.store(parts, ids + made, kv, virtual)


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

    def fits(self, tables: list[road.Tables | None]) -> bool:
        """Whether rows with ``tables`` can share one layout (checked on this empty one)."""
        return all(self._extend(t) for t in tables if t is not None)

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

