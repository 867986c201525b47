"""Decode-time combination: one request's next token from the base model and several mixes, combined per step.

For parts ``A_1 .. A_k`` with weights ``w_i`` (each part any mix the engine serves on a row: an adapter, a list of
them, :class:`composer.Parts`, a ``composer.add`` sum), every next-token distribution of the request is
``softmax(z)`` with::

    z = log_softmax(base) + Σ_i w_i · (log_softmax(A_i) − log_softmax(base))

each term the last position's logits over the same token history, the model run once with no adapter and once
per part. Greedy picks ``argmax z``; sampling applies the request's temperature and top-p to ``z`` as
:func:`~app.engine.sampling.pick_rows` does to logits. ``w_i = 1`` for every part is a product of experts over the
base (``z = Σ log p_i − (k − 1)·log p_base``); ``w = 0`` is the base model; one part at ``w = 1`` is that part.

How it runs: one request becomes ``k + 1`` *members*, ordinary rows of the batch (the base model's first, then
each part's), with the same prompt. They decode side by side and share one token stream: after each step the
members' logits are combined into ``z``, one token is picked with the request's own sampler (kept by the first
member), and that token is every member's next input. In the running batch (:mod:`app.engine.continuous`) a
member is a row like any other: its prefix-cache entries are its own mix's (the base member shares the base
model's), it is prefilled in chunks, and a conversation's next turn finds each member's earlier turn cached. The
members finish their prefill in one pass (:func:`together`: the first token is picked from all of them) and end
together (same tokens, same budget).

Cost: ``k + 1`` rows of compute and KV cache per request (a pair: three rows), against one for ``composer.add``
of the same parts.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import MixError

# Rows here are :class:`app.engine.continuous.Row` and pending rows :class:`app.engine.prefill.Pending`, typed ``Any``:
# both modules import this one (``continuous.members`` makes a decode-time row's members).



@dataclass(frozen=True, eq=False)
class DecodeMix:
    """A mix served by decode-time combination of its parts' next-token log-probabilities (the module's ``z``).

    Args:
        parts: the mixes combined (at least one; each as :meth:`Engine.forward` takes a row's mix, not ``None`` and
            not another :class:`DecodeMix`).
        weights: one finite number per part (default 1 for each).

    Compared and hashed by identity, as adapters are (the prefix cache keys each member by its part's identity).

    Raises:
        MixError: no parts, a ``None`` or nested part, or weights that are not one finite number per part.
    """

    parts: tuple[Any, ...]
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.parts, (str, bytes)) or not isinstance(self.parts, Sequence):
            raise MixError(f"DecodeMix takes a sequence of mixes (one per part), got {type(self.parts).__name__}.")
        parts = tuple(self.parts)
        if not parts:
            raise MixError("DecodeMix needs at least one part: the mixes whose next-token log-probabilities are "
                           "combined with the base model's.")
        for i, p in enumerate(parts):
            if p is None:
                raise MixError(f"DecodeMix part {i} is None (the base model): its term is always 0; leave it out.")
            if isinstance(p, DecodeMix):
                raise MixError(f"DecodeMix part {i} is itself a DecodeMix; list its parts (and weights) in one "
                               "DecodeMix instead.")
        weights = (1.0,) * len(parts) if self.weights is None else self.weights
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
            raise MixError(f"DecodeMix weights must be a sequence of numbers, got {type(weights).__name__}.")
        if len(weights) != len(parts):
            raise MixError(f"DecodeMix got {len(weights)} weight(s) for {len(parts)} part(s); give one per part.")
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(float(w)):
                raise MixError(f"DecodeMix weight {i} must be a finite number, got {w!r}.")
        object.__setattr__(self, "parts", parts)
        object.__setattr__(self, "weights", tuple(float(w) for w in weights))

    @property
    def members(self) -> list[Any]:
        """The mixes of the rows that run for one request: the base model (``None``), then each part."""
        return [None, *self.parts]


def combine(logits: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """``z`` (the module's definition) from the members' logits ``(k + 1, ..., vocab)``: the base model's first.

    Computed in float32 (or the logits' wider dtype); any leading shape after the member axis (one position, or
    every position of :meth:`Engine.forward`).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    lp = logits.to(dtype).log_softmax(-1)
    base = lp[0]
    z = base.clone()
    for w, part in zip(weights, lp[1:]):
        z += w * (part - base)
    return z


@dataclass
class Layout:
    """How a static batch's rows run: ``src[j]`` is the caller's row that member row ``j`` runs for, and ``groups``
    each decode-time row's member rows and weights (any other row runs as one member of its own)."""

    src: list[int]
    groups: dict[int, tuple[list[int], tuple[float, ...]]]

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """The visible rows' scores: a plain row's logits, a decode-time row's ``z`` (``(rows, ..., vocab)``)."""
        firsts = {}
        for j, i in enumerate(self.src):
            firsts.setdefault(i, j)
        out = logits.index_select(0, torch.tensor([firsts[i] for i in range(len(firsts))], device=logits.device))
        if self.groups:
            out = out.to(torch.promote_types(out.dtype, torch.float32))
            for i, (members, weights) in self.groups.items():
                out[i] = combine(logits[members], weights).to(out)
        return out


def expand(mixes: Sequence[Any]) -> tuple[list[Any], Layout] | None:
    """The member rows' mixes of a static batch and their :class:`Layout`, or ``None`` when no row is a
    :class:`DecodeMix` (the batch runs as it is)."""
    if not any(isinstance(m, DecodeMix) for m in mixes):
        return None
    out, src, groups = [], [], {}
    for i, m in enumerate(mixes):
        if isinstance(m, DecodeMix):
            groups[i] = (list(range(len(out), len(out) + len(m.parts) + 1)), m.weights)
            out += m.members
            src += [i] * (len(m.parts) + 1)
        else:
            out.append(m)
            src.append(i)
    return out, Layout(src, groups)


@dataclass(eq=False)
class Group:
    """A decode-time request in the running batch: the caller's row and its members (hidden rows).

    Attributes:
        row: the row the caller made (its mix a :class:`DecodeMix`); its tokens are the members' shared stream.
        members: one row per member mix, the base model's first (it carries the request's sampler).
        scores: ``z`` of the last token picked (``(vocab,)`` float), for inspection.
    """

    row: Any
    members: list[Any]
    scores: torch.Tensor | None = field(default=None, repr=False)

    @property
    def weights(self) -> tuple[float, ...]:
        return self.row.mix.weights


def pick(rows: Sequence[Any], logits: torch.Tensor, groups: dict[Any, Group]) -> torch.Tensor:
    """``logits`` (one row per running row) with each decode-time group's first member's row replaced by the
    group's ``z``; the other members' picks are overwritten by :func:`share`. Records ``z`` on the group."""
    pos = {r: j for j, r in enumerate(rows) if r in groups}
    if not pos:
        return logits
    out = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
    for g in {groups[r] for r in pos}:
        idx = [pos[m] for m in g.members]  # every member runs in the same pass (a KeyError: a scheduler bug)
        g.scores = combine(logits[idx], g.weights)
        out[idx[0]] = g.scores
    return out


def share(rows: Sequence[Any], tokens: torch.Tensor, groups: dict[Any, Group]) -> torch.Tensor:
    """Every member of a group takes the token picked for its first member."""
    pos = {r: j for j, r in enumerate(rows) if r in groups}
    if not pos:
        return tokens
    out = tokens.clone()
    for r, j in pos.items():
        out[j] = tokens[pos[groups[r].members[0]]]
    return out


def together(pending: Sequence[Any], group: list[Any], targets: list[int], groups: dict[Any, Group]
             ) -> tuple[list[Any], list[int]]:
    """Adjust one prefill pass (:func:`app.engine.prefill.plan`'s rows and targets) so that the members of a
    decode-time group complete their prompts in the same pass: their first token is picked from all of them.

    A member that would complete while another member of its group would not stops one column short (or sits
    the pass out when only its last column is left); once every member of a group has at most its last column
    to go, any pass that takes one of them takes them all, past the budget (as short prompts are).
    """
    if not groups:
        return group, targets
    target = dict(zip(group, targets))
    by_group: dict[Group, list[Any]] = {}
    for p in pending:
        g = groups.get(p.row)
        if g is not None:
            by_group.setdefault(g, []).append(p)
    for members in by_group.values():
        if not any(p in target for p in members) or all(target.get(p) == p.columns for p in members):
            continue
        if all(target.get(p) == p.columns or p.remaining <= 1 for p in members):
            for p in members:
                target[p] = p.columns
            continue
        for p in members:
            if target.get(p) == p.columns:
                if p.columns - 1 > p.done:
                    target[p] = p.columns - 1
                else:
                    del target[p]
    order = [p for p in group if p in target] + [p for p in pending if p in target and p not in group]
    return order, [target[p] for p in order]
