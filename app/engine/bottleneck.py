"""Per-row bottleneck adapters: every row of a batch carries its own ``adapters``-library bottleneck adapter (or
none), applied with batched matmuls at each place some row adapts.

The library places a bottleneck at a Llama decoder sublayer (attention, MLP) with input stream ``x`` and output
``h`` (:mod:`composer.kinds.bottleneck`: :func:`~composer.kinds.bottleneck.places`,
:func:`~composer.kinds.bottleneck.terms`)::

    h' = h + s·(W_up·act(W_down·u + b_down) + b_up) + e·x        u = a·x + b·h

``a, b`` say what it reads (``seq_bn``: the stream after the residual, ``double_seq_bn``: the sublayer's output,
``par_bn``: its input), ``e`` the library's extra residual (0 for those presets). Each adapter's blocks are kept as
``W_downᵀ`` (``hidden × r``), ``b_down``, ``(s·W_up)ᵀ`` (``r × hidden``), ``s·b_up``; per batch, each place stacks
the distinct adapters' blocks (zero-padded to the widest, which adds nothing; row 0 all zeros, so a row without an
adapter there gets exactly ``h``) and gathers one per row, as :mod:`app.engine.lora` does::

    h' = h + bmm(act(bmm(u, W_downᵀ[rows]) + b_down[rows]), (s·W_up)ᵀ[rows]) + s·b_up[rows] + e[rows]·x

Rows with different activations are split by activation between the two matmuls. The stream ``x`` is taken by a
forward pre-hook on the sublayer's norm and ``h`` changed by a forward hook on the sublayer, registered only while a
batch with bottleneck rows runs (:func:`applied`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import MixError
from .lora import distinct_rows

Place = tuple[int, str]  # (decoder layer, "attention" | "output")


@dataclass(frozen=True, eq=False)
class Part:
    """One adapter as the engine runs it: per place ``(W_downᵀ, b_down, (s·W_up)ᵀ, s·b_up)`` in float32, its
    activation's name, and its terms ``(a, b, e)``."""

    blocks: dict[Place, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    activation: str
    terms: tuple[int, int, int]

    def values(self):  # the engine's cache counts its bytes as it does every kind's tables
        return self.blocks.values()


class Batched(NamedTuple):
    """One place's per-row tensors: ``down`` (B, hidden, R), ``down_bias`` (B, 1, R), ``up`` (B, R, hidden),
    ``up_bias`` (B, 1, hidden); ``a``, ``b``, ``e`` (B, 1, 1) or a number every row shares; ``acts``: per
    activation, the rows it applies to (``None``: every row)."""

    down: torch.Tensor
    down_bias: torch.Tensor
    up: torch.Tensor
    up_bias: torch.Tensor
    a: torch.Tensor | int
    b: torch.Tensor | int
    e: torch.Tensor | int
    acts: tuple[tuple[str, torch.Tensor | None], ...]


def adapter_part(adapter: Any, model: nn.Module) -> Part:
    """Check ``adapter`` against ``model`` (Llama-shaped layers, hidden size, layer count) and return its :class:`Part`.

    Raises:
        MixError: it does not fit the model (the reason from :meth:`BottleneckKind.check_fits`).
    """
    from composer import IncompatibleAdaptersError, check_fits
    from composer.kinds import bottleneck as bn

    try:
        check_fits(adapter, model)
    except IncompatibleAdaptersError as e:
        raise MixError(str(e)) from e
    cfg = adapter.bn
    s = float(cfg.get("scaling", 1.0))
    blocks = {lp: (b.down.float().t().contiguous(), b.down_bias.float(), (b.up.float() * s).t().contiguous(),
                   b.up_bias.float() * s) for lp, b in adapter.blocks().items()}
    return Part(blocks=blocks, activation=cfg["non_linearity"].lower(), terms=bn.terms(cfg))


def batch(parts: Sequence[Part | None]) -> dict[Place, Batched]:
    """Per place some row adapts, every row's tensors (rows without an adapter there: zeros, terms 0), or one row
    broadcast over the batch when every row carries the same part."""
    distinct, idx = distinct_rows(list(parts))
    if not distinct:
        return {}
    pick = idx[:1] if bool((idx == idx[0]).all()) else idx
    rows = [None, *distinct]
    out = {}
    for lp in sorted({lp for p in distinct for lp in p.blocks}):
        have = {i: p.blocks[lp] for i, p in enumerate(rows) if p is not None and lp in p.blocks}
        d0 = next(iter(have.values()))[0]
        hidden, r = d0.shape[0], max(blk[0].shape[1] for blk in have.values())
        down = d0.new_zeros(len(rows), hidden, r)
        down_bias = d0.new_zeros(len(rows), 1, r)
        up = d0.new_zeros(len(rows), r, hidden)
        up_bias = d0.new_zeros(len(rows), 1, hidden)
        terms = torch.zeros(len(rows), 3)
        for i, (wd, bd, wu, bu) in have.items():
            w = wd.shape[1]
            down[i, :, :w], down_bias[i, 0, :w], up[i, :w], up_bias[i, 0] = wd, bd, wu, bu
            terms[i] = torch.tensor(rows[i].terms, dtype=terms.dtype)
        sel = terms.index_select(0, pick)
        a, b, e = (_shared(sel[:, k]) for k in range(3))
        names = [rows[int(i)].activation if int(i) in have else None for i in pick]
        acts = _groups(names)
        out[lp] = Batched(down.index_select(0, pick), down_bias.index_select(0, pick), up.index_select(0, pick),
                          up_bias.index_select(0, pick), a, b, e, acts)
    return out


def _shared(col: torch.Tensor) -> torch.Tensor | int:
    """A term every row shares as a plain number (no per-row multiply), else per row as ``(B, 1, 1)``."""
    return int(col[0]) if bool((col == col[0]).all()) else col.view(-1, 1, 1)


def _groups(names: list[str | None]) -> tuple[tuple[str, torch.Tensor | None], ...]:
    """Rows by activation; a row without an adapter at the place joins the first (its up-projection is zero)."""
    known = list(dict.fromkeys(n for n in names if n is not None))
    if len(known) == 1:
        return ((known[0], None),)
    names = [n if n is not None else known[0] for n in names]
    return tuple((k, torch.tensor([i for i, n in enumerate(names) if n == k])) for k in known)


def placed(per_place: dict[Place, Batched], like: torch.Tensor) -> dict[Place, Batched]:
    """The tensors on ``like``'s device and in its dtype (a no-op for float32 on the CPU)."""
    def move(t):
        return t.to(like.device, like.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    if all(b.down.device == like.device and b.down.dtype == like.dtype for b in per_place.values()):
        return per_place
    return {lp: Batched(*(move(t) for t in b[:7]), tuple((n, i if i is None else i.to(like.device))
                                                          for n, i in b.acts))
            for lp, b in per_place.items()}


def update(x: torch.Tensor, h: torch.Tensor, rows: Batched) -> torch.Tensor:
    """``h'`` for every row with its own adapter (``x``, ``h``: ``(batch, seq, hidden)``)."""
    from composer.kinds.bottleneck import ACTIVATIONS

    a, b, e = rows.a, rows.b, rows.e
    if isinstance(a, int) and isinstance(b, int):
        u = x if not b else h if not a else x + h
    else:
        u = x * a + h * b
    d = torch.matmul(u, rows.down) + rows.down_bias
    if len(rows.acts) == 1:
        d = ACTIVATIONS[rows.acts[0][0]](d)
    else:
        out = torch.empty_like(d)
        for name, idx in rows.acts:
            out[idx] = ACTIVATIONS[name](d.index_select(0, idx))
        d = out
    new = h + (torch.matmul(d, rows.up) + rows.up_bias)
    if isinstance(e, int):
        return new + e * x if e else new
    return new + e * x


_OPEN: weakref.WeakKeyDictionary[nn.Module, list[list[bool]]] = weakref.WeakKeyDictionary()
"""Per model, the on/off switch of each :func:`applied` block open now (outermost first): :func:`set_aside`."""


@contextmanager
def applied(model: nn.Module, per_place: dict[Place, Batched]) -> Iterator[None]:
    """Inside this block, ``model``'s decoder layers add each row's bottleneck at the places in ``per_place``."""
    if not per_place:
        yield
        return
    from composer.kinds.bottleneck import decoder_layers, hook_place

    layers = decoder_layers(model)
    on = [True]  # off while set aside: the hooks pass the sublayer's output through

    def change(x, h, rows):
        return update(x, h, rows) if on[0] else h

    switches = _OPEN.setdefault(model, [])
    switches.append(on)
    try:
        with ExitStack() as stack:
            for (i, place), rows in per_place.items():
                for handle in hook_place(layers[i], place, lambda x, h, rows=rows: change(x, h, rows)):
                    stack.callback(handle.remove)
            yield
    finally:
        switches.remove(on)


@contextmanager
def set_aside(model: nn.Module) -> Iterator[None]:
    """Inside this block, the :func:`applied` blocks already open on ``model`` add nothing (blocks opened inside it
    do): a forward pass of its own runs between two layers of another (``Engine.set_aside``)."""
    held = [on for on in _OPEN.get(model, []) if on[0]]
    for on in held:
        on[0] = False
    try:
        yield
    finally:
        for on in held:
            on[0] = True
