"""Helpers every kind's arithmetic shares: how an input is named in a recipe, the recipe's pinned inputs, the
overflow check of a result, and the check that task vectors share their origin. :mod:`composer.ops` dispatches;
each kind (:mod:`composer.kinds`) computes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import IncompatibleAdaptersError, InvalidValueError
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


def check_same_origin(a: torch.Tensor, b: torch.Tensor, names: str, what: str, fix: str) -> None:
    """Refuse two task vectors taken from different origins: ``a + b`` would keep one origin and carry the other
    adapter's τ away from where it was learned, and the result would depend on the order of the inputs."""
    if a.shape == b.shape and torch.equal(a.double(), b.double()):
        return
    diff = (a.double() - b.double()).abs()
    i = int(diff.argmax())
    raise IncompatibleAdaptersError(
        f"{names} were trained from different origins ({what}; they differ by up to {float(diff.max()):.3g}, at "
        f"index {i}): task vectors from different starting points do not add. To combine them, {fix}.",
        field="origin", left=float(a.double().flatten()[i]), right=float(b.double().flatten()[i]),
        tensor="init")
