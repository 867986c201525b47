"""Per-row LoRA: every row of a batch carries its own LoRA factors, applied with two batched matmuls per layer.

PEFT's LoRA (``peft/tuners/lora/layer.py``) adds to an adapted ``nn.Linear``'s output ``y = W·x + b``::

    y' = y + s · B(A(x))                              A: (r, in), B: (out, r), s = lora_alpha / r (or / √r)

Here each adapter's factors are kept as ``Aᵀ`` (``in × r``) and ``(s·B)ᵀ`` (``r × out``), the scale folded in
once. Per batch, each adapted layer stacks the distinct adapters' factors (zero-padded to the largest rank,
which changes nothing) and either gathers one per row (row 0 all zeros, so base-model rows get exactly ``y``)::

    y' = y + bmm(bmm(x, Aᵀ[rows]), (s·B)ᵀ[rows])       x: (batch, seq, in), Aᵀ[rows]: (batch, in, R)

or, when rows share LoRAs, groups the rows by LoRA so each LoRA's factors are read once (:class:`LayerFactors`)::

    y'[rows] += bmm(bmm(x[take], Aᵀ), (s·B)ᵀ)[back]      x[take]: (LoRAs, rows per LoRA, in)

Two batched matmuls per adapted layer whatever the number of distinct LoRAs, where PEFT's ``adapter_names``
path loops over the adapters in Python, one sub-batch each. Several LoRAs on one row (PEFT with several
active) concatenate their ranks, which is exactly their sum. A RoAd part on the same layer acts on ``y'`` (LoRA
on the weight, RoAd on the output: :class:`app.engine.road.RowRoadLinear`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from composer import LoraAdapter

from ..errors import MixError

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (Aᵀ: in × r, (s·B)ᵀ: r × out), float32


def adapter_factors(adapter: LoraAdapter, linears: dict[str, nn.Linear]) -> Factors:
    """Check ``adapter`` against the model's layers and return its per-layer ``(Aᵀ, (s·B)ᵀ)``.

    Raises:
        MixError: a module is missing or has another shape, or the LoRA is not a plain ``ΔW = s·B·A`` (DoRA,
            LoRA bias ...), which the engine does not run per row.
    """
    from composer import IncompatibleAdaptersError, check_fits

    if adapter.not_low_rank:
        raise MixError(f"The engine runs plain LoRAs per row; this one is not ({adapter.not_low_rank}). Load it "
                       "with PeftModel.from_pretrained, or merge it into the base model (merge_and_unload) and "
                       "serve that.")
    try:
        check_fits(adapter, None, modules=linears)
    except IncompatibleAdaptersError as e:
        raise MixError(str(e), module=e.tensor.rsplit(".", 1)[0] if e.tensor else None) from e
    return {m: (adapter.lora_a[m].float().t().contiguous(),
                (adapter.lora_b[m].float() * adapter.scaling[m]).t().contiguous()) for m in adapter.lora_a}


def stack(factors: list[Factors]) -> Factors:
    """Several LoRAs on one row (PEFT with all of them active): ranks concatenated, i.e. the sum of their ΔW."""
    if len(factors) == 1:
        return factors[0]
    out: Factors = {}
    for m in dict.fromkeys(m for f in factors for m in f):
        parts = [f[m] for f in factors if m in f]
        out[m] = (torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 0))
    return out


def distinct_rows(rows: list[Any]) -> tuple[list[Any], torch.Tensor]:
    """The distinct non-``None`` objects of ``rows`` (by identity) and each row's index into ``[None, *distinct]``:
    what lets a batch stack a mix's tables once however many rows carry it."""
    distinct: list[Any] = []
    slot: dict[int, int] = {}
    index = []
    for r in rows:
        if r is None:
            index.append(0)
            continue
        if id(r) not in slot:
            distinct.append(r)
            slot[id(r)] = len(distinct)
        index.append(slot[id(r)])
    return distinct, torch.tensor(index)


