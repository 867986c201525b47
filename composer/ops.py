"""Task arithmetic on adapters: add, sub, negate, scale, interpolate, merge, compose.

RoAd arithmetic works on each adapter's generator ``(θ, log α)``:

- road_1 blocks are complex numbers ``α·e^{iθ}`` and commute, so a weighted sum of generators is *exactly*
  the product ``Π (αᵢ e^{iθᵢ})^{wᵢ}``: ``add(a, b)`` is "apply a, then b", ``negate`` is the inverse.
- road_2/road_4 blocks do not commute: the same per-element arithmetic is an approximation. The result's
  recipe says so (``exact=False``) and carries ``deviation = ‖approx − exact‖ / ‖exact‖`` against the exact
  product ``A_n^{w_n} ⋯ A_1^{w_1}`` of the blocks. :func:`compose` gives the exact product (as road_4).

Prompt vectors work on τ = P − P₀: the result's prompt is ``P₀ + Σ wᵢ τᵢ`` with P₀ the first input's init.

LoRA arithmetic works on ``ΔW = s·B·A`` (:mod:`composer.lora_math`): a weighted sum concatenates the ranks, with
each input's ``wᵢ·sᵢ`` folded into its ``B`` block, so it is exact; the result is a plain PEFT LoRA with
``lora_alpha = r`` (``s = 1``). :func:`compress` truncates the rank by SVD and reports the error it makes;
TIES/DARE act on the dense ``ΔW`` and are re-factored by SVD (approximate). LoRA variants whose effect is not
``s·B·A`` (DoRA, LoRA bias, ...) and LoRA with RoAd are refused with the reason.

Every function checks compatibility first and returns a new adapter carrying its :class:`Recipe`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import replace

import torch

from . import lora_math, merge_methods, road_math
from .adapters import Adapter, LoraAdapter, PromptVector, Recipe, RoadAdapter, check_finite
from .errors import (
    CompatibilityWarning,
    IncompatibleAdaptersError,
    InvalidArgumentError,
    InvalidValueError,
    NotComposableError,
)
from .expr import format_compress, format_interp, format_merge, format_name, format_sum

# ---------------------------------------------------------------------------------------------- checks


def _label(a: Adapter, i: int) -> str:
    """How input ``i`` appears in a recipe's expression: its composition in parentheses, or its name."""
    if a.recipe is not None:
        return f"({a.recipe.expression})"
    return format_name(a.source or f"input{i}")


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
        if isinstance(a, LoraAdapter) and a.not_low_rank:
            raise NotComposableError(
                f"{_label(a, i)} cannot enter LoRA arithmetic ({a.not_low_rank}). The store keeps and serves it as "
                "it is (hub pull, hub serve, PeftModel.from_pretrained); only plain LoRAs (ΔW = s·B·A) are combined, "
                "exactly.")
    for i, other in enumerate(adapters[1:], start=1):
        names = f"{_label(first, 0)!s} and {_label(other, i)!s}"
        if {other.kind, first.kind} == {"lora", "road"}:
            raise IncompatibleAdaptersError(
                f"Cannot combine a {first.kind} adapter with a {other.kind} adapter in arithmetic ({names}): a LoRA "
                "adds ΔW = s·B·A to a layer's weight and RoAd rotates the layer's output, and no single adapter of "
                "either kind equals both. To use both, serve them together as a mix of parts (the engine applies "
                "the LoRA on the weight and the RoAd on the output: mix=[lora, road]).",
                field="kind", left=first.kind, right=other.kind)
        if other.kind != first.kind:
            raise IncompatibleAdaptersError(
                f"Cannot combine a {first.kind} adapter with a {other.kind} adapter ({names}); "
                "RoAd adapters combine with RoAd adapters, LoRAs with LoRAs and prompt vectors with prompt vectors.",
                field="kind", left=first.kind, right=other.kind)
        bm_note = ""
        if first.base_model != other.base_model:
            bm_note = f" (base models differ: {first.base_model!r} vs {other.base_model!r})"
        if isinstance(first, RoadAdapter):
            assert isinstance(other, RoadAdapter)
            if same_variant and other.variant != first.variant:
                raise IncompatibleAdaptersError(
                    f"Variants differ: {first.variant} vs {other.variant} ({names}). Generator arithmetic needs "
                    "one variant; use composer.compose(a, b) for the exact product (promoted to road_4).",
                    field="variant", left=first.variant, right=other.variant)
            if other.group_size != first.group_size:
                raise IncompatibleAdaptersError(
                    f"Group sizes differ: {first.group_size} vs {other.group_size} ({names}); the 2D pairs "
                    "do not line up, so these adapters cannot be combined.",
                    field="group_size", left=first.group_size, right=other.group_size)
            for m in [m for m in first.theta if m in other.theta]:  # a module only one adapts: identity in the other
                wa, wb = first.width(m), other.width(m)
                if wa != wb or (same_variant and first.theta[m].shape != other.theta[m].shape):
                    lead = (f"{names} were trained on different base models ({first.base_model!r} vs "
                            f"{other.base_model!r}) and do not fit together: " if bm_note else "")
                    raise IncompatibleAdaptersError(
                        f"{lead}Tensor '{m}.road_theta' has shape {tuple(first.theta[m].shape)} vs "
                        f"{tuple(other.theta[m].shape)} (layer width {wa} vs {wb}){'' if lead else bm_note}.",
                        field="shape", left=tuple(first.theta[m].shape), right=tuple(other.theta[m].shape),
                        tensor=f"{m}.road_theta")
        elif isinstance(first, LoraAdapter):
            assert isinstance(other, LoraAdapter)
            for m in first.lora_a:
                if m in other.lora_a and first.shape(m) != other.shape(m):
                    raise IncompatibleAdaptersError(
                        f"Layer '{m}' is {first.shape(m)[0]} x {first.shape(m)[1]} (out x in) in the first adapter and "
                        f"{other.shape(m)[0]} x {other.shape(m)[1]} in the second ({names}){bm_note}: tensor "
                        f"'{m}.lora_B.weight' has shape {tuple(first.lora_b[m].shape)} vs "
                        f"{tuple(other.lora_b[m].shape)}.", field="shape", left=first.shape(m),
                        right=other.shape(m), tensor=f"{m}.lora_B.weight")
        else:
            assert isinstance(other, PromptVector)
            if other.shape != first.shape:
                raise IncompatibleAdaptersError(
                    f"Tensor 'prompt_embeddings' has shape {first.shape} vs {other.shape} "
                    f"(virtual tokens x token_dim){bm_note}.",
                    field="shape", left=first.shape, right=other.shape, tensor="prompt_embeddings")
        if bm_note:
            warnings.warn(
                f"{names} were trained on different base models ({first.base_model!r} vs "
                f"{other.base_model!r}); shapes match, so they are combined anyway.",
                CompatibilityWarning, stacklevel=3)
    if isinstance(first, PromptVector):
        for i, a in enumerate(adapters):
            _require_vector(a, i)


