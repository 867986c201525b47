"""Pure tensor functions for RoAd's 2x2 blocks (no adapter objects here).

PEFT's RoAd splits a layer output of width ``w`` into groups of ``g`` and pairs element ``j`` with
``j + g/2`` inside each group. With per-element columns ``f`` (first) and ``s`` (second), the pair
``(x1, x2)`` maps to ``(x1·f1 − x2·s1, x1·s2 + x2·f2)``: the block ``[[f1, −s1], [s2, f2]]``.

- road_1: ``f = α·cosθ``, ``s = α·sinθ`` with one (θ, α) per pair: multiplication by ``α·e^{iθ}``.
- road_2: one (θ, α) per element: each row of the block is its own scaled rotation.
- road_4: two (θ, α) per element (one for ``f``, one for ``s``): any 2x2 block.

Blocks are returned as a tensor of shape ``(groups, g/2, 2, 2)``.

The size of a variant's tensors for a layer width (:func:`num_values`, :func:`layer_width`) is
:mod:`composer.road_sizes`' (plain integers, re-exported here). This module owns the generator
``(θ, log α)`` that the arithmetic, ``hub diff`` and the app's plots all act on (:func:`generator`).
"""

from __future__ import annotations

import math

import torch

from .errors import InvalidArgumentError
from .road_sizes import VARIANTS, Variant, layer_width, num_values  # noqa: F401 - the size rule's owner

_ORDER = {"road_1": 1, "road_2": 2, "road_4": 4}


def generator(theta: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The generator ``(θ, log α)`` in float64, with a negative α written as ``(θ + π, |α|)``.

    ``-α·R(θ) = α·R(θ + π)`` for every variant's block rows, so this is the same block, and
    ``generator(identity) = (0, 0)``. A zero α has no logarithm: its log is ``-inf`` (callers that need
    finite values check first).
    """
    theta = theta.double()
    alpha = alpha.double()
    neg = alpha < 0
    if bool(neg.any()):
        theta = torch.where(neg, theta + math.pi, theta)
        alpha = alpha.abs()
    return theta, alpha.log()


def columns(variant: str, g: int, theta: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element first and second columns ``(f, s)`` of width ``w`` (PEFT's ``_prepare_cols``)."""
    if variant == "road_1":
        theta = theta.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_4":
        th = theta.reshape(-1, 2, g)
        al = alpha.reshape(-1, 2, g)
        return (al[:, 0] * th[:, 0].cos()).flatten(), (al[:, 1] * th[:, 1].sin()).flatten()
    raise InvalidArgumentError(f"Unknown RoAd variant {variant!r}; expected one of {', '.join(VARIANTS)}.",
                               name="variant", value=variant)


def blocks(variant: str, g: int, theta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The 2x2 blocks, shape ``(groups, g/2, 2, 2)``, computed in float64."""
    f, s = columns(variant, g, theta.double(), alpha.double())
    f = f.reshape(-1, 2, g // 2)
    s = s.reshape(-1, 2, g // 2)
    row1 = torch.stack([f[:, 0], -s[:, 0]], dim=-1)
    row2 = torch.stack([s[:, 1], f[:, 1]], dim=-1)
    return torch.stack([row1, row2], dim=-2)


def road4_from_blocks(m: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """road_4 ``(theta, alpha)`` that realise blocks ``m`` exactly (up to float rounding).

    Each column entry pair ``(f, s)`` is written in polar form ``r·(cosφ, sinφ)`` with the same (φ, r) for
    both of the element's column parameters, so identity blocks give θ = 0, α = 1.
    """
    groups, half = m.shape[0], m.shape[1]
    f = torch.stack([m[..., 0, 0], m[..., 1, 1]], dim=1).reshape(groups, 2 * half)
    s = torch.stack([-m[..., 0, 1], m[..., 1, 0]], dim=1).reshape(groups, 2 * half)
    r = torch.hypot(f, s)
    phi = torch.atan2(s, f)
    theta = torch.stack([phi, phi], dim=1).reshape(-1)
    alpha = torch.stack([r, r], dim=1).reshape(-1)
    return theta.to(dtype), alpha.to(dtype)


def promote(variant: str, g: int, theta: torch.Tensor, alpha: torch.Tensor,
            to: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite parameters of ``variant`` as the wider variant ``to`` with identical blocks (exact)."""
    if _ORDER[to] < _ORDER[variant]:
        raise InvalidArgumentError(f"Cannot demote {variant} to {to}: only road_1 -> road_2 -> road_4 is exact.",
                                   name="to", value=to)
    if variant == to:
        return theta, alpha
    if variant == "road_1":
        theta = theta.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, g // 2).repeat_interleave(2, dim=0).flatten()
        variant = "road_2"
        if to == "road_2":
            return theta, alpha
    # road_2 -> road_4: the same (θ, α) for the first and second column of each element.
    th = theta.reshape(-1, 1, g).expand(-1, 2, g).reshape(-1)
    al = alpha.reshape(-1, 1, g).expand(-1, 2, g).reshape(-1)
    return th.contiguous(), al.contiguous()


def block_power(m: torch.Tensor, p: float) -> torch.Tensor:
    """``m**p`` for a batch of real 2x2 blocks (principal branch; real part for near-real results)."""
    if float(p).is_integer():
        return torch.linalg.matrix_power(m, int(p))
    w, v = torch.linalg.eig(m)
    wp = w ** p
    out = v @ torch.diag_embed(wp) @ torch.linalg.inv(v)
    return out.real


def sequential_product(mats: list[torch.Tensor]) -> torch.Tensor:
    """The blocks of applying ``mats[0]`` first, then ``mats[1]``, ...: ``mats[-1] @ ... @ mats[0]``."""
    out = mats[0]
    for m in mats[1:]:
        out = m @ out
    return out


def relative_deviation(approx: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    """``‖approx − exact‖_F / ‖exact‖_F`` over all blocks of all modules."""
    num = sum(float(((a - e) ** 2).sum()) for a, e in zip(approx, exact))
    den = sum(float((e ** 2).sum()) for e in exact)
    return (num / den) ** 0.5 if den > 0 else float("nan")
