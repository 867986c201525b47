"""The prefix-tuning kind (PEFT ``peft_type: PREFIX_TUNING``): stored as it is, like every other PEFT type
(:mod:`composer.kinds.stored`), served per row by the engine as past keys and values, and composed by τ arithmetic
where its origin is recorded.

Prefix tuning (Li & Liang, 2021) learns, for every attention layer, keys and values of ``num_virtual_tokens``
virtual tokens that every real token attends to before the prompt. PEFT saves them flat::

    prompt_embeddings   (num_virtual_tokens, num_layers · 2 · token_dim)      token_dim = kv_heads · head_dim

(with ``prefix_projection`` the saved values are the MLP's output, so a saved folder always holds the keys and
values themselves). PEFT's ``get_prompt`` views that as ``(tokens, 2·layers, kv_heads, head_dim)``: layer ``l``'s
keys are slot ``2l``, its values slot ``2l + 1``, put in front of the cache with no rotary embedding; the attention
mask gains ``num_virtual_tokens`` ones and the real tokens' positions start at ``num_virtual_tokens``
(:meth:`PrefixAdapter.past_key_values`, :func:`app.engine.prefix`).

Task-vector arithmetic where the origin is recorded, as for prompt vectors: τ = KV − KV₀ with KV₀ the keys and values
training started from, and a result's keys and values ``KV₀ + Σ wᵢ τᵢ`` (exact as defined on what is stored and
served; TIES/DARE act on τ and are labelled approximate). The origin is recorded

- in ``prompt_vector.safetensors`` (``init`` = KV₀, ``vector`` = τ, as prompt vectors record P₀): what
  ``hub train --kind prefix_tuning`` writes (PEFT's random start, seeded by ``--seed``), and
  ``composer.from_peft(model, init=KV₀)``;
- or by the config: ``init_weights: "zero"`` (PEFT's zero start, KV₀ = 0; with ``prefix_projection`` too, as the
  projection's last layer starts at zero), so a folder PEFT saved elsewhere with it composes as it is.

A folder with neither (PEFT's default random start, not recorded) is stored and served, and arithmetic refuses it
with the reason. Inputs must share their origin and layout (layers, key/value heads, head width). With
``prefix_projection`` the folder holds the projection's output, not the projection (PEFT drops the embedding and
MLP when it saves), so the arithmetic is on the keys and values there too; arithmetic on the projection's own
parameters is not offered (not saved, and through its ``tanh`` not linear in the keys and values). A result is a
plain prefix (``prefix_projection: false``): its keys and values are no projection's output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import merge_methods
from ..arith import check_result, check_same_origin, inputs
from ..errors import AdapterFormatError, IncompatibleAdaptersError, NotComposableError
from ..folder import CONFIG, PROMPT_VECTOR, WEIGHTS
from ..provenance import Recipe, check_finite
from .prompt import read_origin
from .stored import StoredAdapter, StoredKind

EMBEDDINGS = "prompt_embeddings"


@dataclass(frozen=True, eq=False)
class PrefixAdapter(StoredAdapter):
    """A PEFT prefix-tuning adapter: :class:`StoredAdapter` (``peft_type`` ``PREFIX_TUNING``, ``tensors`` holding
    ``prompt_embeddings``, ``config``) with the layout of its keys and values, and its origin where recorded.

    Attributes:
        init: KV₀, the keys and values training started from (``prompt_embeddings``' shape), or ``None``.
        vector: τ = ``prompt_embeddings`` − KV₀, or ``None``.
    """

    init: torch.Tensor | None = None
    vector: torch.Tensor | None = None

    @classmethod
    def from_parts(cls, init: torch.Tensor, vector: torch.Tensor, config: dict[str, Any], *,
                   recipe: Recipe | None = None) -> PrefixAdapter:
        """Build from KV₀ and τ; the stored keys and values are ``init + vector``."""
        return cls(peft_type="PREFIX_TUNING", tensors={EMBEDDINGS: init + vector}, config=config, recipe=recipe,
                   init=init, vector=vector)

    @property
    def composable(self) -> bool:
        return self.init is not None and self.vector is not None

    @property
    def origin_implied(self) -> bool:
        """The config's ``init_weights: "zero"`` says the origin (zero), so no file need record it."""
        return (self.composable and self.config.get("init_weights") == "zero" and not bool(self.init.any())
                and torch.equal(self.vector, self.tensors[EMBEDDINGS]))

    @property
    def layout(self) -> tuple[int | None, int | None, int | None]:
        """``(layers, kv_heads, head_dim)`` as the config gives them (``None`` where it leaves one out)."""
        return self.num_layers, self.kv_heads, self.head_dim

    def validate(self) -> None:
        super().validate()
        for name, t in (("init", self.init), ("vector", self.vector)):
            if t is not None:
                check_finite(name, t)

    def task_vectors(self) -> dict[str, torch.Tensor]:
        """τ flat in float64 (the stored keys and values when no origin is recorded)."""
        if self.vector is None:
            return super().task_vectors()
        return {EMBEDDINGS: self.vector.double().flatten()}

    def norms(self) -> dict[str, dict[str, float]]:
        if self.vector is None:
            return super().norms()
        return {EMBEDDINGS: {"vector": float(self.vector.double().norm())}}

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
                f"composable={self.composable}, source={self.source!r})")


