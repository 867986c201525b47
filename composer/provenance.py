"""What every adapter carries whatever its kind: the :class:`Recipe` of a composed adapter, its provenance
(:class:`Provenance`: base model, exactness) and the finiteness check.

The adapter classes themselves live with their kind (:mod:`composer.kinds`); :mod:`composer.adapters` gathers
them for callers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import InvalidValueError

if TYPE_CHECKING:  # torch is imported where a tensor is checked: a recipe is plain JSON (composer.precheck)
    import torch

LIBRARY_VERSION = "0.1.0"


@dataclass(frozen=True)
class Recipe:
    """How a composed adapter was made, enough to rebuild it bit for bit.

    Attributes:
        expression: the expression text, e.g. ``"0.7*alice/math@v2 + 0.3*bob/code"``.
        inputs: one dict per input, ``{"name": ..., "ref": ...}``; ``ref`` pins the input
            (``namespace/name@<commit sha>`` for store ids, a folder path otherwise).
        weights: one weight per input (empty when the method has none, e.g. ``compose``).
        method: ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``interpolate``,
            ``compose``, ``negate``, ``scale`` ...
        params: method parameters (``density``, ``seed``, ``t`` ...).
        exact: whether the result equals the exact composition of its inputs.
        deviation: relative deviation from the exact composition, when approximate and measurable.
    """

    expression: str
    inputs: tuple[dict, ...] = ()
    weights: tuple[float, ...] = ()
    method: str = "task_arithmetic"
    params: dict = field(default_factory=dict)
    exact: bool = True
    deviation: float | None = None
    library_version: str = LIBRARY_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "expression": self.expression,
            "inputs": [dict(i) for i in self.inputs],
            "weights": list(self.weights),
            "method": self.method,
            "params": dict(self.params),
            "exact": self.exact,
            "deviation": self.deviation,
            "library": "adapter-hub-composer",
            "library_version": self.library_version,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        """Read a recipe, checking every field's type (a recipe comes from a folder anyone may have written).

        Raises:
            TypeError / ValueError: naming the field and what it must be.
        """
        if not isinstance(d, dict):
            raise TypeError(f"a recipe is a JSON object, got {type(d).__name__}")
        inputs = _field(d, "inputs", list, [])
        for i, item in enumerate(inputs):
            if not isinstance(item, dict) or set(item) - {"name", "ref"} or \
                    not all(isinstance(v, str) for v in item.values()):
                raise TypeError(f"'inputs'[{i}] must be an object with string 'name' and 'ref', got {item!r:.80}")
        weights = _field(d, "weights", list, [])
        for w in weights:
            _finite(w, "weights")
        params = _field(d, "params", dict, {})
        budget = [_MAX_PARAM_VALUES]
        for k, v in params.items():
            _plain(v, f"params.{k}", 0, budget)
        deviation = d.get("deviation")
        if deviation is not None:
            _finite(deviation, "deviation")
        return cls(
            expression=_field(d, "expression", str, ""),
            inputs=tuple(dict(i) for i in inputs),
            weights=tuple(float(w) for w in weights),
            method=_field(d, "method", str, "task_arithmetic"),
            params=dict(params),
            exact=_field(d, "exact", bool, True),
            deviation=None if deviation is None else float(deviation),
            library_version=_field(d, "library_version", str, LIBRARY_VERSION),
        )


_JSON_TYPE = {str: "a string", list: "a list", dict: "an object", bool: "true or false"}


def _field(d: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = d.get(key, default)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise TypeError(f"'{key}' must be {_JSON_TYPE[kind]}, got {type(value).__name__} {value!r:.60}")
    return value


_MAX_PARAM_VALUES = 100_000  # a fitted mix records a few dozen to a few thousand coefficients
_MAX_PARAM_DEPTH = 3         # e.g. params.coefficients.<group>[i]


def _plain(value: Any, key: str, depth: int, budget: list[int]) -> None:
    """A recipe parameter: null, a string, true/false, a finite number, or (nested a little, as a fit's
    coefficients and losses are) lists and objects of those."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"'params' holds more than {_MAX_PARAM_VALUES} values; a recipe records settings, not data")
    if value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, (list, dict)):
        if depth >= _MAX_PARAM_DEPTH:
            raise TypeError(f"'{key}' nests deeper than {_MAX_PARAM_DEPTH} levels")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            if isinstance(value, dict) and not isinstance(k, str):
                raise TypeError(f"'{key}' must have string keys")
            _plain(v, f"{key}.{k}", depth + 1, budget)
        return
    _finite(value, key)


def _finite(value: Any, key: str) -> float:
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
    except OverflowError:  # a JSON integer with hundreds of digits
        ok = False
    if not ok:
        raise ValueError(f"'{key}' must hold finite numbers, got {str(value)[:60]}")
    return float(value)


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise :class:`InvalidValueError` naming ``name`` and the first bad index if ``t`` has NaN/inf."""
    import torch

    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        value = float(t.flatten()[idx])
        raise InvalidValueError(
            f"Tensor '{name}' holds a non-finite value ({value}) at flat index {idx}. "
            "Adapters must be finite; retrain or re-export it.",
            tensor=name, index=idx, value=value,
        )


class Provenance:
    """What every adapter class says of its origin, from its ``config`` and ``recipe`` fields."""

    config: dict[str, Any]
    recipe: Recipe | None

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def exact(self) -> bool:
        return self.recipe is None or self.recipe.exact

    @property
    def deviation(self) -> float | None:
        """Relative deviation from the exact composition (``None`` when exact or unmeasurable)."""
        return None if self.recipe is None else self.recipe.deviation

