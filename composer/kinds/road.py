"""The RoAd kind (PEFT ``peft_type: ROAD``): the adapter class, its folder format, generator arithmetic, the
exact product, PEFT models and what ``hub show``/the app say of it.

RoAd arithmetic works on each adapter's generator ``(θ, log α)``:

- road_1 blocks are complex numbers ``α·e^{iθ}`` and commute, so a weighted sum of generators is *exactly*
  the product ``Π (αᵢ e^{iθᵢ})^{wᵢ}``: ``add(a, b)`` is "apply a, then b", ``negate`` is the inverse.
- road_2/road_4 blocks do not commute: the same per-element arithmetic is an approximation. The result's
  recipe says so (``exact=False``) and carries ``deviation = ‖approx − exact‖ / ‖exact‖`` against the exact
  product ``A_n^{w_n} ⋯ A_1^{w_1}`` of the blocks. :meth:`RoadKind.compose` gives the exact product (as road_4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import merge_methods, road_math
from ..arith import check_result, inputs
from ..errors import AdapterFormatError, IncompatibleAdaptersError, InvalidValueError
from ..folder import CONFIG, PREFIX, WEIGHTS, check_targets, dimension
from ..provenance import Provenance, Recipe, check_finite
from ..road_math import VARIANTS, Variant, generator, layer_width
from .base import Kind, linear_layer, linear_targets

_LOG_TINY = math.log(1e-30)


@dataclass(frozen=True, eq=False)
class RoadAdapter(Provenance):
    """A RoAd adapter (PEFT ``peft_type: ROAD``).

    Attributes:
        variant: ``road_1``, ``road_2`` or ``road_4``.
        group_size: the pairing group size (even); a layer's width must be a multiple of it.
        theta: module name -> angle tensor (1-D).
        alpha: module name -> scale tensor (1-D, same shape as ``theta``).
        config: the PEFT ``adapter_config.json`` contents (kept for ``base_model_name_or_path``,
            ``target_modules`` and anything PEFT adds).
        recipe: how it was composed, or ``None`` for a trained adapter.
        source: where it came from (a folder, or ``namespace/name@sha``), used in recipes.
    """

    variant: Variant
    group_size: int
    theta: dict[str, torch.Tensor]
    alpha: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    recipe: Recipe | None = None
    source: str | None = None

    kind = "road"

    @property
    def modules(self) -> list[str]:
        return list(self.theta)

    def width(self, module: str) -> int:
        """Output width of the adapted layer, derived from the tensor size and the variant."""
        return layer_width(self.variant, self.theta[module].numel()) or 0

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.theta.values()) + sum(t.numel() for t in self.alpha.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """PEFT state-dict layout: ``base_model.model.<module>.road_theta`` / ``.road_alpha``."""
        out: dict[str, torch.Tensor] = {}
        for m in self.theta:
            out[f"base_model.model.{m}.road_alpha"] = self.alpha[m]
            out[f"base_model.model.{m}.road_theta"] = self.theta[m]
        return out

    def validate(self) -> None:
        """Check finiteness; shapes are checked at load and by the arithmetic."""
        for m in self.theta:
            check_finite(f"{m}.road_theta", self.theta[m])
            check_finite(f"{m}.road_alpha", self.alpha[m])

    def generators(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-module generator ``(θ, log α)`` (:func:`composer.road_math.generator`; a zero α's log is
        clamped to log 1e-30 so that norms and cosines stay finite)."""
        out = {}
        for m in self.theta:
            th, la = generator(self.theta[m], self.alpha[m])
            out[m] = (th, la.clamp_min(_LOG_TINY))
        return out

    def task_vectors(self) -> dict[str, torch.Tensor]:
        """Per-module flat task vectors in float64, sorted by module: the generator ``(θ, log α)``."""
        gens = self.generators()
        return {m: torch.cat([gens[m][0].flatten(), gens[m][1].flatten()]) for m in sorted(gens)}

    def norms(self) -> dict[str, dict[str, float]]:
        """Per-module norms of the generator: ``{"theta": ‖θ‖, "log_alpha": ‖log α‖}``."""
        return {m: {"theta": float(th.norm()), "log_alpha": float(la.norm())}
                for m, (th, la) in self.generators().items()}

    def __repr__(self) -> str:
        return (f"RoadAdapter(variant={self.variant!r}, group_size={self.group_size}, "
                f"modules={len(self.theta)}, params={self.num_parameters()}, source={self.source!r})")


