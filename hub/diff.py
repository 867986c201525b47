"""Compare two adapters as task vectors: per-module norm of the difference and cosine similarity.

RoAd adapters are compared on their generator (θ, log α) — the vector the arithmetic acts on —, LoRAs on each
module's ΔW = s·B·A (so two factorisations of one update are identical), and prompt vectors on τ (or on the
prompt itself when no init was recorded). For RoAd adapters the result also says how
much their active 2D pairs overlap (:func:`composer.subspace.overlap`): adapters trained in disjoint subspaces
share none.
"""

from __future__ import annotations

from typing import Any

import torch

from composer import Adapter, IncompatibleAdaptersError, kinds
from composer.adapters import cosine as _cos


def diff(a: Adapter, b: Adapter) -> dict[str, Any]:
    """Per-module ``diff_norm`` (‖τ_a − τ_b‖) and ``cosine`` (cos(τ_a, τ_b)), plus the totals and
    ``identical`` (the task vectors are equal). The cosine is ``None`` where a vector is zero. RoAd adapters
    also get ``active_pairs``: :func:`composer.subspace.overlap` of the two (shares, shared pairs, overlap).

    Raises:
        IncompatibleAdaptersError: different kinds, modules or shapes.
    """
    for x in (a, b):
        kinds.of(x)  # a recipe of parts: refused with the reason (it has no one task vector)
    if a.kind != b.kind:
        raise IncompatibleAdaptersError(f"Cannot compare a {a.kind} adapter with a {b.kind} adapter.",
                                        field="kind", left=a.kind, right=b.kind)
    va, vb = a.task_vectors(), b.task_vectors()
    if set(va) != set(vb):
        only = sorted(set(va) ^ set(vb))
        raise IncompatibleAdaptersError(f"The adapters adapt different modules (first difference: '{only[0]}').",
                                        field="modules", left=sorted(va), right=sorted(vb))
    modules = {}
    for m in va:
        if va[m].shape != vb[m].shape:
            raise IncompatibleAdaptersError(
                f"Module '{m}' has {va[m].numel()} values in one adapter and {vb[m].numel()} in the other.",
                field="shape", left=tuple(va[m].shape), right=tuple(vb[m].shape), tensor=m)
        modules[m] = {"diff_norm": float((va[m] - vb[m]).norm()), "cosine": _cos(va[m], vb[m])}
    fa = torch.cat([va[m] for m in va]) if va else torch.zeros(0, dtype=torch.float64)
    fb = torch.cat([vb[m] for m in va]) if vb else torch.zeros(0, dtype=torch.float64)
    total = float((fa - fb).norm())
    out = {"kind": a.kind, "a": a.source, "b": b.source, "identical": total == 0.0, "diff_norm": total,
           "cosine": _cos(fa, fb), "modules": modules}
    if kinds.of(a).subspaces:  # same kind: checked above
        from composer.subspace import overlap

        out["active_pairs"] = overlap(a, b)
    return out
