"""Prefill in pieces: a newcomer's prompt starts from cached keys and values and is computed in chunks.

A row's *columns* are its prompt-learning adapter's virtual tokens (a prompt vector's or p-tuning adapter's
input embeddings; a prefix-tuning adapter's keys and values, known from the start), then its token ids. Some
first columns may already be known (a cached prefix, :mod:`app.engine.prefix_cache`, or the chunks done so
far); one forward pass computes the next columns of several rows at once. Every row of that pass computes the
same number ``L`` of columns, its last ones up to its target, on top of the columns before them::

                past (known keys and values)   query (L columns computed now)
    row 0       . . k k k k k k                q q q q        4 known columns were cached; 4 computed
    row 1       k k k k k k k k                q q q q        a chunk of a long prompt: 8 done, 4 more
    row 2       . . . . . . . .                . . q q        short and new: padding, then its 2 columns
    row 3       . . . . . k k k                k k q q        2 known columns computed again (as padding)

A row's real columns stay side by side at the right, as in the running batch (:mod:`app.engine.continuous`),
and positions count them from the row's first column, so each row gets the keys, values and last logits it
gets when prefilled whole and alone, up to float rounding: a prefix's keys and values do not depend on what
follows it (causal attention), and a sliding window or attention chunk spans the same real columns.
Recomputing a few known columns (row 3) costs what padding would and keeps rows free of holes; a prefix-tuning
row's virtual columns cannot be computed, so its query may start after padding, and :func:`compact` closes
that hole after the pass (such rows are served only on models whose every layer is full attention).

:func:`plan` picks the rows and ``L`` for one pass within a budget of ``rows × L`` token slots: shortest
remaining first (a row waiting ``PATIENCE`` passes goes first), so a long prompt runs in chunks beside the
short ones instead of stalling them, and between chunks the running rows take their decode step. Short
prompts (a chat turn) are never cut: the budget grows to hold all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from composer import kinds

from . import cache as kv_cache
from .prefix_cache import KV

if TYPE_CHECKING:
    from .engine import Engine

PATIENCE = 4
"""Passes a pending row may be passed over (shorter rows first) before it goes first."""


@dataclass(eq=False)
class Pending:
    """A row being prefilled: its columns and how many of them have keys and values already.

    Attributes:
        row: the :class:`~app.engine.continuous.Row`.
        ids: its prompt's token ids.
        prompt: its prompt vector (``None``: no virtual columns).
        tables, lora, bn: its RoAd tables, LoRA factors and bottleneck (as :meth:`Engine._split` gives them).
        parts: its mix's parts for the prefix cache (``None``: not cached).
        done: columns whose keys and values are known; ``kv`` holds them (per layer
            ``(1, heads, done, dim)``).
        cached: of those, how many came from the prefix cache.
        started: it was in a pass already (until then, it looks the prefix cache up again before each one).
        waited: passes it was left out of.
    """

    row: Any
    ids: list[int]
    prompt: Any = None
    tables: Any = None
    lora: Any = None
    bn: Any = None
    parts: tuple[Any, ...] | None = None
    done: int = 0
    kv: KV | None = None
    cached: int = 0
    started: bool = False
    waited: int = 0
    seq: int = field(default=0)

    @property
    def past_kv(self) -> bool:
        """Its virtual columns are a prefix-tuning adapter's keys and values (not input embeddings)."""
        return self.prompt is not None and kinds.of(self.prompt).engine_role == "past_kv"

    @property
    def virtual(self) -> int:
        if self.prompt is None:
            return 0
        return int(self.prompt.num_virtual_tokens if self.past_kv else self.prompt.shape[0])

    @property
    def columns(self) -> int:
        return self.virtual + len(self.ids)

    @property
    def remaining(self) -> int:
        return self.columns - self.done


