"""The prefix-tuning kind (PEFT ``peft_type: PREFIX_TUNING``): stored as it is, like every other PEFT type
(:mod:`composer.kinds.stored`), and served per row by the engine as past keys and values.

Prefix tuning (Li & Liang, 2021) learns, for every attention layer, keys and values of ``num_virtual_tokens``
virtual tokens that every real token attends to before the prompt. PEFT saves them flat::

    prompt_embeddings   (num_virtual_tokens, num_layers · 2 · token_dim)      token_dim = kv_heads · head_dim

(with ``prefix_projection`` the saved values are the MLP's output, so a saved folder always holds the keys and
values themselves). PEFT's ``get_prompt`` views that as ``(tokens, 2·layers, kv_heads, head_dim)``: layer ``l``'s
keys are slot ``2l``, its values slot ``2l + 1``, put in front of the cache with no rotary embedding; the attention
mask gains ``num_virtual_tokens`` ones and the real tokens' positions start at ``num_virtual_tokens``
(:meth:`PrefixAdapter.past_key_values`, :func:`app.engine.prefix`).

No arithmetic (the keys and values have no recorded origin to take task vectors from); ``hub diff`` compares the
stored tensor as for every stored type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFormatError, IncompatibleAdaptersError
from ..folder import CONFIG
from .stored import StoredAdapter, StoredKind

EMBEDDINGS = "prompt_embeddings"


@dataclass(frozen=True, eq=False)
class PrefixAdapter(StoredAdapter):
    """A PEFT prefix-tuning adapter: :class:`StoredAdapter` (``peft_type`` ``PREFIX_TUNING``, ``tensors`` holding
    ``prompt_embeddings``, ``config``) with the layout of its keys and values."""

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.tensors[EMBEDDINGS].shape[0])

    @property
    def num_layers(self) -> int | None:
        return self.config.get("num_layers")

    @property
    def kv_heads(self) -> int | None:
        """PEFT's ``num_attention_heads``: the model's key/value heads (set from ``num_key_value_heads``)."""
        return self.config.get("num_attention_heads")

    @property
    def head_dim(self) -> int | None:
        dim, heads = self.config.get("token_dim"), self.kv_heads
        return dim // heads if isinstance(dim, int) and isinstance(heads, int) and heads else None

    def past_key_values(self, shape: tuple[int, int, int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(keys, values)``, each ``(kv_heads, num_virtual_tokens, head_dim)``: PEFT's ``get_prompt`` for
        a batch of one (views of the stored tensor).

        Args:
            shape: ``(layers, kv_heads, head_dim)``; default the config's. The model's, as PEFT fills in what the
                config leaves out (:meth:`PrefixKind.check_fits` checks that they agree).
        """
        layers, heads, head_dim = shape or (self.num_layers, self.kv_heads, self.head_dim)
        t = self.tensors[EMBEDDINGS]
        kv = t.view(t.shape[0], 2 * layers, heads, head_dim).permute(1, 2, 0, 3)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]

    def __repr__(self) -> str:
        return (f"PrefixAdapter(virtual_tokens={self.num_virtual_tokens}, layers={self.num_layers}, "
                f"source={self.source!r})")


class PrefixKind(StoredKind):
    """PEFT's prefix tuning: stored as the fallback stores every type, served per row as past keys and values."""

    name = "prefix_tuning"
    peft_type = "PREFIX_TUNING"
    adapter_class = PrefixAdapter
    engine_role = "past_kv"
    trains = False

    def parse(self, folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PrefixAdapter:
        stored = super().parse(folder, cfg, tensors)  # PEFT's config class, 'prompt_embeddings' alone, finite
        t = stored.tensors[EMBEDDINGS]
        layers, dim, heads = (cfg.get(k) for k in ("num_layers", "token_dim", "num_attention_heads"))
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (layers, dim, heads)):
            if dim % heads:
                raise AdapterFormatError(f"{folder / CONFIG}: token_dim {dim} is not a multiple of num_attention_heads "
                                         f"{heads} (PEFT splits it into heads of equal width).", path=folder)
            if t.shape[1] != layers * 2 * dim:
                raise AdapterFormatError(
                    f"Tensor '{EMBEDDINGS}' has {t.shape[1]} columns; {CONFIG} says num_layers {layers} x 2 (keys and "
                    f"values) x token_dim {dim} = {layers * 2 * dim}, and PEFT would refuse to load it.",
                    path=folder, tensor=EMBEDDINGS)
        return PrefixAdapter(peft_type=stored.peft_type, tensors=stored.tensors, config=stored.config)

    def from_peft(self, model: Any, adapter_name: str, cfg: dict[str, Any], *, init: torch.Tensor | None,
                  source: str | None) -> PrefixAdapter:
        s = super().from_peft(model, adapter_name, cfg, init=init, source=source)
        return PrefixAdapter(peft_type=s.peft_type, tensors=s.tensors, config=s.config, source=source)

    def check_fits(self, adapter: PrefixAdapter, model: Any, modules: Mapping[str, Any] | None) -> None:
        """The keys and values fit every attention layer of ``model`` (PEFT's own shape rule: ``num_layers`` layers of
        ``num_key_value_heads`` heads of ``head_dim``); a decoder-only model (one transformer submodule)."""
        if model is None:
            return
        config = getattr(model, "config", None)
        text = config.get_text_config(decoder=True) if config is not None else None
        if text is None:
            raise IncompatibleAdaptersError("Prefix tuning needs a transformers model (its config gives the layers and "
                                            "heads the keys and values are for).", field="model", left=None,
                                            right=type(model).__name__)
        subs = adapter.config.get("num_transformer_submodules") or 1
        if subs != 1:
            raise IncompatibleAdaptersError(
                f"The adapter has num_transformer_submodules {subs} (an encoder-decoder model's prefix); a "
                "decoder-only model takes 1.", field="num_transformer_submodules", left=subs, right=1)
        want = model_shape(text)
        # What the config leaves out, PEFT fills in from the model; the stored columns must fit either way.
        have = tuple(w if h is None else h for h, w in zip((adapter.num_layers, adapter.kv_heads, adapter.head_dim),
                                                            want))
        cols = adapter.tensors[EMBEDDINGS].shape[1]
        if have != want or cols != 2 * want[0] * want[1] * want[2]:
            raise IncompatibleAdaptersError(
                f"The adapter's keys and values are for {have[0]} layers of {have[1]} key/value heads of width "
                f"{have[2]} ({cols} values per virtual token); the model has {want[0]} layers of {want[1]} heads of "
                f"width {want[2]}. Was it trained on another base model ({adapter.base_model!r})?", field="shape",
                left=have, right=want, tensor=EMBEDDINGS)

    def describe(self, adapter: PrefixAdapter) -> dict[str, Any]:
        return {**super().describe(adapter), "num_virtual_tokens": adapter.num_virtual_tokens,
                "num_layers": adapter.num_layers, "served_per_row": True}

    def label(self, adapter: PrefixAdapter) -> str:
        return f"{adapter.kind} ({adapter.num_virtual_tokens} virtual tokens)"


def model_shape(text_config: Any) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder's keys and values, as PEFT provisions a prefix for them."""
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return text_config.num_hidden_layers, heads, head_dim


KIND = PrefixKind()
