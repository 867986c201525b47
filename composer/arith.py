"""Helpers every kind's arithmetic shares: how an input is named in a recipe, the recipe's pinned inputs, and the
overflow check of a result. :mod:`composer.ops` dispatches; each kind (:mod:`composer.kinds`) computes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import InvalidValueError
from .expr import format_name
from .provenance import check_finite


def label(a: Any, i: int) -> str:
    """How input ``i`` appears in a recipe's expression: its composition in parentheses, or its name."""
    if a.recipe is not None:
        return f"({a.recipe.expression})"
    return format_name(a.source or f"input{i}")


def inputs(adapters: Sequence[Any]) -> tuple[dict, ...]:
    """The recipe's inputs: each input's own inputs when it was composed, else the input itself, once each."""
    seen: dict[str, dict] = {}
    for i, a in enumerate(adapters):
        if a.recipe is not None:
            for inp in a.recipe.inputs:
                seen.setdefault(str(inp.get("ref")), dict(inp))
        else:
            name = label(a, i)
            seen.setdefault(name, {"name": name, "ref": a.source or name})
    return tuple(seen.values())


def check_result(name: str, t: torch.Tensor, alpha: torch.Tensor | None, weights: list[float]) -> None:
    """Finite inputs and finite weights can still overflow (1e300 * a); say so instead of storing inf."""
    try:
        check_finite(name, t)
        if alpha is not None:
            check_finite(f"{name}.road_alpha", alpha)
    except InvalidValueError as e:
        raise InvalidValueError(
            f"The result overflows ({e.tensor} is {e.value}) with weights {weights}; use smaller weights.",
            tensor=e.tensor, index=e.index, value=e.value) from e
