"""Per-row prefix tuning: every row of a batch carries its own PEFT prefix-tuning keys and values (or none), put in
front of the KV cache before the prompt runs.

PEFT's prefix tuning (``PeftModelForCausalLM.forward``, ``get_prompt``) gives a row alone a cache holding, per
attention layer, the adapter's ``n`` virtual tokens' keys and values (no rotary embedding), an attention mask with
``n`` ones in front, and the real tokens' positions counted from ``n``. A batch does the same per row, the
prefixes right-aligned to the widest (``P`` columns)::

    cache columns   row 0 (n = 4)   k k k k | . . t t t        k: the adapter's keys and values
                    row 1 (n = 2)   . . k k | t t t t t        .: padding, attention mask 0
                    row 2 (none)    . . . . | . t t t t        t: the prompt, positions n, n + 1, ...

so every row attends to exactly what it attends to alone (padding is masked; a masked key adds nothing). The
running batch then treats the prefix as part of the row's cache (:mod:`app.engine.continuous`): it is stacked,
left-padded and cut with the rest.

Only models whose every cache layer keeps full keys and values take prefix rows: in a sliding-window or chunked
layer the padding between a shorter row's prefix and its prompt would count against the window (the engine closes
such gaps for prompt vectors by moving padding left, but a prefix already in the cache sits left of every input
column), and convolution / linear-attention layers have no keys to prefix (PEFT itself builds a plain cache for them).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..errors import MixError
from .cache import other_layers

Kv = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer index -> (keys, values), each (kv_heads, n, head_dim)


def check(config: Any) -> None:
    """Refuse prefix rows on a model whose cache has layers other than full attention (see the module docstring).

    Raises:
        MixError: names the layer types and what to do instead.
    """
    kinds = other_layers(config, (DynamicLayer,))
    if kinds:
        name = getattr(config, "model_type", type(config).__name__)
        raise MixError(
            f"The engine serves prefix-tuning rows on models whose every attention layer keeps full keys and values; "
            f"'{name}' has {', '.join(kinds)} layers, where a row's prefix and its prompt would not sit side by side "
            "in a padded batch (sliding-window or chunked attention counts the padding against the window; "
            "convolution and linear-attention layers have no keys to prefix). Load the adapter with "
            "PeftModel.from_pretrained and run it alone.")


def adapter_kv(adapter: Any, model: Any) -> Kv:
    """Check ``adapter`` (a :class:`composer.kinds.prefix.PrefixAdapter`) against ``model`` and return its per-layer
    keys and values, as PEFT's ``get_prompt`` builds them.

    Raises:
        MixError: the model's cache cannot take prefix rows (:func:`check`), or the adapter's layers, heads or head
            width differ from the model's.
    """
    from composer import IncompatibleAdaptersError, check_fits
    from composer.kinds.prefix import model_shape

    config = model.config.get_text_config(decoder=True)
    check(model.config)
    try:
        check_fits(adapter, model)
    except IncompatibleAdaptersError as e:
        raise MixError(str(e)) from e
    return {str(i): (k.contiguous(), v.contiguous())
            for i, (k, v) in enumerate(adapter.past_key_values(model_shape(config)))}


def fill(cache: DynamicCache, kvs: list[Kv | None], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put each row's keys and values into the empty ``cache`` (right-aligned to the widest, zeros before).

    Args:
        like: a tensor on the model's device in its dtype (the cache's).

    Returns:
        ``(mask, widths)``: the prefix columns' attention mask ``(batch, P)`` (1 on a row's own prefix) and each
        row's prefix width ``(batch,)`` (0 for rows without one), on ``like``'s device.
    """
    widths = torch.tensor([next(iter(kv.values()))[0].shape[1] if kv else 0 for kv in kvs])
    width = int(widths.max())
    mask = torch.zeros(len(kvs), width, dtype=torch.long)
    for i, n in enumerate(widths.tolist()):
        mask[i, width - n:] = 1 if n else 0
    first = next(kv for kv in kvs if kv)
    for layer in range(len(cache.layers)):
        k0, _ = first[str(layer)]
        keys = like.new_zeros(len(kvs), k0.shape[0], width, k0.shape[2])
        values = torch.zeros_like(keys)
        for i, kv in enumerate(kvs):
            if kv:
                k, v = kv[str(layer)]
                keys[i, :, width - k.shape[1]:] = k
                values[i, :, width - v.shape[1]:] = v
        cache.update(keys, values, layer)
    return mask.to(like.device), widths.to(like.device)