def _require_vector(a: Adapter, i: int) -> None:
    if isinstance(a, PromptVector) and not a.composable:
        raise NotComposableError(
            f"Prompt {_label(a, i)} has no prompt_vector.safetensors (its init P₀ and τ), so it can be chatted "
            "with but not composed. Retrain it with `hub train --kind prompt`, which records the init.")


# ------------------------------------------------------------------------------------------- generators


def _generator(a: RoadAdapter, m: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ, log α) in float64 (:func:`road_math.generator`); a zero α has no logarithm and is refused."""
    alpha = a.alpha[m]
    if bool((alpha == 0).any()):
        idx = int((alpha == 0).nonzero()[0])
        raise InvalidValueError(
            f"Tensor '{m}.road_alpha' is 0 at index {idx}: a zero scale has no logarithm, so it cannot enter "
            "generator arithmetic. Use composer.compose for exact products.",
            tensor=f"{m}.road_alpha", index=idx, value=0.0)
    return road_math.generator(a.theta[m], alpha)


def _road_union(adapters: Sequence[RoadAdapter]) -> list[RoadAdapter]:
    """The adapters over the union of their modules: where one does not adapt a module another does, it gets the
    identity there (θ = 0, α = 1, in its own variant), which is exactly what not adapting it means. Adapters that
    already share their modules come back unchanged; padded ones list the union in ``target_modules``."""
    modules = list(dict.fromkeys(m for a in adapters for m in a.theta))
    if all(len(a.theta) == len(modules) for a in adapters):
        return list(adapters)
    width = {m: a.width(m) for a in reversed(adapters) for m in a.theta}
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    out = []
    for a in adapters:
        theta, alpha = {}, {}
        dtype = next(iter(a.theta.values())).dtype
        for m in modules:
            if m in a.theta:
                theta[m], alpha[m] = a.theta[m], a.alpha[m]
            else:
                n = road_math.num_values(a.variant, width[m])
                theta[m], alpha[m] = torch.zeros(n, dtype=dtype), torch.ones(n, dtype=dtype)
        cfg = {k: v for k, v in a.config.items() if k not in ("layers_to_transform", "layers_pattern")}
        cfg["target_modules"] = targets
        out.append(replace(a, theta=theta, alpha=alpha, config=cfg))
    return out


def _road_result(template: RoadAdapter, theta: dict, alpha: dict, recipe: Recipe,
                 variant: str | None = None) -> RoadAdapter:
    return RoadAdapter(variant=variant or template.variant, group_size=template.group_size, theta=theta,
                       alpha=alpha, config=dict(template.config), recipe=recipe, source=None)


def _deviation(adapters: Sequence[RoadAdapter], weights: Sequence[float], result: RoadAdapter) -> float | None:
    """Relative deviation of ``result`` from the exact product ``A_n^{w_n} ⋯ A_1^{w_1}``."""
    g = result.group_size
    approx, exact = [], []
    for m in result.theta:
        mats = [road_math.block_power(road_math.blocks(a.variant, g, a.theta[m], a.alpha[m]), w)
                for a, w in zip(adapters, weights)]
        exact.append(road_math.sequential_product(mats))
        approx.append(road_math.blocks(result.variant, g, result.theta[m], result.alpha[m]))
    dev = road_math.relative_deviation(approx, exact)
    return None if math.isnan(dev) else dev


def _inputs(adapters: Sequence[Adapter]) -> tuple[dict, ...]:
    seen: dict[str, dict] = {}
    for i, a in enumerate(adapters):
        if a.recipe is not None:
            for inp in a.recipe.inputs:
                seen.setdefault(str(inp.get("ref")), dict(inp))
        else:
            label = _label(a, i)
            seen.setdefault(label, {"name": label, "ref": a.source or label})
    return tuple(seen.values())


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
    first = adapters[0]

    def combine(ts: list[torch.Tensor]) -> torch.Tensor:
        return merge_methods.apply(method, ts, weights, params)

    if isinstance(first, LoraAdapter):
        return _lora_linear(adapters, weights, method, params, expr, op)  # type: ignore[arg-type]
    if isinstance(first, RoadAdapter):
        adapters = _road_union(adapters)  # type: ignore[arg-type]
        first = adapters[0]
        theta, alpha = {}, {}
        for mod in first.theta:
            gens = [_generator(a, mod) for a in adapters]  # type: ignore[arg-type]
            th = combine([g[0] for g in gens])
            la = combine([g[1] for g in gens])
            theta[mod] = th.to(first.theta[mod].dtype)
            alpha[mod] = la.exp().to(first.alpha[mod].dtype)
            _check_result(mod, theta[mod], alpha[mod], weights)
        heuristic = method != "task_arithmetic"
        exact = first.variant == "road_1" and not heuristic
        recipe = Recipe(expression=expr, inputs=_inputs(adapters), weights=tuple(weights),
                        method=op or method, params=params, exact=exact)
        result = _road_result(first, theta, alpha, recipe)
        if not exact and not heuristic:
            dev = _deviation(adapters, weights, result)  # type: ignore[arg-type]
            result = replace(result, recipe=replace(recipe, deviation=dev))
        return result
    # prompt vectors: τ arithmetic around the first input's origin
    vector = combine([a.vector for a in adapters]).to(first.vector.dtype)  # type: ignore[union-attr, misc]
    _check_result("vector", vector, None, weights)
    recipe = Recipe(expression=expr, inputs=_inputs(adapters), weights=tuple(weights), method=op or method,
                    params=params, exact=method == "task_arithmetic")
    return PromptVector.from_parts(first.init, vector, dict(first.config), recipe=recipe)  # type: ignore[arg-type]


def _lora_modules(adapters: Sequence[LoraAdapter]) -> list[str]:
    """The union of the adapters' modules, in first-seen order."""
    return list(dict.fromkeys(m for a in adapters for m in a.lora_a))