class LayerFactors(NamedTuple):
    """One adapted layer's LoRA factors for a batch, in one of two layouts (:func:`batch_factors` picks):

    - per row (``take`` is ``None``): ``a[i]``, ``b[i]`` are row ``i``'s factors (zeros for rows without a LoRA);
    - grouped: ``a[g]``, ``b[g]`` are distinct LoRA ``g``'s factors, read once however many rows carry it. Its rows
      are gathered into ``(groups, per_group, ...)`` by ``take`` (padded with a repeat of the group's first row,
      whose result is never used), and ``back`` picks each LoRA row's result, in the order of ``rows``.
    """

    a: torch.Tensor                  # (G, in, R)
    b: torch.Tensor                  # (G, R, out)
    take: torch.Tensor | None = None  # (G * per_group,) batch row of each slot
    back: torch.Tensor | None = None  # (n,) slot of each LoRA row
    rows: torch.Tensor | None = None  # (n,) the batch rows that carry a LoRA

    def to(self, device: torch.device, dtype: torch.dtype) -> LayerFactors:
        idx = [None if t is None else t.to(device) for t in (self.take, self.back, self.rows)]
        return LayerFactors(self.a.to(device, dtype), self.b.to(device, dtype), *idx)


def batch_factors(row_factors: list[Factors | None]) -> dict[str, LayerFactors]:
    """Per adapted layer, the batch's LoRA factors (:class:`LayerFactors`).

    Rows that share a LoRA read its factors once (grouped) when there are at least two LoRA rows per distinct
    LoRA on average: per-row copies of the factors were what the per-row update spent its time on (64 rows
    reading their own copy of 16 LoRAs' factors, 4 MiB per 1536-wide layer and step). With (nearly) every row
    its own LoRA, the per-row layout skips the gathers. Distinct factor sets are zero-padded to the largest
    rank, which changes nothing; layers no row adapts with a LoRA are absent.
    """
    distinct, idx = distinct_rows(row_factors)
    if not distinct:
        return {}
    lora_rows = (idx > 0).nonzero().flatten()
    grouped = 2 * len(distinct) <= len(lora_rows)
    if grouped:
        members = [(idx == g + 1).nonzero().flatten() for g in range(len(distinct))]
        per = max(len(r) for r in members)
        take = torch.cat([torch.cat((r, r[:1].expand(per - len(r)))) for r in members])
        slot = torch.empty(len(idx), dtype=torch.long)
        for g, r in enumerate(members):
            slot[r] = g * per + torch.arange(len(r))
        back = slot.index_select(0, lora_rows)
    out = {}
    for m in sorted({m for f in distinct for m in f}):
        have = {i: f[m] for i, f in enumerate(distinct) if m in f}
        a0, b0 = next(iter(have.values()))
        rank = max(a.shape[1] for a, _ in have.values())
        a_stack = a0.new_zeros(len(distinct) + 1, a0.shape[0], rank)
        b_stack = b0.new_zeros(len(distinct) + 1, rank, b0.shape[1])
        for i, (a, b) in have.items():
            a_stack[i + 1, :, :a.shape[1]] = a
            b_stack[i + 1, :b.shape[0]] = b
        if grouped:
            out[m] = LayerFactors(a_stack[1:], b_stack[1:], take, back, lora_rows)
        else:
            out[m] = LayerFactors(a_stack.index_select(0, idx), b_stack.index_select(0, idx))
    return out


def add_update_(y: torch.Tensor, x: torch.Tensor, f: LayerFactors) -> torch.Tensor:
    """``y += s·B·A·x`` for every row with its own factors, in place: ``x`` is ``(batch, ..., in)``, ``y``
    ``(batch, ..., out)`` (a layer's fresh output)."""
    b = x.shape[0]
    x3 = x.reshape(b, -1, x.shape[-1]).to(f.a.dtype)
    if f.take is None:
        upd = torch.bmm(torch.bmm(x3, f.a), f.b)
        return y.add_(upd.view(y.shape).to(y.dtype))
    g, length = f.a.shape[0], x3.shape[1]
    xg = x3.index_select(0, f.take).view(g, -1, x3.shape[-1])           # (G, per_group * L, in)
    v = torch.bmm(torch.bmm(xg, f.a), f.b).view(-1, length, f.b.shape[-1]).index_select(0, f.back)
    y3 = y.view(b, length, -1)
    y3.index_add_(0, f.rows, v.to(y.dtype))
    return y
