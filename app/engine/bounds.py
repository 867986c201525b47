"""The engine's bound on how much a mix may scale a layer's output, one for every kind.

A finite but enormous adapter (RoAd/IA³ scales α = 1e30, a LoRA whose ``s·B·A`` is 1e8 times its layer) overflows
the activations or drowns the base model: every reply came out empty or garbled, with no message. The engine
refuses such a mix when it builds its tables, with the reason:

- RoAd / IA³ (output kinds): ``max |α|`` is the factor a layer's output is scaled by;
- LoRA: ``‖s·B·A‖_F / ‖W‖_F``, the size of the change relative to the layer it adds to (the output of ``W + ΔW``
  is at most ``1 + ratio`` times the layer's own, in the Frobenius sense).

Trained adapters stay far inside: RoAd α near 1, the shipped LoRAs change a layer by at most 0.06 of its weight
(``lora_signoff`` 0.059, ``lora_json`` 0.048 on SmolLM2-135M-Instruct). Measured on ``lora_signoff`` scaled up:
replies degrade from a ratio near 6, stay non-empty up to 1e5 and come out empty from about 1e7.
"""

from __future__ import annotations

import torch

MAX_SCALE = 1e4
"""The largest output scale the engine serves: |α| of RoAd/IA³, ‖s·B·A‖/‖W‖ of a LoRA."""


def lora_ratio(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, weight: torch.Tensor) -> float:
    """``‖s·B·A‖_F / ‖W‖_F`` without forming ``B·A``: ``‖B·A‖_F² = Σ (BᵀB) ⊙ (A·Aᵀ)``, two ``r × r`` Gram
    matrices (in float64, so enormous factors give a large or infinite ratio, never NaN from an overflow)."""
    a, b = lora_a.detach().double(), lora_b.detach().double()
    delta = float(((b.t() @ b) * (a @ a.t())).sum().clamp_min(0).sqrt()) * abs(float(scaling))
    base = float(torch.linalg.vector_norm(weight.detach(), dtype=torch.float64))
    if delta == 0:
        return 0.0
    return delta / base if base > 0 else float("inf")