def _lora_result(template: LoraAdapter, adapters: Sequence[LoraAdapter], lora_a: dict, lora_b: dict,
                 recipe: Recipe) -> LoraAdapter:
    """A plain PEFT LoRA: one rank ``r`` for every module (smaller ones zero-padded, which changes no ΔW),
    ``lora_alpha = r`` so ``s = 1``, no rsLoRA and no patterns (what any PEFT version loads the same way)."""
    r = max(t.shape[0] for t in lora_a.values())
    for m in lora_a:
        lora_a[m], lora_b[m] = lora_math.pad_rank(lora_a[m], lora_b[m], r)
    modules = list(lora_a)
    cfg = {k: v for k, v in template.config.items() if k not in lora_math.NOT_LOW_RANK}
    # init_lora_weights=True: PEFT must not re-run an initialiser (PiSSA, LoftQ ...) that edits the base weights.
    cfg.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern={}, alpha_pattern={}, init_lora_weights=True)
    selection = ("target_modules", "layers_to_transform", "layers_pattern", "exclude_modules")
    same = all(set(a.lora_a) == set(modules) and all(a.config.get(k) == template.config.get(k) for k in selection)
               for a in adapters)
    if not same:  # inputs adapt different layers: name the modules exactly, so PEFT adapts none without values
        for k in selection:
            cfg.pop(k, None)
        cfg["target_modules"] = sorted(modules)
    return LoraAdapter(lora_a=lora_a, lora_b=lora_b, scaling={m: 1.0 for m in modules}, config=cfg, recipe=recipe)


