"""Task arithmetic on adapters: add, sub, negate, scale, interpolate, merge, compose, compress.

Each function checks compatibility, then hands the computation to the inputs' kind (:mod:`composer.kinds`):
RoAd works on generators ``(θ, log α)`` (exact for road_1; road_2/road_4 are labelled approximate with their
deviation, and :func:`compose` is the exact product), LoRA on ``ΔW = s·B·A`` by rank concatenation (exact;
:func:`compress` truncates by SVD and says how much it cut), prompt vectors on τ = P − P₀. A kind that does not
support an operation refuses it with the reason.

Every function returns a new adapter carrying its :class:`Recipe`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import replace

from . import kinds, merge_methods
from .adapters import Adapter, LoraAdapter, Recipe
from .arith import inputs as _inputs
from .arith import label as _label
from .errors import (
    CompatibilityWarning,
    IncompatibleAdaptersError,
    InvalidArgumentError,
    InvalidValueError,
)
from .expr import format_interp, format_merge, format_sum, short_shas

# ---------------------------------------------------------------------------------------------- checks


def check_compatible(adapters: Sequence[Adapter], *, same_variant: bool = True) -> None:
    """Raise :class:`IncompatibleAdaptersError` unless all adapters can be combined.

    Checks, in order: same kind; for RoAd the same variant (unless ``same_variant=False``), group size and the
    tensor shapes where modules are shared (each may adapt modules the others do not: it is the identity there);
    for LoRA a plain ``ΔW = s·B·A`` (no DoRA, LoRA bias, ...) and the same layer shapes where modules are shared
    (each may adapt modules the others do not: their ΔW is 0 there); for prompts the same shape and a recorded
    init. Different ``base_model_name_or_path`` values with matching shapes only warn (:class:`CompatibilityWarning`).
    """
    if not adapters:
        raise InvalidArgumentError("No adapters given; pass at least one.", name="adapters", value=[])
    for a in adapters:
        a.validate()
    first = adapters[0]
    for i, a in enumerate(adapters):
        kinds.of(a).check_usable(a, _label(a, i))
    kind = kinds.of(first)
    for i, other in enumerate(adapters[1:], start=1):
        names = f"{_label(first, 0)!s} and {_label(other, i)!s}"
        if {other.kind, first.kind} == {"lora", "road"}:
            raise IncompatibleAdaptersError(
                f"Cannot combine a {first.kind} adapter with a {other.kind} adapter in arithmetic ({names}): a LoRA "
                "adds ΔW = s·B·A to a layer's weight and RoAd rotates the layer's output, and no single adapter of "
                "either kind equals both. To use both, serve them together as a mix of parts: join the two with ';' "
                f"('{short_shas(f'{_label(first, 0)!s} ; {_label(other, i)!s}')}', which hub compose stores; "
                "mix=[lora, road] in "
                "Python), and the engine applies the LoRA on the weight and the RoAd on the output.",
                field="kind", left=first.kind, right=other.kind)
        if other.kind != first.kind:
            raise IncompatibleAdaptersError(
                f"Cannot combine {_a(first.kind)} adapter with {_a(other.kind)} adapter ({names}); arithmetic combines "
                "adapters of one kind (RoAd with RoAd, LoRA with LoRA, prompt vectors with prompt vectors ...). "
                "Kinds the engine serves together on one row (LoRA, RoAd or IA³, one prompt vector) join with ';' as "
                f"parts instead: '{short_shas(f'{_label(first, 0)!s} ; {_label(other, i)!s}')}'.",
                field="kind", left=first.kind, right=other.kind)
        # Different base models lead whatever else differs: it is the cause, the shapes only its symptom.
        bases = (f"Different base models: {first.base_model!r} ({_label(first, 0)}) vs {other.base_model!r} "
                 f"({_label(other, i)})" if first.base_model != other.base_model else "")
        try:
            kind.check_pair(first, other, names, same_variant=same_variant)
        except IncompatibleAdaptersError as e:
            if not bases:
                raise
            what = str(e)
            what = what[:1].lower() + what[1:] if what[1:2].islower() else what  # "Group sizes" but "LoRA"
            raise IncompatibleAdaptersError(
                f"{bases}, and they do not fit together: {what}",
                field=e.field, left=e.left, right=e.right, tensor=e.tensor) from e  # what differs, as found
        if bases:
            warnings.warn(f"{bases}; the shapes match, so they are combined anyway.", CompatibilityWarning,
                          stacklevel=3)


def _a(kind: str) -> str:
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


# ---------------------------------------------------------------------------------------------- linear


def linear(adapters: Sequence[Adapter], weights: Sequence[float], *, method: str = "task_arithmetic",
           params: dict | None = None, expression: str | None = None, op: str | None = None) -> Adapter:
    """``Σ wᵢ·genᵢ`` (or a merge method) over compatible adapters; the core of every linear operation."""
    check_compatible(adapters)
    weights = [float(w) for w in weights]
    for w in weights:
        if not math.isfinite(w):
            raise InvalidValueError(f"Weight {w} is not finite; weights must be finite numbers.", value=w)
    m = merge_methods.METHODS[method]
    params = m.check_params(params or {})
    labels = [_label(a, i) for i, a in enumerate(adapters)]
    expr = expression or (format_sum(list(zip(weights, labels))) if method == "task_arithmetic"
                          else format_merge(method, list(zip(weights, labels)), params))
    return kinds.of(adapters[0]).linear(adapters, weights, method, params, expr, op)


def compress(a: Adapter, rank: int) -> LoraAdapter:
    """A LoRA of rank at most ``rank`` per module whose ``ΔW`` is the best approximation of ``a``'s (truncated SVD).

    Args:
        a: a plain LoRA adapter (e.g. the rank-concatenated result of :func:`add`).
        rank: the largest rank to keep per module (modules of lower rank keep theirs).

    Returns:
        A plain PEFT LoRA (``lora_alpha = r``). Its recipe's ``params`` hold ``rank`` and ``errors``: per module the
        relative Frobenius error ``‖ΔW − ΔW'‖ / ‖ΔW‖``; ``deviation`` is that error over all modules together and
        ``exact`` is true only when nothing was cut (a rank at or above every module's rank: equal up to float
        rounding).

    Raises:
        NotComposableError: ``a`` is not a plain LoRA; InvalidArgumentError: ``rank`` is not a whole number ≥ 1.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidArgumentError(f"rank must be a whole number of at least 1, got {rank!r}.", name="rank",
                                   value=rank)
    return kinds.of(a).compress(a, rank)


