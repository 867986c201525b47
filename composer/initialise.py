"""Composed initialisation: a trainable PEFT model whose adapter starts from a composition, and the one
check that an adapter fits a model (:func:`check_fits`, also what the app's engine asks)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .adapters import Adapter, LoraAdapter, PromptVector, RoadAdapter
from .errors import IncompatibleAdaptersError, NotComposableError


def _road_config(adapter: RoadAdapter, linear_names: set[str] | None = None) -> Any:
    from peft import RoadConfig

    targets = sorted({m.rsplit(".", 1)[-1] for m in adapter.theta})
    if linear_names is not None and {n for n in linear_names if n.rsplit(".", 1)[-1] in targets} != set(adapter.theta):
        targets = sorted(adapter.theta)  # the adapter covers only some layers: name them exactly
    return RoadConfig(variant=adapter.variant, group_size=adapter.group_size, target_modules=targets)


def _linear(modules: Mapping[str, Any], m: str, adapter: Adapter, what: str, tensor: str) -> torch.nn.Linear:
    """The model's ``nn.Linear`` named ``m``, or the error saying the adapter does not fit this model."""
    layer = modules.get(m)
    if not isinstance(layer, torch.nn.Linear):
        example = next((n for n, x in modules.items() if isinstance(x, torch.nn.Linear)), "?")
        raise IncompatibleAdaptersError(
            f"Module '{m}' of the {what} is not a Linear layer of this model (e.g. '{example}'); was it "
            f"trained on another base model ({adapter.base_model!r})?",
            field="modules", left=m, right=None, tensor=tensor)
    return layer


def check_fits(adapter: Adapter, model: Any, *, modules: Mapping[str, Any] | None = None) -> None:
    """Raise unless ``adapter`` can run on ``model``: every RoAd module is an ``nn.Linear`` of the model with
    the adapter's width, every LoRA module one with the adapter's ``out x in`` shape, or a prompt's
    ``token_dim`` equals the model's embedding width.

    Args:
        adapter: a RoAd adapter or prompt vector.
        model: a ``transformers`` model (or any ``nn.Module`` with ``get_input_embeddings`` for prompts).
        modules: ``dict(model.named_modules())`` when the caller already has it (the engine keeps one).

    Raises:
        IncompatibleAdaptersError: naming the module (or ``prompt_embeddings``), both widths and the base model
            the adapter was trained on.
    """
    if isinstance(adapter, RoadAdapter):
        modules = dict(model.named_modules()) if modules is None else modules
        for m in adapter.theta:
            layer = _linear(modules, m, adapter, "adapter", f"{m}.road_theta")
            if layer.out_features != adapter.width(m):
                raise IncompatibleAdaptersError(
                    f"Tensor '{m}.road_theta' is for width {adapter.width(m)}, the model's layer has "
                    f"{layer.out_features} outputs; was it trained on another base model ({adapter.base_model!r})?",
                    field="shape", left=adapter.width(m), right=layer.out_features, tensor=f"{m}.road_theta")
        return
    if isinstance(adapter, LoraAdapter):
        modules = dict(model.named_modules()) if modules is None else modules
        for m in adapter.lora_a:
            layer = _linear(modules, m, adapter, "LoRA", f"{m}.lora_A.weight")
            out, inp = adapter.shape(m)
            if (layer.out_features, layer.in_features) != (out, inp):
                raise IncompatibleAdaptersError(
                    f"LoRA module '{m}' is for a {out} x {inp} layer (out x in; '{m}.lora_B.weight' "
                    f"{tuple(adapter.lora_b[m].shape)}, '{m}.lora_A.weight' {tuple(adapter.lora_a[m].shape)}), the "
                    f"model's layer is {layer.out_features} x {layer.in_features}; was it trained on another base "
                    f"model ({adapter.base_model!r})?", field="shape", left=(out, inp),
                    right=(layer.out_features, layer.in_features), tensor=f"{m}.lora_B.weight")
        return
    dim, have = adapter.shape[1], model.get_input_embeddings().embedding_dim
    if dim != have:
        raise IncompatibleAdaptersError(
            f"Tensor 'prompt_embeddings' has token_dim {dim}, the model's embeddings have {have}; was it trained "
            f"on another base model ({adapter.base_model!r})?", field="shape", left=dim, right=have,
            tensor="prompt_embeddings")