def _lora_linear(adapters: Sequence[LoraAdapter], weights: list[float], method: str, params: dict, expr: str,
                 op: str | None) -> LoraAdapter:
    """Task arithmetic by rank concatenation (exact); TIES/DARE on the dense ΔW, re-factored by SVD at the
    inputs' summed rank (approximate: the heuristic itself, and the truncation error in ``deviation``)."""
    lora_a, lora_b = {}, {}
    dtype = adapters[0].lora_a[next(iter(adapters[0].lora_a))].dtype
    cut = total = 0.0
    for m in _lora_modules(adapters):
        have = [(a, w) for a, w in zip(adapters, weights) if m in a.lora_a]
        if method == "task_arithmetic":
            lora_a[m], lora_b[m] = lora_math.concat([(a.lora_a[m], a.lora_b[m], w * a.scaling[m]) for a, w in have],
                                                    dtype=dtype)
        else:
            out, inp = have[0][0].shape(m)
            deltas = [a.delta(m) if m in a.lora_a else torch.zeros(out, inp, dtype=torch.float64) for a in adapters]
            dw = merge_methods.apply(method, deltas, weights, params)
            rank = sum(a.rank(m) for a, _ in have)
            lora_a[m], lora_b[m], err = lora_math.factor(dw, rank, dtype)
            norm2 = float(dw.square().sum())
            cut, total = cut + err * err * norm2, total + norm2
        _check_lora(m, lora_a[m], lora_b[m], weights)
    heuristic = method != "task_arithmetic"
    recipe = Recipe(expression=expr, inputs=_inputs(adapters), weights=tuple(weights), method=op or method,
                    params=params, exact=not heuristic,
                    deviation=(math.sqrt(cut / total) if total > 0 else 0.0) if heuristic else None)
    return _lora_result(adapters[0], adapters, lora_a, lora_b, recipe)