class RoadKind(Kind):
    name = "road"
    peft_type = "ROAD"
    adapter_class = RoadAdapter
    engine_role = "output"
    subspaces = True
    default_lr = 3e-3
    fresh_start = "identity"

    # ------------------------------------------------------------------------------------------- folders
    def parse(self, folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> RoadAdapter:
        variant = cfg.get("variant", "road_1")
        if variant not in VARIANTS:
            raise AdapterFormatError(f"{CONFIG}: variant {variant!r} is not one of {', '.join(VARIANTS)}.",
                                     path=folder)
        g = dimension(cfg, "group_size", 64, folder)
        if g % 2:
            raise AdapterFormatError(f"{CONFIG}: group_size must be a positive even integer, got {g!r}.", path=folder)
        theta: dict[str, torch.Tensor] = {}
        alpha: dict[str, torch.Tensor] = {}
        for key in sorted(tensors):
            if not key.startswith(PREFIX) or not key.endswith((".road_theta", ".road_alpha")):
                raise AdapterFormatError(
                    f"Unexpected tensor '{key}' in a ROAD adapter: expected "
                    f"'{PREFIX}<module>.road_theta' / '.road_alpha' only.", path=folder, tensor=key)
            module, _, which = key[len(PREFIX):].rpartition(".")
            (theta if which == "road_theta" else alpha)[module] = tensors[key]
        if not theta and not alpha:
            raise AdapterFormatError(f"{folder / WEIGHTS} holds no RoAd tensors.", path=folder)
        for m in sorted(set(theta) | set(alpha)):
            if m not in theta or m not in alpha:
                missing = "road_theta" if m not in theta else "road_alpha"
                raise AdapterFormatError(f"Module '{m}' has no {missing} tensor.", path=folder,
                                         tensor=f"{m}.{missing}")
            t, a = theta[m], alpha[m]
            if t.dim() != 1 or t.shape != a.shape:
                raise AdapterFormatError(
                    f"Tensor '{m}.road_theta' has shape {tuple(t.shape)} and '{m}.road_alpha' {tuple(a.shape)}; "
                    "both must be 1-D and equal.", path=folder, tensor=f"{m}.road_theta")
            n = t.numel()
            width = layer_width(variant, n)
            if width is None:
                raise AdapterFormatError(
                    f"Tensor '{m}.road_theta' has {n} values, which no layer width gives for {variant}.",
                    path=folder, tensor=f"{m}.road_theta")
            if width % g:
                raise AdapterFormatError(
                    f"group_size {g} does not divide the width {width} of layer '{m}' "
                    f"(tensor '{m}.road_theta' has {n} values for {variant}); pick a group size that divides it.",
                    path=folder, tensor=f"{m}.road_theta")
            check_finite(f"{m}.road_theta", t)
            check_finite(f"{m}.road_alpha", a)
        check_targets(folder, cfg, sorted(theta))
        return RoadAdapter(variant=variant, group_size=g, theta=theta, alpha=alpha, config=cfg)


    def peft_config(self, adapter: RoadAdapter, cfg: dict[str, Any]) -> dict[str, Any]:
        cfg["variant"] = adapter.variant
        cfg["group_size"] = adapter.group_size
        cfg.setdefault("init_weights", True)
        cfg.setdefault("task_type", None)
        return _targets(cfg, adapter.theta)

    def files(self, adapter: RoadAdapter) -> dict[str, dict[str, torch.Tensor] | None]:
        return {WEIGHTS: adapter.tensors()}

    def from_peft(self, model: Any, adapter_name: str, cfg: dict[str, Any], *, init: torch.Tensor | None,
                  source: str | None) -> RoadAdapter:
        theta, alpha = {}, {}
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "road_theta") and adapter_name in getattr(module, "road_theta", {}):
                theta[name] = module.road_theta[adapter_name].detach().float().cpu().clone()
                alpha[name] = module.road_alpha[adapter_name].detach().float().cpu().clone()
        return RoadAdapter(variant=cfg["variant"], group_size=cfg["group_size"], theta=theta, alpha=alpha,
                           config=cfg, source=source)

    # ----------------------------------------------------------------------------------------- arithmetic
    def check_pair(self, first: RoadAdapter, other: RoadAdapter, names: str, *,
                   same_variant: bool) -> None:
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
                raise IncompatibleAdaptersError(
                    f"Tensor '{m}.road_theta' has shape {tuple(first.theta[m].shape)} vs "
                    f"{tuple(other.theta[m].shape)} (layer width {wa} vs {wb}).",
                    field="shape", left=tuple(first.theta[m].shape), right=tuple(other.theta[m].shape),
                    tensor=f"{m}.road_theta")

    def linear(self, adapters: Sequence[RoadAdapter], weights: list[float], method: str, params: dict, expr: str,
               op: str | None) -> RoadAdapter:
        adapters = union(adapters)
        first = adapters[0]
        theta, alpha = {}, {}
        for mod in first.theta:
            gens = [checked_generator(a, mod) for a in adapters]
            th = merge_methods.apply(method, [g[0] for g in gens], weights, params)
            la = merge_methods.apply(method, [g[1] for g in gens], weights, params)
            theta[mod] = th.to(first.theta[mod].dtype)
            alpha[mod] = la.exp().to(first.alpha[mod].dtype)
            check_result(mod, theta[mod], alpha[mod], weights)
        heuristic = method != "task_arithmetic"
        exact = first.variant == "road_1" and not heuristic
        recipe = Recipe(expression=expr, inputs=inputs(adapters), weights=tuple(weights),
                        method=op or method, params=params, exact=exact)
        result = result_like(first, theta, alpha, recipe)
        if not exact and not heuristic:
            dev = _deviation(adapters, weights, result)
            result = replace(result, recipe=replace(recipe, deviation=dev))
        return result

    def compose(self, a: RoadAdapter, b: RoadAdapter, expr: str) -> RoadAdapter:
        a, b = union([a, b])
        if a.variant == b.variant == "road_1":
            return self.linear([a, b], [1.0, 1.0], "task_arithmetic", {}, expr, "compose")
        g = a.group_size
        theta, alpha = {}, {}
        for m in a.theta:
            ma = road_math.blocks(a.variant, g, a.theta[m], a.alpha[m])
            mb = road_math.blocks(b.variant, g, b.theta[m], b.alpha[m])
            theta[m], alpha[m] = road_math.road4_from_blocks(mb @ ma, dtype=a.theta[m].dtype)
        recipe = Recipe(expression=expr, inputs=inputs([a, b]), weights=(), method="compose", params={}, exact=True)
        return result_like(a, theta, alpha, recipe, variant="road_4")

    # ------------------------------------------------------------------------------------------- models
    def check_fits(self, adapter: RoadAdapter, model: Any, modules: Mapping[str, Any] | None) -> None:
        modules = dict(model.named_modules()) if modules is None else modules
        for m in adapter.theta:
            layer = linear_layer(modules, m, adapter, "adapter", f"{m}.road_theta")
            if layer.out_features != adapter.width(m):
                raise IncompatibleAdaptersError(
                    f"Tensor '{m}.road_theta' is for width {adapter.width(m)}, the model's layer has "
                    f"{layer.out_features} outputs; was it trained on another base model ({adapter.base_model!r})?",
                    field="shape", left=adapter.width(m), right=layer.out_features, tensor=f"{m}.road_theta")

    def init_peft(self, model: Any, adapter: RoadAdapter, adapter_name: str) -> Any:
        from peft import get_peft_model

        modules = dict(model.named_modules())
        self.check_fits(adapter, model, modules)
        linear = {n for n, mod in modules.items() if isinstance(mod, torch.nn.Linear)}
        peft_model = get_peft_model(model, peft_config(adapter, linear), adapter_name=adapter_name)
        targets = {n: mod for n, mod in peft_model.base_model.model.named_modules() if hasattr(mod, "road_theta")}
        extra = sorted(set(targets) - set(adapter.theta))
        if extra:
            raise IncompatibleAdaptersError(
                f"The model has RoAd-targetable module '{extra[0]}' that the adapter does not adapt.",
                field="modules", left=sorted(adapter.theta), right=sorted(targets), tensor=extra[0])
        with torch.no_grad():
            for m, mod in targets.items():
                p_t, p_a = mod.road_theta[adapter_name], mod.road_alpha[adapter_name]
                p_t.copy_(adapter.theta[m].to(p_t.dtype))
                p_a.copy_(adapter.alpha[m].to(p_a.dtype))
        return peft_model

    def new_peft(self, model: Any, options: Mapping[str, Any]) -> Any:
        from peft import RoadConfig, get_peft_model

        targets = options.get("target_modules")
        cfg = RoadConfig(variant=options.get("variant", "road_1"), group_size=options.get("group_size", 64),
                         target_modules=list(targets) if targets else None)
        linear_targets(model, cfg, "PEFT's RoAd adapts nn.Linear layers only")
        return get_peft_model(model, cfg)

    # ------------------------------------------------------------------------------------------ showing
    def describe(self, adapter: RoadAdapter) -> dict[str, Any]:
        return {"variant": adapter.variant, "group_size": adapter.group_size,
                "target_modules": sorted({m.rsplit(".", 1)[-1] for m in adapter.theta}),
                "modules": len(adapter.theta)}

    def label(self, adapter: RoadAdapter) -> str:
        return f"road ({adapter.variant}, g={adapter.group_size})"

    def layer_rows(self, adapter: RoadAdapter, layer_of: Any) -> list[dict[str, Any]]:
        acc: dict[int, list[float]] = {}
        for m, n in adapter.norms().items():
            a = acc.setdefault(layer_of(m), [0.0, 0.0])
            a[0] += n["theta"] ** 2
            a[1] += n["log_alpha"] ** 2
        rows = []
        for layer in sorted(acc):
            rows.append({"layer": layer, "norm": math.sqrt(acc[layer][0]), "series": "angle ‖θ‖"})
            rows.append({"layer": layer, "norm": math.sqrt(acc[layer][1]), "series": "scale ‖log α‖"})
        return rows