def init(model: Any, adapter_or_expression: Adapter | str, *, resolve: Callable[[str], Adapter] | None = None,
         adapter_name: str = "default") -> Any:
    """Wrap ``model`` in a trainable ``PeftModel`` whose adapter starts from a composition.

    Args:
        model: a ``transformers`` causal LM (not yet wrapped by PEFT).
        adapter_or_expression: an adapter, or an expression for :func:`composer.evaluate`.
        resolve: name resolver for expressions (default: folder paths).
        adapter_name: the PEFT adapter name.

    Returns:
        A ``PeftModel`` in training mode with only the adapter's parameters trainable. For RoAd the angles and
        scales equal the composition's; for prompts the prompt is ``P₀ + Στ`` and the returned model carries
        ``composer_prompt_init`` (P₀), so that :func:`composer.from_peft` recovers τ after training. (PEFT
        loads saved prompts frozen; building the model with ``get_peft_model`` keeps it trainable.)

    Raises:
        IncompatibleAdaptersError: the adapter's modules or widths do not match ``model``.
        NotComposableError: a prompt without its recorded init.
    """
    from peft import PromptTuningConfig, get_peft_model

    from .interpret import evaluate

    adapter = (evaluate(adapter_or_expression, resolve=resolve) if isinstance(adapter_or_expression, str)
               else adapter_or_expression)
    if isinstance(adapter, RoadAdapter):
        modules = dict(model.named_modules())
        check_fits(adapter, model, modules=modules)
        linear = {n for n, mod in modules.items() if isinstance(mod, torch.nn.Linear)}
        peft_model = get_peft_model(model, _road_config(adapter, linear), adapter_name=adapter_name)
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
        peft_model.train()
        peft_model.composer_start = adapter
        return peft_model
    if isinstance(adapter, LoraAdapter):
        return _init_lora(model, adapter, adapter_name)
    if isinstance(adapter, PromptVector):
        if not adapter.composable:
            raise NotComposableError("This prompt has no recorded init (prompt_vector.safetensors), so a new task "
                                     "cannot be initialised from its task vector. Retrain it with hub train.")
        check_fits(adapter, model)
        n, dim = adapter.shape
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, token_dim=dim)
        peft_model = get_peft_model(model, cfg, adapter_name=adapter_name)
        with torch.no_grad():
            w = peft_model.prompt_encoder[adapter_name].embedding.weight
            w.copy_(adapter.prompt.to(w.dtype))
        peft_model.train()
        peft_model.composer_prompt_init = adapter.init.clone()
        peft_model.composer_start = adapter
        return peft_model
    raise TypeError(f"Expected a RoadAdapter, LoraAdapter, PromptVector or expression, got {type(adapter).__name__}")


def _init_lora(model: Any, adapter: LoraAdapter, adapter_name: str) -> Any:
    """A trainable LoRA of the adapter's (largest) rank with ``lora_alpha = r`` (``s = 1``), its factors the
    adapter's with each module's ``s`` folded into ``B`` (smaller ranks zero-padded), so the start equals it."""
    from peft import LoraConfig, get_peft_model

    from .lora_math import pad_rank
    from .ops import check_compatible

    check_compatible([adapter])  # DoRA, LoRA bias ...: a start that is not ΔW = s·B·A is refused with the reason
    modules = dict(model.named_modules())
    check_fits(adapter, model, modules=modules)
    r = max(adapter.rank(m) for m in adapter.lora_a)
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(adapter.lora_a), lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg, adapter_name=adapter_name)
    with torch.no_grad():
        for name, mod in peft_model.base_model.model.named_modules():
            if name in adapter.lora_a and adapter_name in getattr(mod, "lora_A", {}):
                a, b = pad_rank(adapter.lora_a[name], adapter.lora_b[name] * adapter.scaling[name], r)
                mod.lora_A[adapter_name].weight.copy_(a)
                mod.lora_B[adapter_name].weight.copy_(b)
    peft_model.train()
    peft_model.composer_start = adapter
    return peft_model
