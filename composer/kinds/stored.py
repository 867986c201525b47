"""Every other PEFT type, stored as it is: IA³, LoHa, LoKr, OFT, BOFT, VeRA, FourierFT, AdaLoRA, prefix tuning,
p-tuning and the rest of what ``PeftModel.from_pretrained`` loads. Versioning needs no arithmetic, so these are
pushed, pulled, tagged, diffed (parameter by parameter), shown and served to HF clients like the kinds this hub
composes; arithmetic and the engine's per-row serving refuse them with the reason.

Checked without the base model (PEFT's own loader needs the model for the rest): PEFT's own config class reads
the config; every tensor is named as PEFT saves this type (``base_model.model.<module>.<type prefix>…`` for layer
adapters, plus shared ``base_model.<type prefix>…`` tensors such as VeRA's projections; ``prompt_embeddings`` alone
for prompt-learning types, of ``num_virtual_tokens`` rows); each adapted module is one the config's
``target_modules`` selects (PEFT's own matching) and each listed target has tensors; float dtypes, finite values,
the size limits and no pickles (as for every folder). Not checked without the model: that the tensors' shapes
fit the model's layers.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFormatError
from ..folder import CONFIG, PREFIX, WEIGHTS, check_targets, peft_reads
from ..provenance import Provenance, Recipe, check_finite
from .base import Kind


@dataclass(frozen=True, eq=False)
class StoredAdapter(Provenance):
    """An adapter of a PEFT type this hub stores but does not combine (``kind`` is the type, e.g. ``ia3``).

    Attributes:
        peft_type: PEFT's ``peft_type`` (``IA3``, ``LOHA``, ...).
        tensors: the safetensors contents by their on-disk names.
        config: the PEFT ``adapter_config.json`` contents.
        recipe, source: as for every adapter.
    """

    peft_type: str
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    recipe: Recipe | None = None
    source: str | None = None

    @property
    def kind(self) -> str:
        return self.peft_type.lower()

    @property
    def modules(self) -> list[str]:
        """The adapted modules (empty for prompt-learning types)."""
        stem = _stem(self.peft_type)
        return sorted({module for module, _ in (_split(k, stem) for k in self.tensors) if module})

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def validate(self) -> None:
        for k, t in self.tensors.items():
            check_finite(k, t)

    def task_vectors(self) -> dict[str, torch.Tensor]:
        """Each stored tensor, flat in float64, by name: what ``hub diff`` compares (parameters, not a task vector
        in the arithmetic's sense: no arithmetic is defined on these types here)."""
        return {k: self.tensors[k].double().flatten() for k in sorted(self.tensors)}

    def norms(self) -> dict[str, dict[str, float]]:
        return {k: {"norm": float(self.tensors[k].double().norm())} for k in sorted(self.tensors)}

    def __repr__(self) -> str:
        return (f"StoredAdapter(peft_type={self.peft_type!r}, tensors={len(self.tensors)}, "
                f"params={self.num_parameters()}, source={self.source!r})")


@functools.cache
def _prefixes() -> dict[str, str]:
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    return {str(getattr(t, "value", t)): p for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items()}


def _stem(peft_type: str) -> str:
    """The start every parameter name of this type has (``ia3_``, ``hada_``, ``vera_`` ...)."""
    prefix = _prefixes().get(peft_type, "")
    return prefix.split("_", 1)[0] + "_" if prefix else ""


def _split(key: str, stem: str) -> tuple[str | None, str | None]:
    """``(module, parameter)`` of a layer tensor ``base_model.model.<module>.<stem…>``, ``(None, name)`` of a shared
    ``base_model.<stem…>`` tensor, ``(None, None)`` for anything else."""
    if key.startswith(PREFIX):
        parts = key[len(PREFIX):].split(".")
        for i, part in enumerate(parts):
            if i and part.startswith(stem):
                return ".".join(parts[:i]), ".".join(parts[i:])
        return None, None
    name = key.removeprefix("base_model.")
    if name != key and name.startswith(stem) and "." not in name:
        return None, name
    return None, None


class StoredKind(Kind):
    """The registry's fallback for a ``peft_type`` PEFT knows and no kind module here handles."""

    name = "stored"
    peft_type = "*"
    adapter_class = StoredAdapter
    engine_role = None
    layered = False

    def accepts(self, peft_type: str) -> bool:
        return peft_type in _prefixes()

    def parse(self, folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> StoredAdapter:
        peft_type = cfg["peft_type"]
        pcfg = peft_reads(folder, cfg)
        if not tensors:
            raise AdapterFormatError(f"{folder / WEIGHTS} holds no tensors.", path=folder)
        if getattr(pcfg, "is_prompt_learning", False):
            _check_prompt(folder, cfg, tensors)
        else:
            stem = _stem(peft_type)
            modules: dict[str, list[str]] = {}
            for key in sorted(tensors):
                module, param = _split(key, stem)
                if param is None:
                    raise AdapterFormatError(
                        f"Unexpected tensor '{key}' in a {peft_type} adapter: PEFT saves this type's tensors as "
                        f"'{PREFIX}<module>.{stem}…' (or shared 'base_model.{stem}…'); it would not load this one.",
                        path=folder, tensor=key)
                if module is not None:
                    modules.setdefault(module, []).append(param)
            if not modules:
                raise AdapterFormatError(f"{folder / WEIGHTS} holds no per-module {peft_type} tensors.", path=folder)
            if cfg.get("target_modules") is not None:
                first = sorted(modules)[0]
                check_targets(folder, cfg, sorted(modules), suffix=modules[first][0])
        for k, t in tensors.items():
            check_finite(k, t)
        return StoredAdapter(peft_type=peft_type, tensors=dict(tensors), config=cfg)

    def peft_config(self, adapter: StoredAdapter, cfg: dict[str, Any]) -> dict[str, Any]:
        cfg["peft_type"] = adapter.peft_type
        return cfg

    def files(self, adapter: StoredAdapter) -> dict[str, dict[str, torch.Tensor] | None]:
        return {WEIGHTS: adapter.tensors}

    def from_peft(self, model: Any, adapter_name: str, cfg: dict[str, Any], *, init: torch.Tensor | None,
                  source: str | None) -> StoredAdapter:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        tensors = {k: v.detach().float().cpu().clone() for k, v in state.items()}
        return StoredAdapter(peft_type=cfg["peft_type"], tensors=tensors, config=cfg, source=source)

    def describe(self, adapter: StoredAdapter) -> dict[str, Any]:
        modules = adapter.modules
        return {"peft_type": adapter.peft_type, "tensors": len(adapter.tensors),
                "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}), "modules": len(modules),
                "composable": False, "served_per_row": False}

    def label(self, adapter: StoredAdapter) -> str:
        return f"{adapter.kind} (stored only)"

    def layer_rows(self, adapter: StoredAdapter, layer_of: Mapping[str, Any] | Any) -> list[dict[str, Any]]:
        return []


def _check_prompt(folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterFormatError(
            f"A {cfg['peft_type']} adapter holds exactly 'prompt_embeddings'; found {sorted(tensors)[:5]}.",
            path=folder, tensor=sorted(set(tensors) - {"prompt_embeddings"} or {"prompt_embeddings"})[0])
    t = tensors["prompt_embeddings"]
    rows = cfg.get("num_virtual_tokens")
    subs = cfg.get("num_transformer_submodules") or 1
    if t.dim() != 2 or (isinstance(rows, int) and isinstance(subs, int) and t.shape[0] not in (rows, rows * subs)):
        raise AdapterFormatError(
            f"Tensor 'prompt_embeddings' has shape {tuple(t.shape)}; {CONFIG} says {rows} virtual tokens "
            f"({subs} transformer submodule(s)).", path=folder, tensor="prompt_embeddings")


KIND = StoredKind()
