"""The prompt-vector kind (PEFT ``peft_type: PROMPT_TUNING`` plus ``prompt_vector.safetensors``): task prompt
vectors, whose arithmetic works on τ = P − P₀: the result's prompt is ``P₀ + Σ wᵢ τᵢ`` with P₀ the first input's
init. A prompt saved without its init can be chatted with but not composed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import merge_methods
from ..arith import check_result, inputs
from ..errors import AdapterFormatError, IncompatibleAdaptersError, NotComposableError
from ..folder import PROMPT_VECTOR, WEIGHTS, dimension, peft_reads, read_safetensors
from ..provenance import Provenance, Recipe, check_finite
from .base import Kind


@dataclass(frozen=True, eq=False)
class PromptVector(Provenance):
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


class PromptKind(Kind):
    name = "prompt"
    peft_type = "PROMPT_TUNING"
    adapter_class = PromptVector
    engine_role = "prefix"
    layered = False
    default_lr = 3e-2
    fresh_start = "sample_vocab"

    # ------------------------------------------------------------------------------------------- folders
    def parse(self, folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PromptVector:
        if set(tensors) != {"prompt_embeddings"}:
            extra = sorted(set(tensors) - {"prompt_embeddings"})
            raise AdapterFormatError(
                f"A {self.peft_type} adapter holds exactly 'prompt_embeddings'; found {sorted(tensors)}.",
                path=folder, tensor=extra[0] if extra else "prompt_embeddings")
        prompt = tensors["prompt_embeddings"]
        n = dimension(cfg, "num_virtual_tokens", None, folder) * dimension(cfg, "num_transformer_submodules", 1,
                                                                              folder)
        expected = (n, dimension(cfg, "token_dim", None, folder))
        if tuple(prompt.shape) != expected:
            raise AdapterFormatError(
                f"Tensor 'prompt_embeddings' has shape {tuple(prompt.shape)} but the config says "
                f"num_virtual_tokens x token_dim = {expected}.", path=folder, tensor="prompt_embeddings")
        check_finite("prompt_embeddings", prompt)
        peft_reads(folder, cfg)
        init, vector = read_origin(folder, prompt)
        return self.adapter_class(prompt=prompt, init=init, vector=vector, config=cfg)

    def peft_config(self, adapter: PromptVector, cfg: dict[str, Any]) -> dict[str, Any]:
        cfg.setdefault("task_type", "CAUSAL_LM")
        cfg["num_virtual_tokens"] = adapter.shape[0] // cfg.get("num_transformer_submodules", 1)
        cfg["token_dim"] = adapter.shape[1]
        return cfg

    def files(self, adapter: PromptVector) -> dict[str, dict[str, torch.Tensor] | None]:
        vector = {"init": adapter.init, "vector": adapter.vector} if adapter.composable else None
        return {WEIGHTS: {"prompt_embeddings": adapter.prompt}, PROMPT_VECTOR: vector}

    def from_peft(self, model: Any, adapter_name: str, cfg: dict[str, Any], *, init: torch.Tensor | None,
                  source: str | None) -> PromptVector:
        prompt = model.get_prompt_embedding_to_save(adapter_name).detach().float().cpu().clone()
        if init is None:
            init = getattr(model, "composer_prompt_init", None)
        if init is None:
            return self.adapter_class(prompt=prompt, init=None, vector=None, config=cfg, source=source)
        init = init.detach().float().cpu().clone()
        if init.shape != prompt.shape:
            raise NotComposableError(f"init has shape {tuple(init.shape)}, the prompt {tuple(prompt.shape)}.")
        return self.adapter_class(prompt=prompt, init=init, vector=prompt - init, config=cfg, source=source)

    # ----------------------------------------------------------------------------------------- arithmetic
    def check_usable(self, adapter: PromptVector, name: str) -> None:
        if not adapter.composable:
            raise NotComposableError(
                f"Prompt {name} has no prompt_vector.safetensors (its init P₀ and τ), so it can be chatted "
                "with but not composed. Retrain it with `hub train --kind prompt`, which records the init.")

    def check_pair(self, first: PromptVector, other: PromptVector, names: str, *,
                   same_variant: bool) -> None:
        if other.shape != first.shape:
            raise IncompatibleAdaptersError(
                f"Tensor 'prompt_embeddings' has shape {first.shape} vs {other.shape} "
                f"(virtual tokens x token_dim).",
                field="shape", left=first.shape, right=other.shape, tensor="prompt_embeddings")

    def linear(self, adapters: Sequence[PromptVector], weights: list[float], method: str, params: dict, expr: str,
               op: str | None) -> PromptVector:
        first = adapters[0]
        vector = merge_methods.apply(method, [a.vector for a in adapters], weights, params).to(first.vector.dtype)
        check_result("vector", vector, None, weights)
        recipe = Recipe(expression=expr, inputs=inputs(adapters), weights=tuple(weights), method=op or method,
                        params=params, exact=method == "task_arithmetic")
        return type(first).from_parts(first.init, vector, dict(first.config), recipe=recipe)

    def interpolated(self, a: PromptVector, b: PromptVector, t: float, result: PromptVector) -> PromptVector:
        """Both the origin and τ are interpolated, so the endpoints are the inputs themselves."""
        init = ((1.0 - t) * a.init.double() + t * b.init.double()).to(a.init.dtype)
        return type(a).from_parts(init, result.vector, result.config, recipe=result.recipe)

    def compose(self, a: Any, b: Any, expr: str) -> Any:
        raise NotComposableError("compose() is the exact product of RoAd blocks; prompt vectors have none. "
                                 "Use composer.add(a, b) for τ arithmetic.")

    # ------------------------------------------------------------------------------------------- models
    def check_fits(self, adapter: PromptVector, model: Any, modules: Mapping[str, Any] | None) -> None:
        dim, have = adapter.shape[1], model.get_input_embeddings().embedding_dim
        if dim != have:
            raise IncompatibleAdaptersError(
                f"Tensor 'prompt_embeddings' has token_dim {dim}, the model's embeddings have {have}; was it trained "
                f"on another base model ({adapter.base_model!r})?", field="shape", left=dim, right=have,
                tensor="prompt_embeddings")

    def init_peft(self, model: Any, adapter: PromptVector, adapter_name: str) -> Any:
        """PEFT loads saved prompts frozen; building the model with ``get_peft_model`` keeps it trainable. The
        model carries ``composer_prompt_init`` (P₀), so that :func:`composer.from_peft` recovers τ after training."""
        from peft import PromptTuningConfig, get_peft_model

        if not adapter.composable:
            raise NotComposableError("This prompt has no recorded init (prompt_vector.safetensors), so a new task "
                                     "cannot be initialised from its task vector. Retrain it with hub train.")
        self.check_fits(adapter, model, None)
        n, dim = adapter.shape
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, token_dim=dim)
        peft_model = get_peft_model(model, cfg, adapter_name=adapter_name)
        with torch.no_grad():
            w = peft_model.prompt_encoder[adapter_name].embedding.weight
            w.copy_(adapter.prompt.to(w.dtype))
        peft_model.composer_prompt_init = adapter.init.clone()
        return peft_model

    def new_peft(self, model: Any, options: Mapping[str, Any]) -> Any:
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        # Sampled vocabulary embeddings start the prompt at the scale of real tokens (N(0,1) is far larger).
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=options.get("num_virtual_tokens", 16),
                                 prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
        pm = get_peft_model(model, cfg)
        pm.composer_prompt_init = pm.prompt_encoder["default"].embedding.weight.detach().clone()
        return pm

    # ------------------------------------------------------------------------------------------ showing
    def describe(self, adapter: PromptVector) -> dict[str, Any]:
        return {"num_virtual_tokens": adapter.shape[0], "token_dim": adapter.shape[1],
                "composable": adapter.composable}

    def layer_rows(self, adapter: PromptVector, layer_of: Any) -> list[dict[str, Any]]:
        return [{"layer": i, "norm": n["vector"], "series": "prompt ‖τ‖ per virtual token"}
                for i, (_, n) in enumerate(adapter.norms().items())]


def read_origin(folder: Path, embeddings: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(init, vector)`` from ``prompt_vector.safetensors`` beside a prompt-learning adapter's ``prompt_embeddings``
    (the origin it was trained from and τ = embeddings − origin), each checked: present, of the embeddings' shape,
    finite, and ``init + vector`` equal to the embeddings; ``(None, None)`` when the folder has no such file.

    The one reader of that file: prompt vectors, p-tuning (:mod:`composer.kinds.ptuning`) and prefix tuning
    (:mod:`composer.kinds.prefix`) record their origin in it alike.
    """
    pv = folder / PROMPT_VECTOR
    if not pv.is_file():
        return None, None
    parts = read_safetensors(pv)
    for name in ("init", "vector"):
        if name not in parts:
            raise AdapterFormatError(f"{pv} has no '{name}' tensor (it needs 'init' and 'vector').",
                                     path=pv, tensor=name)
        if parts[name].shape != embeddings.shape:
            raise AdapterFormatError(
                f"Tensor '{name}' in {PROMPT_VECTOR} has shape {tuple(parts[name].shape)}, "
                f"'prompt_embeddings' has {tuple(embeddings.shape)}.", path=pv, tensor=name)
        check_finite(name, parts[name])
    init, vector = parts["init"], parts["vector"]
    total = init + vector
    dtype = torch.promote_types(total.dtype, embeddings.dtype)  # allclose takes one (float16 vs 32 raised)
    if not torch.allclose(total.to(dtype), embeddings.to(dtype), rtol=1e-5, atol=1e-6):
        err = float((total.to(dtype) - embeddings.to(dtype)).abs().max())
        raise AdapterFormatError(
            f"'prompt_embeddings' differs from init + vector by up to {err:.3g}: {PROMPT_VECTOR} does not belong "
            "to this adapter.", path=pv, tensor="prompt_embeddings")
    return init, vector


KIND = PromptKind()
