"""Per-row RoAd: every row of a batch carries its own RoAd tables, applied in one fused update per layer.

PEFT's RoAd (``peft/tuners/road/layer.py``) computes, for each adapted ``nn.Linear`` with output ``y``::

    y' = y * first_col + rotate_half(y) * second_col          rotate_half per group: (y1, y2) -> (-y2, y1)

where ``first_col``/``second_col`` come from θ and α (``composer.road_math.columns``, PEFT's ``_prepare_cols``).
We fold the minus sign of ``rotate_half`` into the table (``S = second_col`` with its first half of each group
negated), so that with ``y`` viewed as ``(batch, seq, groups, 2, group_size/2)``::

    y' = addcmul(y * C, y.flip(3), S)                         C, S: (batch, 1, groups, 2, group_size/2)

Three element-wise kernels per adapted layer, whatever the number of distinct adapters in the batch. Each
row's ``(C, S)`` is gathered once per batch from a stacked table whose row 0 is the identity (C=1, S=0), so
base-model rows are exact. A pair block ``[[C1, S1], [S2, C2]]`` is a general 2x2 matrix, so stacking
several RoAd adapters on one row (PEFT applying them in turn) is the matrix product of their blocks.

Other kinds whose ``engine_role`` is ``"output"`` say which RoAd adapter they equal (``Kind.as_road``): IA³'s
output scale ``y ⊙ l`` is ``C = l, S = 0``. Such a pure scale fits every grouping of its layer (:func:`aligned`), so
it shares a layer with RoAd tables of any group size.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from composer.adapters import VARIANTS
from composer.road_math import columns

from ..errors import MixError
from . import kernel
from .bounds import MAX_SCALE
from .lora import distinct_rows, row_update

Tables = dict[str, tuple[torch.Tensor, torch.Tensor]]


def signed_tables(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, S)`` of shape ``(groups, 2, group_size/2)`` with rotate_half's sign folded into ``S``.

    road_1 shares one value between both halves of a group, so its tables stay compact,
    ``(groups, 1, group_size/2)`` holding ``α·cosθ`` and ``α·sinθ`` (half the memory); :func:`full_tables`
    expands them when a batch is built.
    """
    if variant == "road_1":
        t = theta.float().reshape(-1, 1, group_size // 2)
        a = alpha.float().reshape(-1, 1, group_size // 2)
        return a * t.cos(), a * t.sin()
    if variant not in VARIANTS:
        raise MixError(f"Unknown RoAd variant {variant!r}; expected one of {', '.join(VARIANTS)}.")
    first, second = columns(variant, group_size, theta.float(), alpha.float())
    h = group_size // 2
    c = first.reshape(-1, 2, h).contiguous()
    s = second.reshape(-1, 2, h).clone()
    s[:, 0, :].neg_()
    return c, s


_SIGN = torch.tensor([-1.0, 1.0]).view(1, 2, 1)


def full_tables(cs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand compact road_1 tables to the ``(groups, 2, h)`` signed form (others pass through)."""
    c, s = cs
    if c.shape[1] == 2:
        return c, s
    return c.expand(-1, 2, -1), s * _SIGN


def compose_tables(first: tuple[torch.Tensor, torch.Tensor], then: tuple[torch.Tensor, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables of applying ``first`` then ``then`` (the product of the 2x2 pair blocks)."""
    ca, sa = full_tables(first)
    cb, sb = full_tables(then)
    c1 = cb[:, 0] * ca[:, 0] + sb[:, 0] * sa[:, 1]
    s1 = cb[:, 0] * sa[:, 0] + sb[:, 0] * ca[:, 1]
    s2 = sb[:, 1] * ca[:, 0] + cb[:, 1] * sa[:, 1]
    c2 = sb[:, 1] * sa[:, 0] + cb[:, 1] * ca[:, 1]
    return torch.stack((c1, c2), 1), torch.stack((s1, s2), 1)


def adapter_tables(adapter: Any, linears: dict[str, nn.Linear]) -> Tables:
    """Check ``adapter`` (of a kind whose ``engine_role`` is ``"output"``) against the model's layers and compute
    its per-layer ``(C, S)`` tables, from the RoAd adapter its kind says it equals (``Kind.as_road``).

    Raises:
        MixError: a module is missing from the model, is not an ``nn.Linear``, or has another width; or the adapter
            is no output transform (the kind's reason).
    """
    from composer import IncompatibleAdaptersError, NotComposableError, check_fits, kinds

    try:
        check_fits(adapter, None, modules=linears)
        adapter = kinds.of(adapter).as_road(adapter)
    except IncompatibleAdaptersError as e:
        raise MixError(str(e), module=e.tensor.rsplit(".", 1)[0] if e.tensor else None) from e
    except NotComposableError as e:
        raise MixError(str(e)) from e
    big = max((float(a.abs().max()) for a in adapter.alpha.values() if a.numel()), default=0.0)
    if big > MAX_SCALE:
        # Finite but enormous: a few layers scaled by this overflow float32 and every token comes out empty.
        raise MixError(f"The mix scales a layer's output by up to {big:.3g} (RoAd/IA³ scale α; above {MAX_SCALE:g} "
                       "the model's activations overflow and the reply comes out empty). Lower the weights, or check "
                       "the adapter: trained scales stay near 1.")
    return {name: signed_tables(adapter.variant, adapter.group_size, adapter.theta[name], adapter.alpha[name])
            for name in adapter.theta}


def scale_only(cs: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether tables are a pure per-element scale (``S = 0``: an IA³ vector, or a RoAd with θ = 0), which every
    grouping of the layer's width represents exactly (the values in the same order)."""
    return not bool(cs[1].any())


def aligned(tables: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The tables of one layer in their full form and one grouping: the grouping of those that rotate (all of which
    must share it), pure scales regrouped to it; ``None`` when two that rotate group the layer differently."""
    full = [full_tables(t) for t in tables]
    shapes = {c.shape for c, _ in full}
    if len(shapes) == 1:
        return full
    fixed = {c.shape for c, s in full if not scale_only((c, s))}
    if len(fixed) > 1:
        return None
    shape = fixed.pop() if fixed else full[0][0].shape
    return [(c, s) if c.shape == shape else (c.reshape(shape), s.reshape(shape)) for c, s in full]


class RowRoadLinear(nn.Linear):
    """``nn.Linear`` whose output gets a per-row LoRA update while ``lora_rows`` is set (on the weight:
    :func:`app.engine.lora.row_update`), then a per-row RoAd update while ``road_rows`` is set (on the output);
    or, while ``folded`` is set, runs with that ``(weight, bias)`` instead (one mix for the whole batch, merged
    into a copy of the weights by :func:`fold`; the layer's own parameters are never written).

    The RoAd update runs in the fused CPU kernel (:mod:`app.engine.kernel`) once it is built, when the layer is
    float32 on the CPU and no gradient is recorded, else as three eager kernels; both give the same bits.

    Installed by swapping the class of the model's own layers (no wrapper module, no hook), so state-dict
    names and the base model's forward stay as they were; unset rows cost one attribute check each.
    """

    road_rows: tuple[torch.Tensor, torch.Tensor] | None = None
    lora_rows: tuple[torch.Tensor, torch.Tensor] | None = None
    folded: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded is not None:
            return F.linear(x, *self.folded)
        rows = self.road_rows
        if self.lora_rows is None:
            if rows is None:
                return F.linear(x, self.weight, self.bias)
            k = _fused(x, rows[0])
            if k is not None:
                return k.road_linear(x, self.weight, self.bias, *rows)
            return rotate(F.linear(x, self.weight, self.bias), rows)
        y = F.linear(x, self.weight, self.bias) + row_update(x, self.lora_rows)
        if rows is None:
            return y
        k = _fused(y, rows[0])
        return k.road_(y, *rows) if k is not None else rotate(y, rows)


def _fused(t: torch.Tensor, table: torch.Tensor):
    """The built kernel where it may run on ``t`` with ``table``: both float32 on the CPU, and no gradient
    recorded (it knows no autograd). ``None``: the eager path."""
    k = kernel.FUSED
    if k is not None and t.dtype == table.dtype == torch.float32 and t.device.type == "cpu" \
            and not torch.is_grad_enabled():
        return k
    return None


def rotate(y: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The eager RoAd update of ``y`` ``(batch, ..., out)`` by per-row (or shared: batch 1) tables ``(C, S)``."""
    c, s = rows
    shape = y.shape
    y5 = y.view(shape[0], -1, c.shape[2], 2, c.shape[4])
    return torch.addcmul(y5 * c, y5.flip(3), s).view(shape)


def fold(weight: torch.Tensor, bias: torch.Tensor | None, cs: tuple[torch.Tensor, torch.Tensor]
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(R·W, R·b)``: a layer's weight and bias with the RoAd rotation ``cs`` merged in (new tensors).

    ``F.linear(x, R·W, R·b)`` equals the RoAd update of ``F.linear(x, W, b)`` up to float rounding (the
    products are summed in another order); it is exact as math, which is why PEFT merges RoAd the same way.
    """
    c, s = full_tables(cs)
    k = _fused(weight, c)
    if k is not None:
        w = k.fold_rows(weight.detach().contiguous(), c.contiguous(), s.contiguous())
    else:
        w = _fold_eager(weight.detach(), c.to(weight), s.to(weight))
    b = None if bias is None else _fold_eager(bias.detach()[:, None], c.to(bias), s.to(bias))[:, 0]
    return w, b


def _fold_eager(w: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    w4 = w.reshape(c.shape[0], 2, c.shape[2], -1)
    return torch.addcmul(w4 * c[..., None], w4.flip(1), s[..., None]).reshape(w.shape)


def install(linears: Iterable[nn.Linear]) -> None:
    """Swap plain ``nn.Linear`` layers to :class:`RowRoadLinear` (idempotent)."""
    for layer in linears:
        if type(layer) is nn.Linear:
            layer.__class__ = RowRoadLinear
            layer.road_rows = None
            layer.lora_rows = None
            layer.folded = None


def uninstall(linears: Iterable[nn.Linear]) -> None:
    """Undo :func:`install`."""
    for layer in linears:
        if type(layer) is RowRoadLinear:
            layer.__dict__.pop("road_rows", None)
            layer.__dict__.pop("lora_rows", None)
            layer.__dict__.pop("folded", None)
            layer.__class__ = nn.Linear


def batch_tables(row_tables: list[Tables | None]
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Stack each row's tables into per-layer ``(B, 1, groups, 2, h)`` tensors (identity for other rows), or
    ``(1, 1, groups, 2, h)`` when every row carries the same tables (broadcast).

    Distinct mixes are stacked once (row 0 = identity) and gathered by a row index, so the work is per
    distinct mix, not per row. Layers no row adapts are absent, and run as the plain base layer.

    Raises:
        MixError: rows adapt one layer with different group sizes (their pairings differ).
    """
    distinct, idx = distinct_rows(row_tables)
    # Every row the same mix: one table row, broadcast over the batch (no per-row copies).
    pick = idx[:1] if len(idx) and bool((idx == idx[0]).all()) else idx
    modules = sorted({m for t in distinct for m in t})
    out = {}
    for m in modules:
        have = [i for i, t in enumerate(distinct) if m in t]
        tables = aligned([distinct[i][m] for i in have])
        if tables is None:
            shapes = {full_tables(distinct[i][m])[0].shape for i in have}
            raise MixError(
                f"Rows of this batch adapt '{m}' with different group sizes ({sorted(s[2] * 2 for s in shapes)}); "
                "serve them in separate batches or retrain with one group size.", module=m)
        full = dict(zip(have, tables))
        shape = tables[0][0].shape
        ident_c, ident_s = torch.ones(shape), torch.zeros(shape)
        cs = torch.stack([ident_c] + [full[i][0] if i in full else ident_c for i in range(len(distinct))])
        ss = torch.stack([ident_s] + [full[i][1] if i in full else ident_s for i in range(len(distinct))])
        out[m] = (cs.index_select(0, pick).unsqueeze(1), ss.index_select(0, pick).unsqueeze(1))
    return out
