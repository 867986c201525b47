"""The LoRA kind (PEFT ``peft_type: LORA``): the adapter class, its folder format, arithmetic on ``ΔW = s·B·A``
(:mod:`composer.lora_math`), PEFT models and what ``hub show``/the app say of it.

A weighted sum concatenates the ranks, with each input's ``wᵢ·sᵢ`` folded into its ``B`` block, so it is exact;
the result is a plain PEFT LoRA with ``lora_alpha = r`` (``s = 1``). :meth:`LoraKind.compress` truncates the rank
by SVD and reports the error it makes; TIES/DARE act on the dense ``ΔW`` and are re-factored by SVD
(approximate). LoRA variants whose effect is not ``s·B·A`` (DoRA, LoRA bias, ...) are stored and served as they
are, and refused by the arithmetic with the reason.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import lora_math, merge_methods
from ..arith import check_result, inputs, label
from ..errors import AdapterFormatError, IncompatibleAdaptersError, NotComposableError
from ..expr import format_compress
from ..folder import CONFIG, PREFIX, WEIGHTS, check_targets, dimension, number
from ..provenance import Provenance, Recipe, check_finite
from .base import Kind, linear_layer, linear_targets


@dataclass(frozen=True, eq=False)
class LoraAdapter(Provenance):
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
        return lora_math.not_low_rank(self.config)

    def rank(self, module: str) -> int:
        return int(self.lora_a[module].shape[0])

    def shape(self, module: str) -> tuple[int, int]:
        """``(out, in)`` of the adapted layer."""
        return int(self.lora_b[module].shape[0]), int(self.lora_a[module].shape[1])

    def delta(self, module: str) -> torch.Tensor:
        """``ΔW = s·B·A`` of ``module`` in float64, shape ``(out, in)``."""
        return lora_math.delta(self.lora_a[module], self.lora_b[module], self.scaling[module])

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


_LORA_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b", ".lora_B.bias": "bias",
                  ".lora_magnitude_vector": "magnitude"}
# Variant tensors: stored and round-tripped, required exactly when the config field says so.
_LORA_EXTRA = {"bias": "lora_bias", "magnitude": "use_dora"}


class LoraKind(Kind):
    name = "lora"
    peft_type = "LORA"
    adapter_class = LoraAdapter
    engine_role = "weight"
    default_lr = 1e-3
    fresh_start = "peft (B = 0)"

    # ------------------------------------------------------------------------------------------- folders
    def parse(self, folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LoraAdapter:
        dimension(cfg, "r", 8, folder)
        number(cfg, "lora_alpha", 8, folder)
        for key in ("rank_pattern", "alpha_pattern"):
            pattern = cfg.get(key) or {}
            if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
                raise AdapterFormatError(f"{CONFIG}: {key} must map module names to numbers, got "
                                         f"{str(pattern)[:80]!r}.", path=folder)
            for k in pattern:
                (dimension if key == "rank_pattern" else number)(pattern, k, None, folder)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key in sorted(tensors):
            suffix = next((x for x in _LORA_SUFFIXES if key.endswith(x)), None)
            if not key.startswith(PREFIX) or suffix is None:
                raise AdapterFormatError(
                    f"Unexpected tensor '{key}' in a LORA adapter: expected '{PREFIX}<module>.lora_A.weight' / "
                    "'.lora_B.weight' only (plus '.lora_B.bias' with lora_bias, '.lora_magnitude_vector' with "
                    "use_dora). LoRA on embeddings or convolutions (lora_embedding_A/B), modules_to_save and "
                    "trainable tokens are not supported yet.", path=folder, tensor=key)
            what = _LORA_SUFFIXES[suffix]
            flag = _LORA_EXTRA.get(what)
            if flag is not None and not cfg.get(flag):
                raise AdapterFormatError(
                    f"Tensor '{key}' is a {flag} tensor, but {CONFIG} does not set {flag}: PEFT would not load it. "
                    f"Set \"{flag}\": true or remove the tensor.", path=folder, tensor=key)
            parts.setdefault(key[len(PREFIX):-len(suffix)], {})[what] = tensors[key]
        if not parts:
            raise AdapterFormatError(f"{folder / WEIGHTS} holds no LoRA tensors.", path=folder)
        lora_a, lora_b, scaling, extra = {}, {}, {}, {}
        for m, p in parts.items():
            for what, name in (("a", "lora_A.weight"), ("b", "lora_B.weight")):
                if what not in p:
                    raise AdapterFormatError(f"Module '{m}' has no {name} tensor; a LoRA module needs both lora_A and "
                                             "lora_B.", path=folder, tensor=f"{m}.{name}")
            a, b = p["a"], p["b"]
            try:
                r, s = lora_math.rank_and_scale(cfg, m)
            except re.error as e:
                raise AdapterFormatError(f"{CONFIG}: a key of rank_pattern / alpha_pattern is not a valid regular "
                                         f"expression ({e}).", path=folder) from e
            if a.dim() != 2 or b.dim() != 2:
                raise AdapterFormatError(
                    f"Tensor '{m}.lora_A.weight' has shape {tuple(a.shape)} and '{m}.lora_B.weight' {tuple(b.shape)}; "
                    "both must be 2-D (A: r x in_features, B: out_features x r).", path=folder,
                    tensor=f"{m}.lora_A.weight")
            if a.shape[0] != r or b.shape[1] != r:
                bad, shape = (("lora_A.weight", tuple(a.shape)) if a.shape[0] != r
                              else ("lora_B.weight", tuple(b.shape)))
                raise AdapterFormatError(
                    f"Tensor '{m}.{bad}' has shape {shape}, but the config gives this module rank r = {r} "
                    "(A must be r x in_features, B out_features x r); PEFT would refuse to load it. Fix r / "
                    "rank_pattern or re-save the adapter with PEFT.", path=folder, tensor=f"{m}.{bad}")
            for what, name in (("bias", "lora_B.bias"), ("magnitude", "lora_magnitude_vector")):
                if cfg.get(_LORA_EXTRA[what]):
                    t = p.get(what)
                    if t is None or tuple(t.shape) != (b.shape[0],):
                        got = "is missing" if t is None else f"has shape {tuple(t.shape)}"
                        raise AdapterFormatError(
                            f"Tensor '{m}.{name}' {got}; with {_LORA_EXTRA[what]} it must be 1-D of out_features "
                            f"{b.shape[0]}.", path=folder, tensor=f"{m}.{name}")
                    check_finite(f"{m}.{name}", t)
                    extra[f"{m}.{name}"] = t
            check_finite(f"{m}.lora_A.weight", a)
            check_finite(f"{m}.lora_B.weight", b)
            lora_a[m], lora_b[m], scaling[m] = a, b, s
        check_targets(folder, cfg, sorted(lora_a), suffix="lora_A.weight")
        return LoraAdapter(lora_a=lora_a, lora_b=lora_b, scaling=scaling, config=cfg, extra=extra)

    def peft_config(self, adapter: LoraAdapter, cfg: dict[str, Any]) -> dict[str, Any]:
        cfg.setdefault("task_type", None)
        if not cfg.get("target_modules") or not isinstance(cfg.get("target_modules"), (list, str)):
            cfg["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in adapter.lora_a})
        elif isinstance(cfg["target_modules"], list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
        return cfg

    def files(self, adapter: LoraAdapter) -> dict[str, dict[str, torch.Tensor] | None]:
        return {WEIGHTS: adapter.tensors()}

    def from_peft(self, model: Any, adapter_name: str, cfg: dict[str, Any], *, init: torch.Tensor | None,
                  source: str | None) -> LoraAdapter:
        lora_a, lora_b, scaling, extra = {}, {}, {}, {}
        for name, module in model.base_model.model.named_modules():
            if adapter_name in getattr(module, "lora_A", {}) and isinstance(module.lora_A[adapter_name],
                                                                            torch.nn.Linear):
                lora_a[name] = module.lora_A[adapter_name].weight.detach().float().cpu().clone()
                lora_b[name] = module.lora_B[adapter_name].weight.detach().float().cpu().clone()
                scaling[name] = float(module.scaling[adapter_name])
                if module.lora_B[adapter_name].bias is not None:
                    extra[f"{name}.lora_B.bias"] = module.lora_B[adapter_name].bias.detach().float().cpu().clone()
                mag = getattr(module, "lora_magnitude_vector", {})
                if adapter_name in mag:
                    extra[f"{name}.lora_magnitude_vector"] = mag[adapter_name].weight.detach().float().cpu().clone()
        return LoraAdapter(lora_a=lora_a, lora_b=lora_b, scaling=scaling, config=cfg, extra=extra, source=source)

    # ----------------------------------------------------------------------------------------- arithmetic
    def check_usable(self, adapter: LoraAdapter, name: str) -> None:
        if adapter.not_low_rank:
            raise NotComposableError(
                f"{name} cannot enter LoRA arithmetic ({adapter.not_low_rank}). The store keeps and serves it as "
                "it is (hub pull, hub serve, PeftModel.from_pretrained); only plain LoRAs (ΔW = s·B·A) are combined, "
                "exactly.")

    def check_pair(self, first: LoraAdapter, other: LoraAdapter, names: str, *,
                   same_variant: bool) -> None:
        for m in first.lora_a:
            if m in other.lora_a and first.shape(m) != other.shape(m):
                raise IncompatibleAdaptersError(
                    f"Layer '{m}' is {first.shape(m)[0]} x {first.shape(m)[1]} (out x in) in the first adapter and "
                    f"{other.shape(m)[0]} x {other.shape(m)[1]} in the second ({names}): tensor "
                    f"'{m}.lora_B.weight' has shape {tuple(first.lora_b[m].shape)} vs "
                    f"{tuple(other.lora_b[m].shape)}.", field="shape", left=first.shape(m),
                    right=other.shape(m), tensor=f"{m}.lora_B.weight")

    def linear(self, adapters: Sequence[LoraAdapter], weights: list[float], method: str, params: dict, expr: str,
               op: str | None) -> LoraAdapter:
        """Task arithmetic by rank concatenation (exact); TIES/DARE on the dense ΔW, re-factored by SVD at the
        inputs' summed rank (approximate: the heuristic itself, and the truncation error in ``deviation``)."""
        lora_a, lora_b = {}, {}
        dtype = adapters[0].lora_a[next(iter(adapters[0].lora_a))].dtype
        cut = total = 0.0
        for m in modules_of(adapters):
            have = [(a, w) for a, w in zip(adapters, weights) if m in a.lora_a]
            if method == "task_arithmetic":
                lora_a[m], lora_b[m] = lora_math.concat([(a.lora_a[m], a.lora_b[m], w * a.scaling[m])
                                                         for a, w in have], dtype=dtype)
            else:
                out, inp = have[0][0].shape(m)
                deltas = [a.delta(m) if m in a.lora_a else torch.zeros(out, inp, dtype=torch.float64)
                          for a in adapters]
                dw = merge_methods.apply(method, deltas, weights, params)
                rank = sum(a.rank(m) for a, _ in have)
                lora_a[m], lora_b[m], err = lora_math.factor(dw, rank, dtype)
                norm2 = float(dw.square().sum())
                cut, total = cut + err * err * norm2, total + norm2
            _check(m, lora_a[m], lora_b[m], weights)
        heuristic = method != "task_arithmetic"
        recipe = Recipe(expression=expr, inputs=inputs(adapters), weights=tuple(weights), method=op or method,
                        params=params, exact=not heuristic,
                        deviation=(math.sqrt(cut / total) if total > 0 else 0.0) if heuristic else None)
        return result_like(adapters[0], adapters, lora_a, lora_b, recipe)

    def compose(self, a: Any, b: Any, expr: str) -> Any:
        raise NotComposableError("compose() is the exact product of RoAd blocks; LoRAs on the same weights have "
                                 "none: applying both is their sum. Use composer.add(a, b), which is exact.")

    def compress(self, a: LoraAdapter, rank: int) -> LoraAdapter:
        a.validate()
        self.check_usable(a, label(a, 0))
        lora_a, lora_b, errors = {}, {}, {}
        cut = total = 0.0
        for m in a.lora_a:
            lora_a[m], lora_b[m], err = lora_math.truncate(a.lora_a[m], a.lora_b[m], rank, a.scaling[m])
            errors[m] = err
            norm2 = float(a.delta(m).square().sum())
            cut, total = cut + err * err * norm2, total + norm2
        exact = all(e == 0.0 for e in errors.values()) and all(a.rank(m) <= rank for m in a.lora_a)
        recipe = Recipe(expression=format_compress(label(a, 0), rank), inputs=inputs([a]), weights=(),
                        method="compress", params={"rank": rank, "errors": errors}, exact=exact,
                        deviation=None if exact else (math.sqrt(cut / total) if total > 0 else 0.0))
        return result_like(a, [a], lora_a, lora_b, recipe)

    # ------------------------------------------------------------------------------------------- models
    def check_fits(self, adapter: LoraAdapter, model: Any, modules: Mapping[str, Any] | None) -> None:
        modules = dict(model.named_modules()) if modules is None else modules
        for m in adapter.lora_a:
            layer = linear_layer(modules, m, adapter, "LoRA", f"{m}.lora_A.weight")
            out, inp = adapter.shape(m)
            if (layer.out_features, layer.in_features) != (out, inp):
                raise IncompatibleAdaptersError(
                    f"LoRA module '{m}' is for a {out} x {inp} layer (out x in; '{m}.lora_B.weight' "
                    f"{tuple(adapter.lora_b[m].shape)}, '{m}.lora_A.weight' {tuple(adapter.lora_a[m].shape)}), the "
                    f"model's layer is {layer.out_features} x {layer.in_features}; was it trained on another base "
                    f"model ({adapter.base_model!r})?", field="shape", left=(out, inp),
                    right=(layer.out_features, layer.in_features), tensor=f"{m}.lora_B.weight")

    def init_peft(self, model: Any, adapter: LoraAdapter, adapter_name: str) -> Any:
        """A trainable LoRA of the adapter's (largest) rank with ``lora_alpha = r`` (``s = 1``), its factors the
        adapter's with each module's ``s`` folded into ``B`` (smaller ranks zero-padded), so the start equals it.
        DoRA, LoRA bias ...: a start that is not ``ΔW = s·B·A`` is refused with the reason."""
        from peft import LoraConfig, get_peft_model

        adapter.validate()
        self.check_usable(adapter, label(adapter, 0))
        modules = dict(model.named_modules())
        self.check_fits(adapter, model, modules)
        r = max(adapter.rank(m) for m in adapter.lora_a)
        cfg = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(adapter.lora_a), lora_dropout=0.0)
        peft_model = get_peft_model(model, cfg, adapter_name=adapter_name)
        with torch.no_grad():
            for name, mod in peft_model.base_model.model.named_modules():
                if name in adapter.lora_a and adapter_name in getattr(mod, "lora_A", {}):
                    a, b = lora_math.pad_rank(adapter.lora_a[name], adapter.lora_b[name] * adapter.scaling[name], r)
                    mod.lora_A[adapter_name].weight.copy_(a)
                    mod.lora_B[adapter_name].weight.copy_(b)
        return peft_model

    def new_peft(self, model: Any, options: Mapping[str, Any]) -> Any:
        from peft import LoraConfig, get_peft_model

        rank, alpha, targets = options.get("rank", 8), options.get("lora_alpha"), options.get("target_modules")
        # PEFT's own initialisation: A random, B = 0, so training starts exactly at the base model.
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=0.0,
                         target_modules=list(targets) if targets else None)
        linear_targets(model, cfg, "this hub trains, composes and serves LoRA on nn.Linear layers only")
        return get_peft_model(model, cfg)

    # ------------------------------------------------------------------------------------------ showing
    def describe(self, adapter: LoraAdapter) -> dict[str, Any]:
        cfg = adapter.config
        return {"r": sorted({adapter.rank(m) for m in adapter.lora_a}), "lora_alpha": cfg.get("lora_alpha"),
                "use_rslora": bool(cfg.get("use_rslora", False)),
                "target_modules": sorted({m.rsplit(".", 1)[-1] for m in adapter.lora_a}),
                "modules": len(adapter.lora_a), "not_low_rank": adapter.not_low_rank}

    def label(self, adapter: LoraAdapter) -> str:
        ranks = sorted({adapter.rank(m) for m in adapter.lora_a})
        extra = ", DoRA" if adapter.config.get("use_dora") else (", not combinable" if adapter.not_low_rank else "")
        return f"lora (r={ranks[0] if len(ranks) == 1 else '/'.join(map(str, ranks))}{extra})"

    def layer_rows(self, adapter: LoraAdapter, layer_of: Any) -> list[dict[str, Any]]:
        acc: dict[int, float] = {}
        for m, n in adapter.norms().items():
            layer = layer_of(m)
            acc[layer] = acc.get(layer, 0.0) + n["delta"] ** 2
        return [{"layer": layer, "norm": math.sqrt(v), "series": "LoRA ‖ΔW‖"} for layer, v in sorted(acc.items())]


def modules_of(adapters: Sequence[LoraAdapter]) -> list[str]:
    """The union of the adapters' modules, in first-seen order."""
    return list(dict.fromkeys(m for a in adapters for m in a.lora_a))


def result_like(template: LoraAdapter, adapters: Sequence[LoraAdapter], lora_a: dict, lora_b: dict,
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


def _check(m: str, a: torch.Tensor, b: torch.Tensor, weights: list[float]) -> None:
    check_result(f"{m}.lora_A.weight", a, None, weights)
    check_result(f"{m}.lora_B.weight", b, None, weights)


KIND = LoraKind()