def plan(pending: list[Pending], budget: int | None, short: int = 0) -> tuple[list[Pending], list[int]]:
    """The rows of the next pass and the column each one reaches (its target).

    Args:
        pending: rows waiting, oldest first.
        budget: at most this many token slots (rows × ``L``) in the pass; ``None``: every row, whole.
        short: rows with at most this many columns to go are never cut or left out for the budget (the
            budget grows to hold them all): chunks are for long prompts, and a burst of chat prompts in
            several passes would make its last first token wait for a decode step per pass.
    """
    if budget is None:
        return list(pending), [p.columns for p in pending]
    shorts = [p.remaining for p in pending if p.remaining <= short]
    budget = max(budget, len(shorts) * max(shorts, default=0))
    order = sorted(pending, key=lambda p: (p.waited < PATIENCE, p.remaining, p.seq))
    take: list[Pending] = []
    width = 0
    for p in order:
        w = min(max(width, p.remaining), budget // (len(take) + 1))
        if w < max(width, 1):
            break
        take.append(p)
        width = w
    for p in pending:
        p.waited = 0 if p in take else p.waited + 1
    return take, [p.done + min(p.remaining, width) for p in take]


def inputs(engine: Engine, group: list[Pending], targets: list[int]
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """``(inputs_embeds, attention_mask, position_ids, past_key_values)`` of one pass (the module's drawing).

    Row ``i`` computes its columns ``[targets[i] - L, targets[i])`` (from 0 when shorter: left padding) on top
    of its known ones before them.
    """
    dev = engine._embed.weight.device
    b = len(group)
    width = max(t - p.done for p, t in zip(group, targets))
    starts = [max(0, t - width, p.virtual if p.past_kv else 0) for p, t in zip(group, targets)]
    past = max(starts)
    ids = torch.full((b, width), engine._pad_id(), dtype=torch.long)
    pos = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, past + width, dtype=torch.long)
    prompts = []
    for i, (p, t, s) in enumerate(zip(group, targets, starts)):
        off = width - (t - s)  # the row's first query slot (a prefix-tuning row's starts after its prefix)
        tok0 = max(s, p.virtual)  # first token column computed now
        if tok0 < t:
            ids[i, off + tok0 - s:] = torch.tensor(p.ids[tok0 - p.virtual:t - p.virtual])
        if s < p.virtual:
            prompts.append((i, off, p.prompt, s, min(t, p.virtual)))
        pos[i, off:] = torch.arange(s, t)
        mask[i, past - s:past] = 1
        mask[i, past + off:] = 1
    emb = engine._embed(ids.to(dev))
    for i, off, prompt, a, z in prompts:
        emb[i, off:off + z - a] = prompt.prompt[a:z].to(emb)
    cache = kv_cache.new(engine.model.config)
    if past:
        ref = next(p.kv for p, s in zip(group, starts) if s)
        kv = []
        for layer in range(len(ref)):
            ks, vs = [], []
            for p, s in zip(group, starts):
                k, v = (p.kv[layer][0][:, :, :s], p.kv[layer][1][:, :, :s]) if s else \
                    (ref[layer][0][:, :, :0], ref[layer][1][:, :, :0])
                ks.append(F.pad(k, (0, 0, past - s, 0)))
                vs.append(F.pad(v, (0, 0, past - s, 0)))
            kv.append((torch.cat(ks), torch.cat(vs)))
        cache = kv_cache.filled(engine.model.config, kv)
    return emb, mask.to(dev), pos.to(dev), cache


def compact(cache: Any, mask: torch.Tensor) -> torch.Tensor:
    """Move each row's real columns side by side at the right, where a prefix-tuning row's prefix and the
    tokens computed after it had padding between them; returns the mask to go with the cache. (Keys carry
    their positions, not their columns: on full attention, where such rows are served, moving a column
    changes nothing.)"""
    real = mask.sum(1)
    w = mask.shape[1]
    holes = [i for i in range(mask.shape[0]) if not bool(mask[i, w - int(real[i]):].all())]
    if not holes:
        return mask
    mask = mask.clone()
    for i in holes:
        idx = mask[i].nonzero().flatten()
        n = idx.numel()
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name)
                moved = t[i, :, idx]
                t[i] = 0
                t[i, :, w - n:] = moved
        mask[i] = 0
        mask[i, w - n:] = 1
    return mask


def row_kv(cache: Any, i: int, columns: int) -> KV:
    """Row ``i``'s last ``columns`` keys and values in ``cache`` (views, per layer
    ``(1, heads, columns, dim)``)."""
    return [(layer.keys[i:i + 1, :, layer.keys.shape[2] - columns:],
             layer.values[i:i + 1, :, layer.values.shape[2] - columns:]) for layer in cache.layers]
