"""Subspaces of a RoAd adapter's 2D pairs: which pairs an adapter may train, and which it actually uses.

A RoAd layer of width ``w`` and group size ``g`` rotates ``w/2`` pairs: in group ``k`` element ``j`` is paired
with ``j + g/2`` (``j < g/2``). Pair ``p = k·g/2 + j`` is the unit of a subspace; the variants store it as::

    road_1   one (θ, α) per pair:        index  p
    road_2   one (θ, α) per element:     indices k·g + j  and  k·g + j + g/2
    road_4   two (θ, α) per element:     indices of road_2 in both halves of (groups, 2, g)

A share of the pairs is chosen per module, deterministically:

- ``slot=(k, n)``: pairs are shuffled with ``seed`` (per module) and dealt round-robin into ``n`` slots; slot ``k``
  takes every n-th. Slots of one seed are disjoint and together cover every pair.
- ``share=f``: the first ``f`` of the seeded shuffle (random subspaces, as in ROSA); two seeds overlap by chance.

Pairs outside the share stay exactly at the identity (θ = 0, α = 1), so the adapter is a plain PEFT folder.
:func:`active_pairs` reads back which pairs an adapter moves, :func:`active_share` how many, and :func:`overlap`
how much two adapters' active pairs overlap (``hub show``, ``hub diff``, the app's heat map).
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ComposerError
from .kinds.road import RoadAdapter
from .road_math import layer_width


class SubspaceError(ComposerError, ValueError):
    """A subspace specification that cannot be met (slot out of range, share outside (0, 1], ...)."""


@dataclass(frozen=True)
class Subspace:
    """Which share of each layer's pairs an adapter trains.

    Attributes:
        seed: seeds the per-module shuffle of the pairs.
        slot: ``(k, n)``: slot ``k`` of ``n`` disjoint slots, or ``None``.
        share: the fraction of pairs when ``slot`` is ``None``.
    """

    seed: int = 0
    slot: tuple[int, int] | None = None
    share: float | None = None

    def __post_init__(self) -> None:
        if self.slot is not None:
            k, n = self.slot
            if not (isinstance(k, int) and isinstance(n, int)) or n < 1 or not 0 <= k < n:
                raise SubspaceError(f"slot must be (k, n) with 0 <= k < n, got {self.slot!r}; e.g. slot=(0, 4).")
            if self.share is not None:
                raise SubspaceError("Give a slot or a share, not both.")
        elif self.share is None or not 0 < float(self.share) <= 1:
            raise SubspaceError(f"share must be in (0, 1], got {self.share!r}; or give slot=(k, n).")

    @classmethod
    def parse(cls, text: str, seed: int = 0) -> Subspace:
        """``"k/n"`` (slot k of n) or a fraction like ``"0.25"``."""
        text = text.strip()
        try:
            if "/" in text:
                k, n = text.split("/", 1)
                return cls(seed=seed, slot=(int(k), int(n)))
            return cls(seed=seed, share=float(text))
        except ValueError as e:
            if isinstance(e, SubspaceError):
                raise
            raise SubspaceError(f"Cannot read subspace {text!r}: write 'k/n' for slot k of n (e.g. '0/4'), "
                                "or a share such as '0.5'.") from e

    def pairs(self, module: str, num_pairs: int) -> torch.Tensor:
        """Boolean mask over the module's ``num_pairs`` pairs: ``True`` where the adapter may train."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(module.encode())) % (2**63))
        perm = torch.randperm(num_pairs, generator=g)
        mask = torch.zeros(num_pairs, dtype=torch.bool)
        if self.slot is not None:
            k, n = self.slot
            mask[perm[k::n]] = True
        else:
            mask[perm[: max(1, round(float(self.share) * num_pairs))]] = True
        return mask

    def record(self, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
        """What a card's training record keeps: the spec and a digest of the masks actually used."""
        h = hashlib.sha256()
        for m in sorted(masks):
            h.update(m.encode() + b"\0" + masks[m].to(torch.uint8).numpy().tobytes())
        total = sum(int(v.numel()) for v in masks.values())
        on = sum(int(v.sum()) for v in masks.values())
        return {"seed": self.seed, "slot": list(self.slot) if self.slot else None, "share": self.share,
                "active_fraction": on / total if total else 0.0, "mask_sha256": h.hexdigest()}


def param_mask(variant: str, group_size: int, pair_mask: torch.Tensor) -> torch.Tensor:
    """Expand a per-pair mask to the layout of ``road_theta`` / ``road_alpha`` for ``variant``."""
    half = group_size // 2
    per_group = pair_mask.reshape(-1, half)
    if variant == "road_1":
        return pair_mask.clone()
    elem = torch.cat([per_group, per_group], dim=1).flatten()  # element j and j + g/2 of each group
    if variant == "road_2":
        return elem
    if variant == "road_4":
        g = elem.reshape(-1, 1, group_size)
        return torch.cat([g, g], dim=1).flatten()
    raise SubspaceError(f"unknown RoAd variant {variant!r}; expected road_1, road_2 or road_4")


def num_pairs(variant: str, numel: int) -> int:
    """Number of 2D pairs (half the layer's width) in a layer whose θ tensor has ``numel`` entries."""
    width = layer_width(variant, numel)
    if width is None:
        raise SubspaceError(f"A {variant} tensor of {numel} values fits no layer width.")
    return width // 2


def active_pairs(adapter: RoadAdapter) -> dict[str, torch.Tensor]:
    """Per module, a boolean mask of the pairs the adapter moves away from the identity (θ ≠ 0 or α ≠ 1)."""
    out = {}
    for m in adapter.theta:
        moved = (adapter.theta[m] != 0) | (adapter.alpha[m] != 1)
        g = adapter.group_size
        if adapter.variant == "road_1":
            out[m] = moved
        elif adapter.variant == "road_2":
            e = moved.reshape(-1, 2, g // 2)
            out[m] = (e[:, 0] | e[:, 1]).flatten()
        else:
            e = moved.reshape(-1, 2, 2, g // 2)
            out[m] = (e[:, 0, 0] | e[:, 0, 1] | e[:, 1, 0] | e[:, 1, 1]).flatten()
    return out


def overlap(a: RoadAdapter, b: RoadAdapter) -> dict[str, Any]:
    """How much two RoAd adapters' active pairs overlap, over the modules both adapt.

    Returns:
        ``{"active_a", "active_b"}`` (fractions of pairs each moves), ``"shared"`` (pairs both move),
        ``"overlap"`` (shared / the smaller active set; 0 means disjoint subspaces), and ``"modules"``.
    """
    pa, pb = active_pairs(a), active_pairs(b)
    common = sorted(set(pa) & set(pb))
    total = sum(int(pa[m].numel()) for m in common)
    na = sum(int(pa[m].sum()) for m in common)
    nb = sum(int(pb[m].sum()) for m in common)
    shared = sum(int((pa[m] & pb[m]).sum()) for m in common if pa[m].shape == pb[m].shape)
    smaller = min(na, nb)
    return {"modules": len(common), "pairs": total,
            "active_a": na / total if total else 0.0, "active_b": nb / total if total else 0.0,
            "shared": shared, "overlap": shared / smaller if smaller else 0.0}


def active_share(adapter: RoadAdapter) -> dict[str, Any]:
    """How many of the adapter's 2D pairs move away from the identity: ``{"active", "pairs", "fraction"}``
    (``hub show``; a subspace-trained adapter moves about its share, a plainly trained one nearly all)."""
    masks = active_pairs(adapter)
    total = sum(int(v.numel()) for v in masks.values())
    on = sum(int(v.sum()) for v in masks.values())
    return {"active": on, "pairs": total, "fraction": on / total if total else 0.0}
