"""Per-row LoRA: every row of a batch carries its own LoRA factors, applied with two batched matmuls per layer.

PEFT's LoRA (``peft/tuners/lora/layer.py``) adds to an adapted ``nn.Linear``'s output ``y = W·x + b``::

    y' = y + s · B(A(x))                              A: (r, in), B: (out, r), s = lora_alpha / r (or / √r)

Here each adapter's factors are kept as ``Aᵀ`` (``in × r``) and ``(s·B)ᵀ`` (``r × out``), the scale folded in
once. Per batch, each adapted layer stacks the distinct adapters' factors (zero-padded to the largest rank,
which changes nothing; row 0 is all zeros, so base-model rows get exactly ``y``) and gathers one per row::

    y' = y + bmm(bmm(x, Aᵀ[rows]), (s·B)ᵀ[rows])       x: (batch, seq, in), Aᵀ[rows]: (batch, in, R)

Two batched matmuls per adapted layer whatever the number of distinct LoRAs, where PEFT's ``adapter_names``
path loops over the adapters in Python, one sub-batch each. Several LoRAs on one row (PEFT with several
active) concatenate their ranks, which is exactly their sum. A RoAd part on the same layer acts on ``y'`` (LoRA
on the weight, RoAd on the output: :class:`app.engine.road.RowRoadLinear`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from composer import LoraAdapter

from ..errors import MixError
from .bounds import MAX_SCALE, lora_ratio

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (Aᵀ: in × r, (s·B)ᵀ: r × out), float32


def adapter_factors(adapter: LoraAdapter, linears: dict[str, nn.Linear]) -> Factors:
    """Check ``adapter`` against the model's layers and return its per-layer ``(Aᵀ, (s·B)ᵀ)``.

    Raises:
        MixError: a module is missing or has another shape, the LoRA is not a plain ``ΔW = s·B·A`` (DoRA,
            LoRA bias ...), which the engine does not run per row, or it changes a layer by more than
            :data:`~app.engine.bounds.MAX_SCALE` times the layer's weight.
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
    ratio, worst = max((lora_ratio(adapter.lora_a[m], adapter.lora_b[m], adapter.scaling[m], linears[m].weight), m)
                       for m in adapter.lora_a) if adapter.lora_a else (0.0, None)
    if not ratio <= MAX_SCALE:
        raise MixError(f"The mix changes layer '{worst}' by {ratio:.3g} times its own weight (LoRA ‖s·B·A‖/‖W‖; above "
                       f"{MAX_SCALE:g} the model's activations overflow and the reply comes out empty or garbled). "
                       "Lower the weights, or check the adapter: trained LoRAs change a layer by well under 1.",
                       module=worst)
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


def batch_factors(row_factors: list[Factors | None]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapted layer, ``(Aᵀ[rows], (s·B)ᵀ[rows])`` of shapes ``(batch, in, R)`` and ``(batch, R, out)``.

    Distinct factor sets are stacked once (row 0 = zeros) and gathered by a row index; layers no row adapts with
    a LoRA are absent.
    """
    distinct, idx = distinct_rows(row_factors)
    if not distinct:
        return {}
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
        out[m] = (a_stack.index_select(0, idx), b_stack.index_select(0, idx))
    return out


def row_update(x: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``s·B·A·x`` for every row with its own factors: ``x`` is ``(batch, ..., in)``, the result
    ``(batch, ..., out)``."""
    a, b = rows
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    return torch.bmm(torch.bmm(x3.to(a.dtype), a), b).view(*x.shape[:-1], b.shape[-1]).to(x.dtype)