def _check_lora(m: str, a: torch.Tensor, b: torch.Tensor, weights: list[float]) -> None:
    _check_result(f"{m}.lora_A.weight", a, None, weights)
    _check_result(f"{m}.lora_B.weight", b, None, weights)


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
    if not isinstance(a, LoraAdapter):
        raise NotComposableError(f"compress() truncates a LoRA's rank by SVD; {_label(a, 0)} is a {a.kind} adapter, "
                                 "which has no rank.")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidArgumentError(f"rank must be a whole number of at least 1, got {rank!r}.", name="rank",
                                   value=rank)
    check_compatible([a])
    lora_a, lora_b, errors = {}, {}, {}
    cut = total = 0.0
    for m in a.lora_a:
        lora_a[m], lora_b[m], err = lora_math.truncate(a.lora_a[m], a.lora_b[m], rank, a.scaling[m])
        errors[m] = err
        norm2 = float(a.delta(m).square().sum())
        cut, total = cut + err * err * norm2, total + norm2
    exact = all(e == 0.0 for e in errors.values()) and all(a.rank(m) <= rank for m in a.lora_a)
    recipe = Recipe(expression=format_compress(_label(a, 0), rank), inputs=_inputs([a]), weights=(),
                    method="compress", params={"rank": rank, "errors": errors}, exact=exact,
                    deviation=None if exact else (math.sqrt(cut / total) if total > 0 else 0.0))
    return _lora_result(a, [a], lora_a, lora_b, recipe)


def _check_result(name: str, t: torch.Tensor, alpha: torch.Tensor | None, weights: list[float]) -> None:
    """Finite inputs and finite weights can still overflow (1e300 * a); say so instead of storing inf."""
    try:
        check_finite(name, t)
        if alpha is not None:
            check_finite(f"{name}.road_alpha", alpha)
    except InvalidValueError as e:
        raise InvalidValueError(
            f"The result overflows ({e.tensor} is {e.value}) with weights {weights}; use smaller weights.",
            tensor=e.tensor, index=e.index, value=e.value) from e


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
    recipe = replace(result.recipe, params={"t": t})  # type: ignore[arg-type]
    if isinstance(a, PromptVector):
        assert isinstance(b, PromptVector) and a.init is not None and b.init is not None
        init = ((1.0 - t) * a.init.double() + t * b.init.double()).to(a.init.dtype)
        return PromptVector.from_parts(init, result.vector, result.config, recipe=recipe)  # type: ignore[arg-type]
    return replace(result, recipe=recipe)


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
    if isinstance(a, PromptVector) or isinstance(b, PromptVector):
        check_compatible([a, b])
        raise NotComposableError("compose() is the exact product of RoAd blocks; prompt vectors have none. "
                                 "Use composer.add(a, b) for τ arithmetic.")
    if isinstance(a, LoraAdapter) or isinstance(b, LoraAdapter):
        check_compatible([a, b])
        raise NotComposableError("compose() is the exact product of RoAd blocks; LoRAs on the same weights have "
                                 "none: applying both is their sum. Use composer.add(a, b), which is exact.")
    check_compatible([a, b], same_variant=False)
    expr = f"compose({_label(a, 0)}, {_label(b, 1)})"  # the grammar's compose(x, y)
    a, b = _road_union([a, b])
    if a.variant == b.variant == "road_1":
        r = linear([a, b], [1.0, 1.0], expression=expr, op="compose")
        return r
    g = a.group_size
    theta, alpha = {}, {}
    for m in a.theta:
        ma = road_math.blocks(a.variant, g, a.theta[m], a.alpha[m])
        mb = road_math.blocks(b.variant, g, b.theta[m], b.alpha[m])
        theta[m], alpha[m] = road_math.road4_from_blocks(mb @ ma, dtype=a.theta[m].dtype)
    recipe = Recipe(expression=expr, inputs=_inputs([a, b]), weights=(), method="compose", params={}, exact=True)
    return _road_result(a, theta, alpha, recipe, variant="road_4")
