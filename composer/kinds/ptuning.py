"""The p-tuning kind (PEFT ``peft_type: P_TUNING``, Liu et al. 2021, "GPT Understands, Too"): served per row as
prompt vectors are, composed by τ arithmetic where its origin is recorded.

P-tuning trains an encoder (an MLP, or an LSTM and an MLP) whose output is the virtual tokens' input embeddings.
What PEFT saves is that output, not the encoder (``BasePromptEncoder._get_adapter_state_dict`` →
``get_prompt_embedding_to_save``: the encoder run on the virtual token ids), and loading builds no encoder
(``inference_mode``: ``get_prompt`` returns the saved embeddings)::

    training      ids ─▶ embedding ─▶ MLP / LSTM ─▶ E (num_virtual_tokens × token_dim) ─▶ in front of the prompt
    saved folder  adapter_model.safetensors  prompt_embeddings = E          (the encoder's weights are dropped)
                  prompt_vector.safetensors  init = E₀, vector = E − E₀     (this hub's record of the origin)
    loaded        E ─▶ in front of the prompt                               (exactly a prompt-tuning prompt)

So a p-tuning adapter, once saved, is a prompt: the engine serves it per row as it serves prompt vectors, and
arithmetic on what is saved is τ arithmetic on E, exact as defined (``E = E₀ + Σ wᵢ τᵢ``), where the origin E₀
(the encoder's output before training) is recorded: ``hub train --kind p_tuning`` and ``composer.from_peft(model,
init=E₀)`` record it; a folder PEFT saved elsewhere has none, so its τ is unknown and arithmetic refuses it.
Inputs must share their origin (the same ``--seed`` and base model give the same encoder at step 0); arithmetic on
the encoder's weights is not offered: PEFT does not save them, and through the nonlinearity it would not be
arithmetic on E anyway. Training cannot start from a p-tuning adapter (``composer.init``): no encoder can be set to
output a given E.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..arith import check_same_origin
from ..errors import NotComposableError
from .prompt import PromptKind, PromptVector


@dataclass(frozen=True, eq=False)
class PTuningVector(PromptVector):
    """A p-tuning adapter: the encoder's output ``prompt`` (what PEFT saves and serves), its recorded origin ``init``
    (the encoder's output before training) and ``vector`` = τ (see :class:`PromptVector`)."""

    kind = "p_tuning"

    def __repr__(self) -> str:
        return f"PTuningVector(shape={self.shape}, composable={self.composable}, source={self.source!r})"


class PTuningKind(PromptKind):
    """PEFT's p-tuning: read, written, served and composed as a prompt vector, with the differences above."""

    name = "p_tuning"
    peft_type = "P_TUNING"
    adapter_class = PTuningVector
    default_lr = 1e-2
    fresh_start = "peft (MLP encoder, the run's seed)"

    def check_usable(self, adapter: PTuningVector, name: str) -> None:
        if not adapter.composable:
            raise NotComposableError(
                f"P-tuning adapter {name} records no origin (prompt_vector.safetensors: the encoder's output before "
                "training), so its task vector τ = E − E₀ is unknown and it cannot be composed; it can still be "
                "served as it is. Train it with `hub train --kind p_tuning`, or save it with composer.from_peft(model, "
                "init=E0), E0 = model.get_prompt_embedding_to_save(name) taken before training.")

    def check_pair(self, first: PTuningVector, other: PTuningVector, names: str, *,
                   same_variant: bool) -> None:
        super().check_pair(first, other, names, same_variant=same_variant)
        check_same_origin(first.init, other.init, names, "the encoder's output before training",
                          "train them with the same --seed on the same base model (hub train --kind p_tuning)")

    def interpolated(self, a: PTuningVector, b: PTuningVector, t: float, result: PTuningVector) -> PTuningVector:
        return result  # one origin (check_pair): E₀ + (1 − t)·τ_a + t·τ_b

    def compose(self, a: Any, b: Any, expr: str) -> Any:
        raise NotComposableError("compose() is the exact product of RoAd blocks; p-tuning adapters have none. "
                                 "Use composer.add(a, b) for τ arithmetic.")

    def init_peft(self, model: Any, adapter: PTuningVector, adapter_name: str) -> Any:
        raise NotComposableError(
            "Training cannot start from a p-tuning adapter: PEFT's p-tuning trains an encoder (an MLP or LSTM) whose "
            "output is the prompt, and no encoder can be set to output a given prompt at the first step. Train a "
            "fresh one (hub train --kind p_tuning), or start a prompt vector (--kind prompt) from a prompt vector.")

    def new_peft(self, model: Any, options: Mapping[str, Any]) -> Any:
        """PEFT's p-tuning with its MLP encoder (hidden width the model's, unless ``encoder_hidden_size``); the model
        carries ``composer_prompt_init``, the encoder's output before training (the origin E₀)."""
        from peft import PromptEncoderConfig, get_peft_model

        width = options.get("encoder_hidden_size") or model.get_input_embeddings().embedding_dim
        cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=options.get("num_virtual_tokens", 16),
                                  encoder_hidden_size=width)
        pm = get_peft_model(model, cfg)
        with torch.no_grad():
            pm.composer_prompt_init = pm.get_prompt_embedding_to_save("default").float().clone()
        return pm

    def describe(self, adapter: PTuningVector) -> dict[str, Any]:
        return {**super().describe(adapter), "served_per_row": True}


KIND = PTuningKind()