def add(a: Adapter, b: Adapter, *more: Adapter) -> Adapter:
    """``a + b (+ ...)``. For road_1 exactly "apply a, then b"; for prompts ``P₀ + τ_a + τ_b``."""
    adapters = [a, b, *more]
    return linear(adapters, [1.0] * len(adapters))


def sub(a: Adapter, b: Adapter) -> Adapter:
    """``a − b``: ``add(a, negate(b))``."""
    return linear([a, b], [1.0, -1.0])


def negate(a: Adapter) -> Adapter:
    """``−a``: for road_1 the exact inverse (−θ, 1/α); for prompts −τ."""
    return linear([a], [-1.0], expression=format_sum([(-1.0, _label(a, 0))]), op="negate")


def scale(a: Adapter, factor: float) -> Adapter:
    """``factor·a``: (λθ, α^λ) for RoAd, λτ for prompts."""
    return linear([a], [factor], expression=format_sum([(factor, _label(a, 0))]), op="scale")


def interpolate(a: Adapter, b: Adapter, t: float) -> Adapter:
    """The geodesic ``(1 − t)·gen_a + t·gen_b``; ``t = 0`` returns ``a`` and ``t = 1`` returns ``b`` bit for bit.

    For prompts both the origin and τ are interpolated, so the endpoints are the inputs themselves.
    """
    t = float(t)
    if not math.isfinite(t):
        raise InvalidValueError(f"Interpolation parameter t={t} is not finite.", value=t)
    expr = format_interp(_label(a, 0), _label(b, 1), t)
    if t in (0.0, 1.0):
        # Exact endpoints: the geodesic at 0/1 is the input itself; float rounding of exp(log α) would not be.
        check_compatible([a, b])
        recipe = Recipe(expression=expr, inputs=_inputs([a, b]), weights=(1.0 - t, t), method="interpolate",
                        params={"t": t}, exact=True)
        return replace(a if t == 0.0 else b, recipe=recipe, source=None)
    result = linear([a, b], [1.0 - t, t], expression=expr, op="interpolate")
    result = replace(result, recipe=replace(result.recipe, params={"t": t}))  # type: ignore[arg-type]
    return kinds.of(a).interpolated(a, b, t, result)


def merge(adapters: Sequence[Adapter], weights: Sequence[float] | None = None, method: str = "task_arithmetic",
          **params: float | int | None) -> Adapter:
    """Merge task vectors with a named method (``composer.METHODS``).

    Args:
        adapters: one or more compatible adapters.
        weights: one weight per adapter (default 1.0 each).
        method: ``task_arithmetic``, ``ties``, ``dare_linear`` or ``dare_ties``.
        **params: the method's declared parameters (``METHODS[method].params``): ``density`` (fraction kept
            by TIES/DARE, in (0, 1]), ``seed`` (DARE's drop mask, default 0, recorded in the recipe).

    Returns:
        The merged adapter. TIES/DARE are heuristics: their recipe says ``exact=False``.

    Raises:
        InvalidArgumentError: no adapters, an unknown method, a weight count that does not match, a missing
            or out-of-range parameter.
    """
    adapters = list(adapters)
    if not adapters:
        raise InvalidArgumentError("merge needs at least one adapter.", name="adapters", value=[])
    if method not in merge_methods.METHODS:
        raise InvalidArgumentError(f"Unknown merge method {method!r}. Available: "
                                   f"{', '.join(merge_methods.METHODS)}.", name="method", value=method)
    if weights is None:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise InvalidArgumentError(f"{len(adapters)} adapters but {len(weights)} weights; give one weight per "
                                   "adapter.", name="weights", value=list(weights))
    return linear(adapters, list(weights), method=method, params=params)


def compose(a: Adapter, b: Adapter) -> Adapter:
    """Exact sequential application: the adapter equal to applying ``a``, then ``b``.

    road_1 with road_1 stays road_1 (generator addition is exact); any other pair is promoted to road_4 and the
    2x2 blocks are multiplied exactly (``B·A``). Prompt vectors have no sequential product: use :func:`add`.
    """
    kind = kinds.of(a)
    check_compatible([a, b], same_variant=False)
    return kind.compose(a, b, f"compose({_label(a, 0)}, {_label(b, 1)})")  # the grammar's compose(x, y)
