"""Merge methods on task vectors, looked up by name; each declares its own parameters.

Each method takes a list of same-shaped task-vector tensors, a weight per tensor and its parameters, and
returns one tensor. TIES and DARE are PEFT's own, well-kept primitives (``peft.utils.merge_utils``); we only
fix the random state for DARE so a merge is reproducible from its recipe.

The expression parser, :func:`composer.merge`, the CLI and the app's method picker all derive from
:data:`METHODS` (as mergekit's merge methods declare theirs): adding a method is adding one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Param:
    """A merge method's parameter.

    Attributes:
        name: the keyword in expressions and in :func:`composer.merge` (``density``, ``seed``).
        type: ``float`` or ``int``.
        default: the value used when it is left out (``None``: it must be given).
        low, high: the accepted range; ``low_open`` excludes ``low`` itself.
        help: one line for help texts and the app.
    """

    name: str
    type: type
    default: float | int | None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is None

    def check(self, method: str, value: Any) -> float | int:
        """``value`` converted to :attr:`type` (``None``: the default); raises ``ValueError`` when out of range."""
        from .errors import InvalidArgumentError

        if value is None:
            if self.required:
                raise InvalidArgumentError(f"Method {method!r} needs {self.name}= ({self.help}).")
            return self.default  # type: ignore[return-value]
        try:
            v = self.type(value)
        except (TypeError, ValueError, OverflowError):
            raise InvalidArgumentError(f"{self.name} of {method!r} must be a number, got {value!r}.") from None
        if self.type is int and float(value) != v:
            raise InvalidArgumentError(f"{self.name} of {method!r} must be a whole number, got {value!r}.")
        lo_bad = self.low is not None and (v <= self.low if self.low_open else v < self.low)
        hi_bad = self.high is not None and v > self.high
        if lo_bad or hi_bad or v != v:
            lo = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
            hi = "inf)" if self.high is None else f"{self.high:g}]"
            rng = f"{lo}, {hi}"
            raise InvalidArgumentError(f"{self.name} of {method!r} must be in {rng}, got {value!r}.",
                                       name=self.name, value=value)
        return v


DENSITY = Param("density", float, None, 0.0, 1.0, low_open=True, help="fraction of entries kept, in (0, 1]")
SEED = Param("seed", int, 0, 0, 2**63 - 1, help="seed of the random drop mask (recorded in the recipe)")


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: ``fn(tensors, weights, **params)`` and the parameters it declares."""

    name: str
    label: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    summary: str

    @property
    def random(self) -> bool:
        return any(p.name == "seed" for p in self.params)

    @property
    def needs_density(self) -> bool:
        return any(p.name == "density" for p in self.params)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def check_params(self, given: dict[str, Any]) -> dict[str, float | int]:
        """All declared parameters, checked, with defaults filled in; unknown names raise ``ValueError``."""
        from .errors import InvalidArgumentError

        given = {k: v for k, v in given.items() if not (v is None and self.param(k) is None)}
        unknown = sorted(set(given) - {p.name for p in self.params})
        if unknown:
            takes = ", ".join(f"{p.name}=" for p in self.params) or "no parameters"
            raise InvalidArgumentError(f"Method {self.name!r} takes {takes}; got {', '.join(unknown)}.")
        return {p.name: p.check(self.name, given.get(p.name)) for p in self.params}


def _task_arithmetic(ts, w):
    from peft.utils import merge_utils
    return merge_utils.task_arithmetic(ts, w)


def _ties(ts, w, density):
    from peft.utils import merge_utils
    return merge_utils.ties(ts, w, density, majority_sign_method="total")


def _dare_linear(ts, w, density):
    from peft.utils import merge_utils
    return merge_utils.dare_linear(ts, w, density)


def _dare_ties(ts, w, density):
    from peft.utils import merge_utils
    return merge_utils.dare_ties(ts, w, density, majority_sign_method="total")


METHODS: dict[str, MergeMethod] = {
    m.name: m for m in (
        MergeMethod("task_arithmetic", "Task arithmetic", _task_arithmetic, (),
                    "Σ wᵢ·τᵢ (exact for road_1 and prompts)"),
        MergeMethod("ties", "TIES", _ties, (DENSITY,),
                    "trim to the top density by magnitude, elect signs, disjoint mean"),
        MergeMethod("dare_linear", "DARE", _dare_linear, (DENSITY, SEED),
                    "drop with p = 1 − density, rescale, weighted sum"),
        MergeMethod("dare_ties", "DARE + TIES", _dare_ties, (DENSITY, SEED),
                    "DARE drop-and-rescale, then TIES sign election"),
    )
}


def apply(method: str, tensors: list[torch.Tensor], weights: list[float], params: dict[str, Any]) -> torch.Tensor:
    """Run merge ``method`` over ``tensors`` with checked ``params`` (float64 inside, inputs' dtype out)."""
    import torch

    m = METHODS[method]
    dtype = tensors[0].dtype
    w = torch.tensor(weights, dtype=torch.float64)
    ts = [t.double() for t in tensors]
    kwargs = {k: v for k, v in params.items() if k != "seed"}
    if m.random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(params.get("seed", 0)))
            out = m.fn(ts, w, **kwargs)
    else:
        out = m.fn(ts, w, **kwargs)
    return out.to(dtype)
