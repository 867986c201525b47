"""RoAd's size rule, in plain integers: the variants, and how many ``(θ, α)`` values a variant keeps for a
layer of a given width (as PEFT's RoAd keeps its size rule per variant in one place).

Torch-free, so that the push's quick check (:mod:`composer.precheck`) reads it without loading torch;
:mod:`composer.road_math` re-exports it with the tensor functions.
"""

from __future__ import annotations

from typing import Literal, get_args

Variant = Literal["road_1", "road_2", "road_4"]
VARIANTS: tuple[str, ...] = get_args(Variant)
# (θ, α) values per output element of the adapted layer: road_1 one per 2D pair, road_2 one per element,
# road_4 two per element (one for each column of the element's 2x2 block).
_PER_ELEMENT: dict[str, tuple[int, int]] = {"road_1": (1, 2), "road_2": (1, 1), "road_4": (2, 1)}


def num_values(variant: str, width: int) -> int:
    """Length of the ``road_theta`` (and ``road_alpha``) tensor of ``variant`` for a layer ``width`` wide."""
    num, den = _PER_ELEMENT[variant]
    return width * num // den


def layer_width(variant: str, n: int) -> int | None:
    """The layer width whose ``variant`` tensors hold ``n`` values, or ``None`` when no width gives ``n``."""
    num, den = _PER_ELEMENT[variant]
    width, rest = divmod(n * den, num)
    return width if rest == 0 and width > 0 else None
