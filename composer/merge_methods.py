"""Merge methods on task vectors, looked up by name.

Each method takes a list of same-shaped task-vector tensors, a weight per tensor and its parameters, and
returns one tensor. TIES and DARE are PEFT's own, well-kept primitives (``peft.utils.merge_utils``); we only
fix the random state for DARE so a merge is reproducible from its recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from peft.utils import merge_utils


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: ``fn(tensors, weights, density)``; ``needs_density``; ``random`` (uses the seed)."""

    name: str
    fn: Callable[[list[torch.Tensor], torch.Tensor, float | None], torch.Tensor]
    needs_density: bool
    random: bool
    summary: str


def _task_arithmetic(ts: list[torch.Tensor], w: torch.Tensor, density: float | None) -> torch.Tensor:
    return merge_utils.task_arithmetic(ts, w)


def _ties(ts: list[torch.Tensor], w: torch.Tensor, density: float | None) -> torch.Tensor:
    return merge_utils.ties(ts, w, density, majority_sign_method="total")


def _dare_linear(ts: list[torch.Tensor], w: torch.Tensor, density: float | None) -> torch.Tensor:
    return merge_utils.dare_linear(ts, w, density)


def _dare_ties(ts: list[torch.Tensor], w: torch.Tensor, density: float | None) -> torch.Tensor:
    return merge_utils.dare_ties(ts, w, density, majority_sign_method="total")


METHODS: dict[str, MergeMethod] = {
    m.name: m for m in (
        MergeMethod("task_arithmetic", _task_arithmetic, False, False, "Σ wᵢ·τᵢ (exact for road_1 and prompts)"),
        MergeMethod("ties", _ties, True, False, "trim to the top density by magnitude, elect signs, disjoint mean"),
        MergeMethod("dare_linear", _dare_linear, True, True, "drop with p = 1 − density, rescale, weighted sum"),
        MergeMethod("dare_ties", _dare_ties, True, True, "DARE drop-and-rescale, then TIES sign election"),
    )
}


def apply(method: str, tensors: list[torch.Tensor], weights: list[float], *, density: float | None,
          seed: int | None) -> torch.Tensor:
    """Run merge ``method`` over ``tensors`` (computed in float64, returned in the inputs' dtype)."""
    m = METHODS[method]
    dtype = tensors[0].dtype
    w = torch.tensor(weights, dtype=torch.float64)
    ts = [t.double() for t in tensors]
    if m.random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else seed)
            out = m.fn(ts, w, density)
    else:
        out = m.fn(ts, w, density)
    return out.to(dtype)
