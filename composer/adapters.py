"""Adapter value objects, gathered: :class:`RoadAdapter`, :class:`LoraAdapter`, :class:`PromptVector` (each
defined with its kind in :mod:`composer.kinds`), the :class:`Recipe` they carry (:mod:`composer.provenance`), and
what applies to every kind: the flat task vector, cosines and :func:`describe`.

They hold plain float tensors and the PEFT config dict they came with; the arithmetic in
:mod:`composer.ops` returns new objects and never mutates its inputs.

Module names are the model's own (``model.layers.0.self_attn.q_proj``); the PEFT file prefix
``base_model.model.`` and the ``.road_theta``/``.road_alpha`` (``.lora_A.weight``/``.lora_B.weight``) suffixes
are added only on disk.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import kinds
from .kinds.bottleneck import BottleneckAdapter
from .kinds.ia3 import Ia3Adapter
from .kinds.lora import LoraAdapter
from .kinds.prompt import PromptVector
from .kinds.road import RoadAdapter
from .kinds.stored import StoredAdapter
from .provenance import LIBRARY_VERSION, Recipe, check_finite
from .road_math import VARIANTS, Variant

__all__ = ["VARIANTS", "Variant", "Recipe", "RoadAdapter", "LoraAdapter", "PromptVector", "Ia3Adapter",
           "BottleneckAdapter", "StoredAdapter", "Adapter", "describe", "check_finite", "task_vector", "cosine",
           "LIBRARY_VERSION"]

# For annotations; what counts as an adapter at run time is the registry's (composer.kinds.adapter_classes()).
Adapter = RoadAdapter | LoraAdapter | PromptVector | Ia3Adapter | BottleneckAdapter | StoredAdapter


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
    """A JSON-friendly summary (used by ``hub show`` and the app): what every kind has, then its kind's fields."""
    d: dict[str, Any] = {
        "kind": adapter.kind,
        "base_model": adapter.base_model,
        "parameters": adapter.num_parameters(),
        "source": adapter.source,
        "recipe": adapter.recipe.to_dict() if adapter.recipe else None,
    }
    d.update(kinds.of(adapter).describe(adapter))
    d["norms"] = adapter.norms()
    if adapter.recipe is not None and not adapter.recipe.exact:
        dev = adapter.recipe.deviation
        d["deviation"] = None if dev is None or math.isnan(dev) else dev
    return d
