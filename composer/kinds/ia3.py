"""The IA³ kind (PEFT ``peft_type: IA3``): the adapter class, its folder format, generator arithmetic on ``log l``,
PEFT models, the engine's view of it as a RoAd output transform, and what ``hub show``/the app say of it.

IA³ (Liu et al., 2022) learns one vector ``l`` per adapted layer and scales activations element-wise: the layer's
output ``y ⊙ l`` (PEFT stores ``l`` as ``(out, 1)``), or, for ``feedforward_modules``, its input ``W·(x ⊙ l)``
(stored as ``(1, in)``). Two IA³ adapters on one layer (PEFT with both active) multiply their vectors, and
element-wise scalings commute, so arithmetic runs on the generator ``log l`` and is exact, like road_1's:

- ``add(a, b)`` is ``l_a ⊙ l_b`` ("apply a and b"; :func:`composer.compose` is the same product),
  ``negate`` is ``1 / l``, ``scale(a, w)`` is ``l^w``, ``interpolate`` the geometric path ``l_a^(1−t) ⊙ l_b^t``,
  task arithmetic ``Π lᵢ^wᵢ``;
- a module only one input adapts is the identity (``l = 1``) in the others;
- a non-positive ``l`` has no logarithm: arithmetic refuses it with the tensor and index;
- TIES/DARE act on ``log l`` (trim small log-scales to 1, elect signs): heuristics, labelled ``exact=False``.

The engine serves output-scaling IA³ per row as a RoAd table ``C = l, S = 0`` (:meth:`Ia3Kind.as_road`: the road_2
adapter θ = 0, α = l, exact); rows whose IA³ scales the input of a feedforward module are refused with the reason.
IA³ on convolutions (4-D/5-D vectors, vision models) is stored as it is (:mod:`composer.kinds.stored`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import merge_methods
from ..arith import check_result, inputs
from ..errors import AdapterFormatError, IncompatibleAdaptersError, InvalidValueError, NotComposableError
from ..folder import CONFIG, PREFIX, WEIGHTS, check_targets, peft_reads
from ..provenance import Provenance, Recipe, check_finite
from .base import Kind, linear_layer, linear_targets

SUFFIX = ".ia3_l"
_LOG_TINY = math.log(1e-30)
# The config fields that select modules: kept from the inputs when a result adapts what they adapt.
_SELECTION = ("target_modules", "feedforward_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


@dataclass(frozen=True, eq=False)
class Ia3Adapter(Provenance):
    """An IA³ adapter (PEFT ``peft_type: IA3``).

    Attributes:
        l: module name -> the learned vector (1-D; PEFT's ``ia3_l`` flattened).
        feedforward: the modules whose *input* ``l`` scales (``feedforward_modules``); the others scale their output.
        config: the PEFT ``adapter_config.json`` contents.
        recipe, source: as for every adapter.
    """

    l: dict[str, torch.Tensor]  # noqa: E741 - the paper's and PEFT's name for the vector
    feedforward: frozenset[str] = frozenset()
    config: dict[str, Any] = field(default_factory=dict)
    recipe: Recipe | None = None
    source: str | None = None

    kind = "ia3"

    @property
    def modules(self) -> list[str]:
        return list(self.l)

    def width(self, module: str) -> int:
        """The adapted layer's ``in_features`` (feedforward) or ``out_features`` (the others)."""
        return self.l[module].numel()

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.l.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """PEFT state-dict layout: ``base_model.model.<module>.ia3_l``, ``(1, in)`` feedforward, ``(out, 1)`` else."""
        return {f"{PREFIX}{m}{SUFFIX}": v.reshape(1, -1) if m in self.feedforward else v.reshape(-1, 1)
                for m, v in self.l.items()}

    def validate(self) -> None:
        for m, v in self.l.items():
            check_finite(f"{m}{SUFFIX}", v)

    def task_vectors(self) -> dict[str, torch.Tensor]:
        """Per-module ``log |l|`` in float64, sorted by module (0 is the identity; a zero is clamped to log 1e-30 and
        a negative value's sign is not shown, so that norms and cosines stay finite: arithmetic refuses both)."""
        return {m: self.l[m].double().abs().log().clamp_min(_LOG_TINY).flatten() for m in sorted(self.l)}

    def norms(self) -> dict[str, dict[str, float]]:
        """Per-module ``‖log l‖`` (0 for the identity)."""
        return {m: {"log_l": float(v.norm())} for m, v in self.task_vectors().items()}

    def __repr__(self) -> str:
        return (f"Ia3Adapter(modules={len(self.l)}, feedforward={len(self.feedforward)}, "
                f"params={self.num_parameters()}, source={self.source!r})")


class Ia3Kind(Kind):
    name = "ia3"
    peft_type = "IA3"
    adapter_class = Ia3Adapter
    engine_role = "output"
    default_lr = 3e-3  # the IA³ paper's (T-Few) learning rate
    fresh_start = "peft (l = 1)"

    # ------------------------------------------------------------------------------------------- folders
    def parse(self, folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
        pcfg = peft_reads(folder, cfg)  # PEFT's own IA3Config: refuses feedforward_modules outside target_modules
        if not tensors:
            raise AdapterFormatError(f"{folder / WEIGHTS} holds no IA³ tensors.", path=folder)
        if any(t.dim() > 2 for t in tensors.values()):
            return _conv(folder, cfg, tensors)
        if cfg.get("feedforward_modules") is None:
            raise AdapterFormatError(
                f"{CONFIG}: feedforward_modules is null, so PEFT would take them from the base model's type, which "
                "the folder does not record. Set it to the modules whose input IA³ scales (e.g. [\"down_proj\"]), or "
                "[] when it scales outputs only.", path=folder)
        vectors: dict[str, torch.Tensor] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for key in sorted(tensors):
            if not key.startswith(PREFIX) or not key.endswith(SUFFIX) or len(key) <= len(PREFIX) + len(SUFFIX):
                raise AdapterFormatError(
                    f"Unexpected tensor '{key}' in an IA3 adapter: expected '{PREFIX}<module>{SUFFIX}' only "
                    "(modules_to_save and other extra tensors are not supported).", path=folder, tensor=key)
            m = key[len(PREFIX):-len(SUFFIX)]
            vectors[m], shapes[m] = tensors[key], tuple(tensors[key].shape)
        check_targets(folder, cfg, sorted(vectors), suffix="ia3_l")
        feedforward = frozenset(m for m in vectors if _is_feedforward(folder, pcfg, m))
        for m in sorted(vectors):
            ff = m in feedforward
            shape = shapes[m]
            if len(shape) != 2 or shape[1 - ff] != 1 or shape[ff] < 1:
                want, why = ("(1, in_features)", "input") if ff else ("(out_features, 1)", "output")
                raise AdapterFormatError(
                    f"Tensor '{m}{SUFFIX}' has shape {shape}; '{m}' scales its {why} (feedforward_modules "
                    f"{str(cfg.get('feedforward_modules'))[:60]}), which PEFT stores as {want}: PEFT would refuse to "
                    "load it. Fix feedforward_modules or re-save the adapter with PEFT.", path=folder,
                    tensor=f"{m}{SUFFIX}")
            check_finite(f"{m}{SUFFIX}", vectors[m])
        return Ia3Adapter(l={m: v.flatten() for m, v in vectors.items()}, feedforward=feedforward, config=cfg)

    def peft_config(self, adapter: Ia3Adapter, cfg: dict[str, Any]) -> dict[str, Any]:
        cfg.setdefault("task_type", None)
        cfg.setdefault("fan_in_fan_out", False)
        cfg["init_ia3_weights"] = True
        if not _selects(cfg.get("target_modules")) or cfg.get("feedforward_modules") is None:
            for k in _SELECTION:
                cfg.pop(k, None)
            cfg["target_modules"], cfg["feedforward_modules"] = selection(adapter)
        for k in ("target_modules", "feedforward_modules"):
            if isinstance(cfg[k], list):
                cfg[k] = sorted(cfg[k])
        return cfg

    def files(self, adapter: Ia3Adapter) -> dict[str, dict[str, torch.Tensor] | None]:
        return {WEIGHTS: adapter.tensors()}

    def from_peft(self, model: Any, adapter_name: str, cfg: dict[str, Any], *, init: torch.Tensor | None,
                  source: str | None) -> Any:
        found = [(name, mod) for name, mod in model.base_model.model.named_modules()
                 if adapter_name in getattr(mod, "ia3_l", {})]
        if any(mod.ia3_l[adapter_name].dim() > 2 for _, mod in found):
            from .stored import KIND as STORED  # convolutions: stored as they are

            return STORED.from_peft(model, adapter_name, cfg, init=init, source=source)
        vectors = {name: mod.ia3_l[adapter_name].detach().float().cpu().flatten().clone() for name, mod in found}
        feedforward = frozenset(name for name, mod in found if mod.is_feedforward)
        return Ia3Adapter(l=vectors, feedforward=feedforward, config=cfg, source=source)

    # ----------------------------------------------------------------------------------------- arithmetic
    def check_pair(self, first: Ia3Adapter, other: Ia3Adapter, names: str, *,
                   same_variant: bool) -> None:
        for m in [m for m in first.l if m in other.l]:  # a module only one adapts: the identity in the other
            if (m in first.feedforward) != (m in other.feedforward):
                scales = {True: "input", False: "output"}
                raise IncompatibleAdaptersError(
                    f"Module '{m}' scales its {scales[m in first.feedforward]} in one adapter and its "
                    f"{scales[m in other.feedforward]} in the other ({names}: feedforward_modules differ); one IA³ "
                    "vector cannot do both, so these adapters cannot be combined. Serve them with PEFT, both active.",
                    field="feedforward", left=m in first.feedforward, right=m in other.feedforward,
                    tensor=f"{m}{SUFFIX}")
            if first.width(m) != other.width(m):
                raise IncompatibleAdaptersError(
                    f"Tensor '{m}{SUFFIX}' has {first.width(m)} values vs {other.width(m)} ({names}).",
                    field="shape", left=first.width(m), right=other.width(m),
                    tensor=f"{m}{SUFFIX}")

    def linear(self, adapters: Sequence[Ia3Adapter], weights: list[float], method: str, params: dict, expr: str,
               op: str | None) -> Ia3Adapter:
        """``Π lᵢ^wᵢ`` per element, as ``exp(Σ wᵢ log lᵢ)`` (or a merge method on ``log l``)."""
        modules = list(dict.fromkeys(m for a in adapters for m in a.l))
        out = {}
        for m in modules:
            have = next(a.l[m] for a in adapters if m in a.l)
            logs = [log_l(a, m) if m in a.l else torch.zeros(have.numel(), dtype=torch.float64) for a in adapters]
            out[m] = merge_methods.apply(method, logs, weights, params).exp().to(have.dtype)
            check_result(f"{m}{SUFFIX}", out[m], None, weights)
        recipe = Recipe(expression=expr, inputs=inputs(adapters), weights=tuple(weights), method=op or method,
                        params=params, exact=method == "task_arithmetic")
        return result_like(adapters, out, recipe)

    def compose(self, a: Ia3Adapter, b: Ia3Adapter, expr: str) -> Ia3Adapter:
        """Applying ``a``, then ``b``: element-wise scalings commute, so it is their product, ``add(a, b)``."""
        return self.linear([a, b], [1.0, 1.0], "task_arithmetic", {}, expr, "compose")

    # ------------------------------------------------------------------------------------------- models
    def check_fits(self, adapter: Ia3Adapter, model: Any, modules: Mapping[str, Any] | None) -> None:
        modules = dict(model.named_modules()) if modules is None else modules
        for m in adapter.l:
            layer = linear_layer(modules, m, adapter, "IA³ adapter", f"{m}{SUFFIX}")
            ff = m in adapter.feedforward
            have, what = (layer.in_features, "inputs") if ff else (layer.out_features, "outputs")
            if have != adapter.width(m):
                raise IncompatibleAdaptersError(
                    f"Tensor '{m}{SUFFIX}' scales {adapter.width(m)} {what}, the model's layer has {have}; was it "
                    f"trained on another base model ({adapter.base_model!r})?", field="shape",
                    left=adapter.width(m), right=have, tensor=f"{m}{SUFFIX}")

    def init_peft(self, model: Any, adapter: Ia3Adapter, adapter_name: str) -> Any:
        from peft import IA3Config, get_peft_model

        adapter.validate()
        modules = dict(model.named_modules())
        self.check_fits(adapter, model, modules)
        linear = {n for n, mod in modules.items() if isinstance(mod, torch.nn.Linear)}
        targets, feedforward = selection(adapter, linear)
        peft_model = get_peft_model(model, IA3Config(target_modules=targets, feedforward_modules=feedforward),
                                    adapter_name=adapter_name)
        layers = {n: mod for n, mod in peft_model.base_model.model.named_modules()
                  if adapter_name in getattr(mod, "ia3_l", {})}
        extra = sorted(set(layers) - set(adapter.l))
        if extra:
            raise IncompatibleAdaptersError(
                f"The model has IA³-targetable module '{extra[0]}' that the adapter does not adapt.",
                field="modules", left=sorted(adapter.l), right=sorted(layers), tensor=extra[0])
        with torch.no_grad():
            for m, mod in layers.items():
                p = mod.ia3_l[adapter_name]
                p.copy_(adapter.l[m].reshape(p.shape).to(p.dtype))
        return peft_model

    def new_peft(self, model: Any, options: Mapping[str, Any]) -> Any:
        """Every target scales its output (``feedforward_modules=[]``), so what ``hub train`` makes is served per row;
        without targets, PEFT's own for the model type (Llama: k_proj, v_proj, down_proj)."""
        from peft import IA3Config, get_peft_model

        targets = options.get("target_modules")
        cfg = IA3Config(target_modules=list(targets) if targets else None, feedforward_modules=[])
        linear_targets(model, cfg, "this hub trains and serves IA³ on nn.Linear layers only")
        return get_peft_model(model, cfg)

    def as_road(self, adapter: Ia3Adapter) -> Any:
        """The road_2 adapter with θ = 0 and α = l, one group per layer: its blocks are ``diag(l)``, so its output
        transform is ``y ⊙ l`` exactly (``cos 0 = 1``, ``sin 0 = 0``).

        Raises:
            NotComposableError: the adapter scales a feedforward module's input (not an output transform), or a
                layer of odd width (RoAd pairs outputs).
        """
        from .road import RoadAdapter

        if adapter.feedforward:
            m = sorted(adapter.feedforward)[0]
            raise NotComposableError(
                f"This IA³ adapter scales the input of '{m}' (feedforward_modules), and the engine serves per-row "
                "transforms of a layer's output only. Load it with PeftModel.from_pretrained (hub serve serves it to "
                "PEFT clients), merge it into the base model (merge_and_unload), or train one with "
                "feedforward_modules=[] (what hub train --kind ia3 does).")
        odd = next((m for m, v in adapter.l.items() if v.numel() % 2), None)
        if odd is not None:
            raise NotComposableError(f"Layer '{odd}' has an odd width ({adapter.width(odd)}); the engine's per-row "
                                     "output tables pair outputs. Load this adapter with PEFT.")
        theta = {m: torch.zeros(v.numel(), dtype=v.dtype) for m, v in adapter.l.items()}
        width = {v.numel() for v in adapter.l.values()}
        group = math.gcd(*width)  # every layer a whole number of groups (the engine regroups pure scales anyway)
        return RoadAdapter(variant="road_2", group_size=group, theta=theta, alpha=dict(adapter.l),
                           config=dict(adapter.config), source=adapter.source)

    # ------------------------------------------------------------------------------------------ showing
    def describe(self, adapter: Ia3Adapter) -> dict[str, Any]:
        return {"target_modules": sorted({m.rsplit(".", 1)[-1] for m in adapter.l}),
                "feedforward_modules": sorted({m.rsplit(".", 1)[-1] for m in adapter.feedforward}),
                "modules": len(adapter.l), "served_per_row": not adapter.feedforward}

    def label(self, adapter: Ia3Adapter) -> str:
        ff = sorted({m.rsplit(".", 1)[-1] for m in adapter.feedforward})
        return f"ia3 (scales the input of {', '.join(ff)})" if ff else "ia3"

    def layer_rows(self, adapter: Ia3Adapter, layer_of: Any) -> list[dict[str, Any]]:
        acc: dict[int, float] = {}
        for m, n in adapter.norms().items():
            layer = layer_of(m)
            acc[layer] = acc.get(layer, 0.0) + n["log_l"] ** 2
        return [{"layer": layer, "norm": math.sqrt(v), "series": "IA³ ‖log l‖"} for layer, v in sorted(acc.items())]


def log_l(a: Ia3Adapter, m: str) -> torch.Tensor:
    """``log l`` of module ``m`` in float64; a non-positive value has no logarithm and is refused."""
    v = a.l[m]
    bad = v <= 0
    if bool(bad.any()):
        idx = int(bad.nonzero()[0])
        value = float(v[idx])
        raise InvalidValueError(
            f"Tensor '{m}{SUFFIX}' is {value:g} at index {idx}: IA³ arithmetic works on log l, and a scale that is "
            "zero or negative has no logarithm, so this adapter cannot enter arithmetic. It can still be stored and "
            "served as it is.", tensor=f"{m}{SUFFIX}", index=idx, value=value)
    return v.double().log()


def selection(adapter: Ia3Adapter, linear_names: set[str] | None = None) -> tuple[list[str], list[str]]:
    """``(target_modules, feedforward_modules)`` for PEFT selecting exactly ``adapter``'s modules, with exactly its
    feedforward ones: the modules' last names when they say it unambiguously (PEFT matches a feedforward name
    as a plain suffix), else full names (and full names when ``linear_names``, the model's ``nn.Linear`` names,
    show that the last names would select modules the adapter has no vectors for)."""
    last = {m: m.rsplit(".", 1)[-1] for m in adapter.l}
    targets = sorted(set(last.values()))
    feedforward = sorted({last[m] for m in adapter.feedforward})
    exact = any(m.endswith(f) for m in adapter.l if m not in adapter.feedforward for f in feedforward)
    if linear_names is not None:
        exact = exact or {n for n in linear_names if n.rsplit(".", 1)[-1] in targets} != set(adapter.l)
    if exact:
        return sorted(adapter.l), sorted(adapter.feedforward)
    return targets, feedforward


def result_like(adapters: Sequence[Ia3Adapter], l: dict[str, torch.Tensor], recipe: Recipe) -> Ia3Adapter:  # noqa: E741
    """The result over the union of the inputs' modules: the first input's config when every input selects the
    same modules the same way, else the modules named exactly (so PEFT adapts none it has no vector for)."""
    first = adapters[0]
    feedforward = frozenset(m for a in adapters for m in a.feedforward)
    cfg = dict(first.config)
    same = all(set(a.l) == set(l) and a.feedforward == feedforward and
               all(a.config.get(k) == first.config.get(k) for k in _SELECTION) for a in adapters)
    result = Ia3Adapter(l=l, feedforward=feedforward, config=cfg, recipe=recipe)
    if not same:
        for k in _SELECTION:
            cfg.pop(k, None)
        cfg["target_modules"], cfg["feedforward_modules"] = selection(result)
    return result


def _selects(targets: Any) -> bool:
    return (isinstance(targets, str) and bool(targets)) or (isinstance(targets, list) and bool(targets))


def _is_feedforward(folder: Path, pcfg: Any, module: str) -> bool:
    """PEFT's own rule (``IA3Model._check_target_module_feedforward``: a regex fullmatch, or a name suffix)."""
    from peft.tuners.ia3 import IA3Model

    try:
        return bool(IA3Model._check_target_module_feedforward(pcfg, module))
    except re.error as e:
        raise AdapterFormatError(f"{CONFIG}: feedforward_modules {pcfg.feedforward_modules!r:.80} is not a valid "
                                 f"regular expression ({e}).", path=folder) from e
    except (TypeError, AttributeError) as e:
        raise AdapterFormatError(f"{CONFIG}: feedforward_modules must be a list of module names or a regular "
                                 f"expression, got {pcfg.feedforward_modules!r:.80}.", path=folder) from e


def _conv(folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    """IA³ on convolutions (PEFT's ``(1, channels, 1, 1[, 1])`` vectors): stored as it is, not composed or served."""
    from .stored import KIND as STORED

    for key, t in tensors.items():
        if t.dim() not in (2, 4, 5) or (t.dim() > 2 and (t.shape[0] != 1 or any(s != 1 for s in t.shape[2:]))):
            raise AdapterFormatError(
                f"Tensor '{key}' has shape {tuple(t.shape)}: PEFT's IA³ vectors are (out, 1) or (1, in) for linear "
                "layers and (1, channels, 1, 1[, 1]) for convolutions.", path=folder, tensor=key)
    return STORED.parse(folder, cfg, tensors)


KIND = Ia3Kind()
