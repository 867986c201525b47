"""Composed initialisation: a trainable PEFT model whose adapter starts from a composition, and the one
check that an adapter fits a model (:func:`check_fits`, also what the app's engine asks)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from . import kinds
from .adapters import Adapter


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
    kinds.of(adapter).check_fits(adapter, model, modules)


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

    from .interpret import evaluate

    adapter = (evaluate(adapter_or_expression, resolve=resolve) if isinstance(adapter_or_expression, str)
               else adapter_or_expression)
    if not isinstance(adapter, kinds.adapter_classes()):
        from .parts import Parts, refusal

        if isinstance(adapter, Parts):  # hub train --init team/parts: why not, and what to do
            raise refusal(adapter)
        raise TypeError(f"Expected an adapter or an expression, got {type(adapter).__name__}")
    peft_model = kinds.of(adapter).init_peft(model, adapter, adapter_name)
    peft_model.train()
    peft_model.composer_start = adapter
    return peft_model
