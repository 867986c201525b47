"""Adapter value objects: :class:`RoadAdapter`, :class:`LoraAdapter`, :class:`PromptVector` and the
:class:`Recipe` they carry.

They hold plain float tensors and the PEFT config dict they came with; the arithmetic in
:mod:`composer.ops` returns new objects and never mutates its inputs.

Module names are the model's own (``model.layers.0.self_attn.q_proj``); the PEFT file prefix
``base_model.model.`` and the ``.road_theta``/``.road_alpha`` (``.lora_A.weight``/``.lora_B.weight``) suffixes
are added only on disk.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InvalidValueError
from .road_math import VARIANTS, Variant, generator, layer_width

__all__ = ["VARIANTS", "Variant", "Recipe", "RoadAdapter", "LoraAdapter", "PromptVector", "Adapter", "describe",
           "check_finite", "task_vector", "cosine"]
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
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        value = float(t.flatten()[idx])
        raise InvalidValueError(
            f"Tensor '{name}' holds a non-finite value ({value}) at flat index {idx}. "
            "Adapters must be finite; retrain or re-export it.",
            tensor=name, index=idx, value=value,
        )


class _Provenance:
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


@dataclass(frozen=True, eq=False)
class RoadAdapter(_Provenance):
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


@dataclass(frozen=True, eq=False)
class PromptVector(_Provenance):
    """A task prompt vector (PEFT ``PROMPT_TUNING`` + ``prompt_vector.safetensors``).

    ``prompt`` is what PEFT loads; ``init`` is the origin P₀ and ``vector`` is τ = prompt − init. A prompt
    saved without its init can be chatted with but not composed (``init`` and ``vector`` are ``None``).

    Attributes:
        prompt: (virtual tokens x token_dim) usable prompt embeddings.
        init: the origin P₀, same shape, or ``None``.
        vector: τ, same shape, or ``None``.
        config: the PEFT ``adapter_config.json`` contents.
        recipe, source: as for :class:`RoadAdapter`.
    """

    prompt: torch.Tensor
    init: torch.Tensor | None
    vector: torch.Tensor | None
    config: dict[str, Any] = field(default_factory=dict)
    recipe: Recipe | None = None
    source: str | None = None

    kind = "prompt"

    @classmethod
    def from_parts(cls, init: torch.Tensor, vector: torch.Tensor, config: dict[str, Any], *,
                   recipe: Recipe | None = None, source: str | None = None) -> PromptVector:
        """Build from P₀ and τ; the usable prompt is ``init + vector``."""
        return cls(prompt=init + vector, init=init, vector=vector, config=config, recipe=recipe,
                   source=source)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.prompt.shape)  # type: ignore[return-value]

    @property
    def composable(self) -> bool:
        return self.init is not None and self.vector is not None

    def num_parameters(self) -> int:
        return self.prompt.numel()

    def validate(self) -> None:
        check_finite("prompt_embeddings", self.prompt)
        if self.init is not None:
            check_finite("init", self.init)
        if self.vector is not None:
            check_finite("vector", self.vector)

    def task_vectors(self) -> dict[str, torch.Tensor]:
        """Per-virtual-token τ in float64 (the prompt itself when no init was recorded), in token order."""
        v = self.vector if self.vector is not None else self.prompt
        return {f"token_{i}": v[i].double().flatten() for i in range(v.shape[0])}

    def norms(self) -> dict[str, dict[str, float]]:
        v = self.vector if self.vector is not None else self.prompt
        return {f"token_{i}": {"vector": float(v[i].norm())} for i in range(v.shape[0])}

    def __repr__(self) -> str:
        return (f"PromptVector(shape={self.shape}, composable={self.composable}, "
                f"source={self.source!r})")


@dataclass(frozen=True, eq=False)
class LoraAdapter(_Provenance):
    """A LoRA adapter (PEFT ``peft_type: LORA``): per module ``ΔW = s·B·A`` (:mod:`composer.lora_math`).

    Attributes:
        lora_a: module name -> ``lora_A.weight``, shape ``(r, in)``.
        lora_b: module name -> ``lora_B.weight``, shape ``(out, r)``.
        scaling: module name -> ``s`` (``lora_alpha / r``, or ``/ √r`` for rsLoRA; patterns honoured).
        config: the PEFT ``adapter_config.json`` contents (the source of ``r``, ``lora_alpha`` and variants).
        extra: tensors of variants that are stored but not combined (``lora_magnitude_vector`` of DoRA,
            ``lora_B.bias`` of LoRA bias), by their on-disk name without the ``base_model.model.`` prefix.
        recipe, source: as for :class:`RoadAdapter`.
    """

    lora_a: dict[str, torch.Tensor]
    lora_b: dict[str, torch.Tensor]
    scaling: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    recipe: Recipe | None = None
    source: str | None = None

    kind = "lora"

    @property
    def modules(self) -> list[str]:
        return list(self.lora_a)

    @property
    def not_low_rank(self) -> str | None:
        """Why this LoRA's effect is not ``ΔW = s·B·A`` (DoRA, LoRA bias, ...), or ``None`` for a plain LoRA."""
        from .lora_math import not_low_rank

        return not_low_rank(self.config)

    def rank(self, module: str) -> int:
        return int(self.lora_a[module].shape[0])

    def shape(self, module: str) -> tuple[int, int]:
        """``(out, in)`` of the adapted layer."""
        return int(self.lora_b[module].shape[0]), int(self.lora_a[module].shape[1])

    def delta(self, module: str) -> torch.Tensor:
        """``ΔW = s·B·A`` of ``module`` in float64, shape ``(out, in)``."""
        from .lora_math import delta

        return delta(self.lora_a[module], self.lora_b[module], self.scaling[module])

    def num_parameters(self) -> int:
        return sum(t.numel() for d in (self.lora_a, self.lora_b, self.extra) for t in d.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """PEFT state-dict layout: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (+ extras)."""
        out: dict[str, torch.Tensor] = {}
        for m in self.lora_a:
            out[f"base_model.model.{m}.lora_A.weight"] = self.lora_a[m]
            out[f"base_model.model.{m}.lora_B.weight"] = self.lora_b[m]
        for k, t in self.extra.items():
            out[f"base_model.model.{k}"] = t
        return out

    def validate(self) -> None:
        for m in self.lora_a:
            check_finite(f"{m}.lora_A.weight", self.lora_a[m])
            check_finite(f"{m}.lora_B.weight", self.lora_b[m])
        for k, t in self.extra.items():
            check_finite(k, t)

    def task_vectors(self) -> dict[str, torch.Tensor]:
        """Per-module flat ``ΔW`` in float64, sorted by module: what the arithmetic acts on."""
        return {m: self.delta(m).flatten() for m in sorted(self.lora_a)}

    def norms(self) -> dict[str, dict[str, float]]:
        """Per-module ``‖ΔW‖`` (Frobenius norm of ``s·B·A``)."""
        return {m: {"delta": float(self.delta(m).norm())} for m in self.lora_a}

    def __repr__(self) -> str:
        ranks = sorted({self.rank(m) for m in self.lora_a})
        return (f"LoraAdapter(rank={ranks[0] if len(ranks) == 1 else ranks}, modules={len(self.lora_a)}, "
                f"params={self.num_parameters()}, source={self.source!r})")


Adapter = RoadAdapter | LoraAdapter | PromptVector
_LOG_TINY = math.log(1e-30)


def task_vector(adapter: Adapter) -> torch.Tensor:
    """The flat task vector (float64): RoAd generators or LoRA ΔW over sorted modules, or a prompt's τ."""
    return torch.cat(list(adapter.task_vectors().values()))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Cosine similarity of two flat vectors; ``None`` when either is zero (e.g. the identity adapter), where
    the angle is undefined (``hub diff`` and the app both show it as n/a)."""
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return None
    return max(-1.0, min(1.0, float(torch.dot(a.double().flatten(), b.double().flatten())) / (na * nb)))


def describe(adapter: Adapter) -> dict[str, Any]:
    """A JSON-friendly summary (used by ``hub show`` and the app)."""
    d: dict[str, Any] = {
        "kind": adapter.kind,
        "base_model": adapter.base_model,
        "parameters": adapter.num_parameters(),
        "source": adapter.source,
        "recipe": adapter.recipe.to_dict() if adapter.recipe else None,
    }
    if isinstance(adapter, RoadAdapter):
        d.update(variant=adapter.variant, group_size=adapter.group_size,
                 target_modules=sorted({m.rsplit(".", 1)[-1] for m in adapter.theta}),
                 modules=len(adapter.theta))
    elif isinstance(adapter, LoraAdapter):
        cfg = adapter.config
        d.update(r=sorted({adapter.rank(m) for m in adapter.lora_a}), lora_alpha=cfg.get("lora_alpha"),
                 use_rslora=bool(cfg.get("use_rslora", False)),
                 target_modules=sorted({m.rsplit(".", 1)[-1] for m in adapter.lora_a}),
                 modules=len(adapter.lora_a), not_low_rank=adapter.not_low_rank)
    else:
        d.update(num_virtual_tokens=adapter.shape[0], token_dim=adapter.shape[1],
                 composable=adapter.composable)
    d["norms"] = adapter.norms()
    if adapter.recipe is not None and not adapter.recipe.exact:
        dev = adapter.recipe.deviation
        d["deviation"] = None if dev is None or math.isnan(dev) else dev
    return d
