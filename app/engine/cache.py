"""The running batch's cache: which of transformers' cache layers it can grow and shrink row by row.

:class:`~app.engine.continuous.RunningBatch` stacks a newcomer's cache onto the running rows' (left-padding keys and
values to a common width) and drops a finished row's, layer by layer::

    layer type (transformers)              per row                    a join                 a leave
    full attention (DynamicLayer)          keys, values (b, h, T, d)  pad T left, cat rows   index rows, cut T
    sliding window or chunked (Mistral,    kept full length, masked   as full attention      as full attention
      Gemma 2/3/4, Llama 4)                by the model
    convolution / linear attention         conv, recurrent state      cat rows               index rows
      (LFM2, Qwen3-Next)                   (no sequence axis)
    sharing another layer's (Gemma 4)      nothing                    nothing                nothing

Sliding-window layers are built as full ones: transformers' sliding layers keep only a window's worth of keys,
which no longer lines up with the batch's mask once rows of other lengths join (the model still masks by its
window, so the answers are the same; the cost is memory). Other layer types (indexed sparse attention as in
DeepSeek-V3.2, hybrid sliding layers) are refused by :func:`check` when the engine is made.

A model whose every layer holds keys and values alone (:func:`sliceable`) can also start a row from the first
columns of another row's keys and values (attention is causal: a prefix's keys and values do not depend on
what follows), which the prefix cache and chunked prefill use; a convolution or recurrent state cannot be cut
back to an earlier column, so those models prefill every prompt whole.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import (
    DummyLayer,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionLayer,
)

from ..errors import UnsupportedModelError

# Layers holding keys and values, and layers holding conv / recurrent states (the hybrid layers are both).
_KV, _STATES = DynamicLayer, LinearAttentionLayer
SERVED = (DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer, LinearAttentionAndFullAttentionLayer,
          DummyLayer)


def new(config: Any) -> DynamicCache:
    """An empty cache for ``config``'s model, every sliding-window layer built as a full one."""
    cache = DynamicCache(config=config)
    cache.layers = [DynamicLayer() if type(layer) is DynamicSlidingWindowLayer else layer for layer in cache.layers]
    return cache


def sliceable(config: Any) -> bool:
    """Whether every cache layer of ``config``'s model (as :func:`new` builds it) holds keys and values alone, so
    a row's first columns are a cache of their own."""
    return all(type(layer) is DynamicLayer for layer in new(config).layers)


def filled(config: Any, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache for ``config``'s model holding ``kv`` (per layer keys and values ``(batch, heads, T, dim)``)."""
    cache = new(config)
    for layer, (k, v) in zip(cache.layers, kv, strict=True):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


def other_layers(config: Any, allowed: tuple[type, ...]) -> list[str]:
    """The names of the cache layer types of ``config``'s model outside ``allowed``, sorted."""
    return sorted({type(layer).__name__ for layer in DynamicCache(config=config).layers if type(layer) not in allowed})


def check(config: Any) -> None:
    """Refuse a model whose cache layers the running batch cannot stack and cut row by row.

    Raises:
        UnsupportedModelError: names the layer types and what still works.
    """
    kinds = other_layers(config, SERVED)
    if kinds:
        name = getattr(config, "model_type", type(config).__name__)
        raise UnsupportedModelError(
            f"The engine cannot serve '{name}' models: their cache has {', '.join(kinds)} layers, which the "
            "running batch cannot grow and shrink row by row (it serves full, sliding-window, chunked, "
            "convolution, linear-attention and cache-sharing layers). Load adapters with "
            "PeftModel.from_pretrained and call generate, or merge them into the base model (merge_and_unload).",
            name=name, layer_types=kinds)


def stack(mine: Any, theirs: Any, pad_mine: int, pad_theirs: int) -> None:
    """Append ``theirs``' rows to ``mine`` (one layer), left-padding keys and values to a common width."""
    if isinstance(mine, _KV):
        mine.keys = torch.cat((_pad_left(mine.keys, pad_mine), _pad_left(theirs.keys, pad_theirs)))
        mine.values = torch.cat((_pad_left(mine.values, pad_mine), _pad_left(theirs.values, pad_theirs)))
    if isinstance(mine, _STATES):
        for states, others in ((mine.conv_states, theirs.conv_states),
                               (mine.recurrent_states, theirs.recurrent_states)):
            for i, s in states.items():
                if s is not None:
                    states[i] = torch.cat((s, others[i]))


def keep(layer: Any, idx: torch.Tensor, cut: int) -> None:
    """Keep rows ``idx`` of one layer; keys and values lose their first ``cut`` columns."""
    if isinstance(layer, _KV):
        on = idx.to(layer.keys.device)
        layer.keys = layer.keys.index_select(0, on)[:, :, cut:]
        layer.values = layer.values.index_select(0, on)[:, :, cut:]
    if isinstance(layer, _STATES):
        for states in (layer.conv_states, layer.recurrent_states):
            for i, s in states.items():
                if s is not None:
                    states[i] = s.index_select(0, idx.to(s.device))


def _pad_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` ``(batch, heads, length, dim)`` with ``n`` zero columns before its sequence."""
    return F.pad(x, (0, 0, n, 0)) if n else x


@functools.cache
def _keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def keyword(model: Any) -> str:
    """The name of the forward argument that takes the cache: ``cache`` where ``model`` takes it (transformers 5.24
    renamed ``past_key_values``, which warns there and goes in 5.40), else ``past_key_values``."""
    return _keyword(type(model))


def passed(model: Any, cache: Any) -> dict[str, Any]:
    """``{keyword(model): cache}``: the keyword argument that hands ``cache`` to ``model``'s forward."""
    return {keyword(model): cache}