def _targets(cfg: dict[str, Any], modules: Mapping[str, Any]) -> dict[str, Any]:
    """``target_modules`` as PEFT needs it: the modules' last names when the config has none usable, sorted."""
    if not cfg.get("target_modules") or not isinstance(cfg.get("target_modules"), (list, str)):
        cfg["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in modules})
    elif isinstance(cfg["target_modules"], list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    return cfg


def peft_config(adapter: RoadAdapter, linear_names: set[str] | None = None) -> Any:
    """PEFT's ``RoadConfig`` adapting exactly ``adapter``'s modules (named one by one when it covers only some
    layers of a model whose ``nn.Linear`` names are ``linear_names``)."""
    from peft import RoadConfig

    targets = sorted({m.rsplit(".", 1)[-1] for m in adapter.theta})
    if linear_names is not None and {n for n in linear_names if n.rsplit(".", 1)[-1] in targets} != set(adapter.theta):
        targets = sorted(adapter.theta)  # the adapter covers only some layers: name them exactly
    return RoadConfig(variant=adapter.variant, group_size=adapter.group_size, target_modules=targets)


def checked_generator(a: RoadAdapter, m: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ, log α) in float64 (:func:`road_math.generator`); a zero α has no logarithm and is refused."""
    alpha = a.alpha[m]
    if bool((alpha == 0).any()):
        idx = int((alpha == 0).nonzero()[0])
        raise InvalidValueError(
            f"Tensor '{m}.road_alpha' is 0 at index {idx}: a zero scale has no logarithm, so it cannot enter "
            "generator arithmetic. Use composer.compose for exact products.",
            tensor=f"{m}.road_alpha", index=idx, value=0.0)
    return road_math.generator(a.theta[m], alpha)


def union(adapters: Sequence[RoadAdapter]) -> list[RoadAdapter]:
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


def result_like(template: RoadAdapter, theta: dict, alpha: dict, recipe: Recipe,
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


KIND = RoadKind()
