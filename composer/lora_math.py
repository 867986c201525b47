"""Pure tensor functions for LoRA's low-rank weight updates (no adapter objects here).

PEFT's LoRA adds to an ``nn.Linear`` with weight ``W`` (``out × in``) the update::

    ΔW = s · B · A        A: lora_A.weight (r × in), B: lora_B.weight (out × r)
    s  = lora_alpha / r   (or lora_alpha / √r with use_rslora)

A weighted sum ``Σ wᵢ·sᵢ·Bᵢ·Aᵢ`` is itself a product of two matrices, *exactly*: stack the ``Aᵢ`` as rows and
the ``wᵢ·sᵢ·Bᵢ`` as columns (:func:`concat`). The rank grows to ``Σ rᵢ``; :func:`truncate` brings it down with
a truncated SVD, computed on the small ``r × r`` core (two QR factorisations), and reports the relative
Frobenius error it makes. Never scale both ``A`` and ``B``: ``(√w·B)(√w·A) = w·BA`` only for ``w ≥ 0``, and a
sum of such products is not the product of sums. PEFT's own ``add_weighted_adapter`` does exactly that in its
non-SVD modes, which is why its results are approximate.

This module also owns the rule for a module's rank and scale in a PEFT config (:func:`rank_and_scale`,
PEFT's ``rank_pattern`` / ``alpha_pattern`` / ``use_rslora``) and the table of LoRA variants whose effect is not
``ΔW = s·B·A`` (:data:`NOT_LOW_RANK`), which the arithmetic refuses rather than combining wrongly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

# PEFT config fields that make a LoRA's effect something other than the plain ΔW = s·B·A, with the reason.
# A field counts when it is set (not None / False / empty / "none"). Stored and served; refused by arithmetic.
NOT_LOW_RANK: dict[str, str] = {
    "use_dora": "DoRA rescales every column of W + ΔW by a learned magnitude, so its effect is not the low-rank "
                "ΔW = s·B·A and a sum of DoRA adapters is not the sum of their effects",
    "lora_bias": "LoRA bias adds a trained bias vector to lora_B, which ΔW = s·B·A does not hold",
    "bias": "bias='all'/'lora_only' trains the base layers' biases, which ΔW = s·B·A does not hold",
    "use_qalora": "QALoRA pools the layer's inputs before lora_A, so ΔW is not s·B·A on the full input",
    "alora_invocation_tokens": "an activated LoRA (aLoRA) changes only tokens after its invocation sequence",
    "kasa_config": "KaSA adds a learned diagonal between B and A and changes the base weight",
    "use_bdlora": "block-diagonal LoRA shares factors across devices",
    "arrow_config": "Arrow routes between several LoRA experts per token",
    "monteclora_config": "MonteCLoRA samples its factors",
    "velora_config": "VeLoRA compresses activations in a way that is not ΔW = s·B·A",
    "layer_replication": "layer replication changes the base model's layers",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 style Conv1D weights) transposes ΔW; only nn.Linear layers are handled",
}


def not_low_rank(config: Mapping[str, Any]) -> str | None:
    """The first reason ``config`` is not a plain ``ΔW = s·B·A`` LoRA, as ``"field: reason"``, or ``None``."""
    for key, why in NOT_LOW_RANK.items():
        value = config.get(key)
        if value is None or value is False or value in ("none", "") or value == {} or value == []:
            continue
        return f"{key}={value!r:.40}: {why}"
    return None


def rank_and_scale(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """The rank ``r`` and scale ``s`` PEFT gives ``module`` under ``config`` (``rank_pattern``,
    ``alpha_pattern``, ``use_rslora``), with PEFT's own pattern matching (``peft.utils.other.get_pattern_key``)."""
    from peft.utils.other import get_pattern_key

    rp = config.get("rank_pattern") or {}
    ap = config.get("alpha_pattern") or {}
    r = rp.get(get_pattern_key(list(rp), module), config.get("r", 8))
    alpha = ap.get(get_pattern_key(list(ap), module), config.get("lora_alpha", 8))
    return int(r), scale(int(r), float(alpha), bool(config.get("use_rslora", False)))


def scale(r: int, alpha: float, rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / √r`` for rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def delta(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """``ΔW = s·B·A`` in float64, shape ``(out, in)``."""
    return (b.double() @ a.double()) * s


def concat(parts: Sequence[tuple[torch.Tensor, torch.Tensor, float]], dtype: torch.dtype = torch.float32
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B·A = Σ cᵢ·Bᵢ·Aᵢ`` exactly (up to one rounding of ``cᵢ·Bᵢ``), for parts ``(Aᵢ, Bᵢ, cᵢ)``.

    The coefficient goes into the ``B`` block only, so negative coefficients are exact too.
    """
    a = torch.cat([p[0].double() for p in parts], 0)
    b = torch.cat([p[1].double() * float(p[2]) for p in parts], 1)
    return a.to(dtype), b.to(dtype)


def pad_rank(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of ``A`` and zero columns of ``B`` up to rank ``r``: ``B·A`` is unchanged, bit for bit."""
    extra = r - a.shape[0]
    if extra <= 0:
        return a, b
    return (torch.cat([a, a.new_zeros(extra, a.shape[1])], 0), torch.cat([b, b.new_zeros(b.shape[0], extra)], 1))


def _split(u: torch.Tensor, sv: torch.Tensor, vh: torch.Tensor, k: int, dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Keep the top ``k`` singular triplets as ``B = U·√S``, ``A = √S·Vᴴ``; return the relative error."""
    root = sv[:k].sqrt()
    b = u[:, :k] * root
    a = root[:, None] * vh[:k]
    total = float(sv.square().sum())
    err = math.sqrt(float(sv[k:].square().sum()) / total) if total > 0 else 0.0
    return a.to(dtype), b.to(dtype), err


def truncate(a: torch.Tensor, b: torch.Tensor, rank: int, s: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factors ``(A', B')`` of rank ``≤ rank`` with ``B'·A'`` the best approximation of ``s·B·A`` (Eckart–Young),
    and the relative Frobenius error ``‖s·BA − B'A'‖ / ‖s·BA‖`` (0 when nothing is cut, or ΔW is 0).

    Computed from QR factorisations of ``B`` and ``Aᵀ`` and the SVD of their ``r × r`` core, never forming
    ``ΔW``. At ``rank ≥ r`` the result equals ``s·B·A`` up to float rounding.
    """
    qb, rb = torch.linalg.qr(b.double() * s)
    qa, ra = torch.linalg.qr(a.double().T)
    u, sv, vh = torch.linalg.svd(rb @ ra.T)
    k = max(0, min(int(rank), sv.numel()))
    a2, b2, err = _split(qb @ u, sv, vh @ qa.T, k, a.dtype)
    return a2, b2, err


def factor(dw: torch.Tensor, rank: int, dtype: torch.dtype = torch.float32
           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``rank`` factors ``(A, B)`` of a dense ``ΔW`` by truncated SVD, and the relative error."""
    u, sv, vh = torch.linalg.svd(dw.double(), full_matrices=False)
    k = max(0, min(int(rank), sv.numel()))
    return _split(u, sv, vh, k, dtype)