class PrefixKind(StoredKind):
    """PEFT's prefix tuning: stored as the fallback stores every type, served per row as past keys and values,
    composed by τ arithmetic where the origin is recorded."""

    name = "prefix_tuning"
    peft_type = "PREFIX_TUNING"
    adapter_class = PrefixAdapter
    engine_role = "past_kv"
    trains = True
    default_lr = 1e-2
    fresh_start = "peft (random keys and values, the run's seed)"

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
        init, vector = read_origin(folder, t)
        if cfg.get("init_weights") == "zero":
            if init is None:
                init, vector = torch.zeros_like(t), t  # PEFT's zero start: KV₀ = 0
            elif bool(init.any()):
                raise AdapterFormatError(
                    f"{CONFIG} says init_weights \"zero\" (training started at keys and values 0), but "
                    f"{PROMPT_VECTOR} records an origin of up to {float(init.abs().max()):.3g}: one of them is wrong. "
                    f"Remove the one that does not say where training started.", path=folder, tensor="init")
        return PrefixAdapter(peft_type=stored.peft_type, tensors=stored.tensors, config=stored.config, init=init,
                             vector=vector)

    def files(self, adapter: PrefixAdapter) -> dict[str, dict[str, torch.Tensor] | None]:
        origin = {"init": adapter.init, "vector": adapter.vector}
        return {WEIGHTS: adapter.tensors, PROMPT_VECTOR: None if adapter.origin_implied or not adapter.composable
                else origin}

    def from_peft(self, model: Any, adapter_name: str, cfg: dict[str, Any], *, init: torch.Tensor | None,
                  source: str | None) -> PrefixAdapter:
        """The keys and values PEFT saves; the origin from ``init``, else the model's ``composer_prompt_init`` (set by
        :meth:`new_peft` and :meth:`init_peft`), else the config's zero start."""
        s = super().from_peft(model, adapter_name, cfg, init=init, source=source)
        kv = s.tensors[EMBEDDINGS]
        if init is None:
            init = getattr(model, "composer_prompt_init", None)
        if init is None and cfg.get("init_weights") == "zero":
            init = torch.zeros_like(kv)
        vector = None
        if init is not None:
            init = init.detach().float().cpu().clone()
            if init.shape != kv.shape:
                raise NotComposableError(f"init has shape {tuple(init.shape)}, the keys and values "
                                         f"{tuple(kv.shape)} (virtual tokens x layers·2·token_dim).")
            vector = kv - init
        return PrefixAdapter(peft_type=s.peft_type, tensors=s.tensors, config=s.config, source=source, init=init,
                             vector=vector)

    # ----------------------------------------------------------------------------------------- arithmetic
    def check_usable(self, adapter: PrefixAdapter, name: str) -> None:
        if not adapter.composable:
            raise NotComposableError(
                f"Prefix-tuning adapter {name} records no origin (the keys and values training started from: "
                f"{PROMPT_VECTOR}, or init_weights \"zero\" in its config), so its task vector τ = KV − KV₀ is "
                "unknown and it cannot be composed; it can still be served as it is. Train it with `hub train --kind "
                "prefix_tuning`, or with PEFT's PrefixTuningConfig(init_weights=\"zero\"), or save it with "
                "composer.from_peft(model, init=KV0), KV0 = model.get_prompt_embedding_to_save(name) before training.")

    def check_pair(self, first: PrefixAdapter, other: PrefixAdapter, names: str, *,
                   same_variant: bool) -> None:
        a, b = first.tensors[EMBEDDINGS], other.tensors[EMBEDDINGS]
        if a.shape != b.shape:
            raise IncompatibleAdaptersError(
                f"Tensor '{EMBEDDINGS}' has shape {tuple(a.shape)} vs {tuple(b.shape)} (virtual tokens x "
                f"layers·2·token_dim).", field="shape", left=tuple(a.shape), right=tuple(b.shape),
                tensor=EMBEDDINGS)
        la, lb = first.layout, other.layout
        if any(x is not None and y is not None and x != y for x, y in zip(la, lb)):
            raise IncompatibleAdaptersError(
                f"{names} lay out their keys and values differently: {la} vs {lb} (layers, key/value heads, head "
                f"width); equal shapes, but the columns hold different layers and heads.", field="layout",
                left=la, right=lb, tensor=EMBEDDINGS)
        check_same_origin(first.init, other.init, names, "the keys and values training started from",
                          "train them with the same --seed on the same base model (hub train --kind prefix_tuning), "
                          "or from PEFT's zero start (init_weights=\"zero\")")

    def linear(self, adapters: Sequence[PrefixAdapter], weights: list[float], method: str, params: dict, expr: str,
               op: str | None) -> PrefixAdapter:
        """``KV₀ + Σ wᵢ τᵢ`` (or a merge method on τ), KV₀ the inputs' common origin."""
        first = adapters[0]
        vector = merge_methods.apply(method, [a.vector for a in adapters], weights, params).to(first.vector.dtype)
        check_result(EMBEDDINGS, vector, None, weights)
        recipe = Recipe(expression=expr, inputs=inputs(adapters), weights=tuple(weights), method=op or method,
                        params=params, exact=method == "task_arithmetic")
        config = {**first.config, "prefix_projection": False}  # a plain prefix: no projection's output
        return PrefixAdapter.from_parts(first.init, vector, config, recipe=recipe)

    def compose(self, a: Any, b: Any, expr: str) -> Any:
        raise NotComposableError("compose() is the exact product of RoAd blocks; prefix-tuning adapters have none. "
                                 "Use composer.add(a, b) for τ arithmetic on their keys and values.")

    # ------------------------------------------------------------------------------------------- models
    def init_peft(self, model: Any, adapter: PrefixAdapter, adapter_name: str) -> Any:
        """A trainable PEFT prefix (no projection) whose keys and values start at ``adapter``'s; the model carries
        ``composer_prompt_init`` (the adapter's origin), so that τ after training is taken from the same origin."""
        from peft import PrefixTuningConfig, get_peft_model

        self.check_usable(adapter, repr(adapter.source or "input"))
        self.check_fits(adapter, model, None)
        layers, heads, head_dim = model_shape(model.config.get_text_config(decoder=True))
        cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=adapter.num_virtual_tokens,
                                 num_layers=layers, num_attention_heads=heads, token_dim=heads * head_dim,
                                 init_weights="zero" if not bool(adapter.init.any()) else None)
        pm = get_peft_model(model, cfg, adapter_name=adapter_name)
        with torch.no_grad():
            w = pm.prompt_encoder[adapter_name].embedding.weight
            w.copy_(adapter.tensors[EMBEDDINGS].to(w))
        pm.composer_prompt_init = adapter.init.float().clone()
        return pm

    def new_peft(self, model: Any, options: Mapping[str, Any]) -> Any:
        """PEFT's prefix tuning from its random start (seeded by the caller); the model carries that start as
        ``composer_prompt_init`` (KV₀), which the saved folder records."""
        from peft import PrefixTuningConfig, get_peft_model

        pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                      num_virtual_tokens=options.get("num_virtual_tokens", 16)))
        with torch.no_grad():
            pm.composer_prompt_init = pm.get_prompt_embedding_to_save("default").float().clone()
        return pm

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
                "num_layers": adapter.num_layers, "composable": adapter.composable, "served_per_row": True}

    def label(self, adapter: PrefixAdapter) -> str:
        return f"{adapter.kind} ({adapter.num_virtual_tokens} virtual tokens)"


def model_shape(text_config: Any) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder's keys and values, as PEFT provisions a prefix for them."""
    heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return text_config.num_hidden_layers, heads, head_dim


KIND = PrefixKind()
