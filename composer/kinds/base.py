"""The protocol an adapter kind implements (:class:`Kind`) and helpers every kind shares; the registry is
:mod:`composer.kinds`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFormatError, IncompatibleAdaptersError, InvalidArgumentError, NotComposableError


class Kind:
    """What the house needs of one adapter kind. Subclasses override what their kind supports.

    Attributes:
        name: the kind's name (``adapter.kind``, ``hub train --kind``).
        peft_type: PEFT's ``peft_type`` for this kind's folders; ``None`` for a format of its own, whose folders the
            kind recognises itself (:meth:`claims`; e.g. the ``adapters`` library's bottleneck adapters).
        weights_file: the safetensors file its folders keep their weights in.
        pickle_hint: how to convert a folder holding only pickled weights (the refusal's next step).
        serve_hint: what to do instead, when the engine refuses to serve it per row (``engine_role is None``).
        adapter_class: the frozen dataclass holding this kind's tensors.
        engine_role: how the engine serves it per batch row: ``"output"`` (a per-row transform of a linear
            layer's output, as RoAd), ``"weight"`` (a per-row low-rank weight update, as LoRA), ``"prefix"``
            (per-row input embeddings in front of the prompt), ``"past_kv"`` (per-row keys and values every
            attention layer attends to before the prompt, as prefix tuning), ``"stream"`` (a per-row function added
            to a decoder sublayer's output in the residual stream, as bottleneck adapters), or ``None`` (not served
            per row).
        trains: ``hub train --kind`` offers it (:func:`composer.kinds.names`).
        layered: it changes the model's layers (so the anchored objective and decoder-projection targets apply).
        subspaces: its values come in 2D pairs that subspace slots, overlap checks and mix fitting act on.
        default_lr: ``hub train``'s learning rate when none is given.
        fresh_start: how :meth:`new_peft` starts (the training record's ``init``).
    """

    name: str = ""
    peft_type: str | None = ""
    weights_file: str = "adapter_model.safetensors"
    pickle_hint: str = ("load it with PeftModel.from_pretrained and call save_pretrained(..., "
                        "safe_serialization=True)")
    serve_hint: str = "load them with PEFT, or merge them into the base model"
    adapter_class: type = object
    engine_role: str | None = None
    trains: bool = True
    layered: bool = True
    subspaces: bool = False
    default_lr: float = 1e-3
    fresh_start: str = ""

    # ------------------------------------------------------------------------------------------- folders
    def claims(self, folder: Path, cfg: dict[str, Any]) -> bool:
        """For a kind with ``peft_type = None``: whether ``cfg`` (a folder's config that names no ``peft_type``) is
        in this kind's format. :meth:`parse` then checks every field."""
        return False

    def parse(self, folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
        """The adapter in ``folder`` (config and weights already read and bounded), every value checked."""
        raise AdapterFormatError(f"Reading {self.peft_type} adapters is not supported yet.", path=folder)

    def peft_config(self, adapter: Any, cfg: dict[str, Any]) -> dict[str, Any]:
        """``cfg`` (the adapter's config with the common fields set) completed with what PEFT needs to load it."""
        return cfg

    def files(self, adapter: Any) -> dict[str, dict[str, torch.Tensor] | None]:
        """Safetensors files to write, by file name (``None``: remove a stale one)."""
        raise NotImplementedError

    def from_peft(self, model: Any, adapter_name: str, cfg: dict[str, Any], *, init: torch.Tensor | None,
                  source: str | None) -> Any:
        """The adapter read out of a live ``PeftModel``."""
        raise NotImplementedError(f"Reading a {self.name} adapter out of a PEFT model is not supported.")

    # ----------------------------------------------------------------------------------------- arithmetic
    def check_usable(self, adapter: Any, label: str) -> None:
        """Raise :class:`NotComposableError` when this adapter cannot enter arithmetic at all."""

    def check_pair(self, first: Any, other: Any, names: str, *, same_variant: bool) -> None:
        """Raise :class:`IncompatibleAdaptersError` when ``other`` cannot be combined with ``first`` (same kind)."""

    def linear(self, adapters: Sequence[Any], weights: list[float], method: str, params: dict, expr: str,
               op: str | None) -> Any:
        """``Σ wᵢ·xᵢ`` (or a merge method) over compatible adapters of this kind, with its recipe."""
        raise NotComposableError(f"{self.name} adapters are stored and served as they are; arithmetic on them is "
                                 "not supported.")

    def interpolated(self, a: Any, b: Any, t: float, result: Any) -> Any:
        """The interpolation's result given the linear one (a kind whose origin moves too overrides this)."""
        return result

    def compose(self, a: Any, b: Any, expr: str) -> Any:
        """The exact sequential product ``apply a, then b``."""
        raise NotComposableError(f"compose() is the exact product of RoAd blocks; {self.name} adapters have none. "
                                 "Use composer.add(a, b).")

    def compress(self, adapter: Any, rank: int) -> Any:
        """A LoRA of rank at most ``rank`` (``composer.compress``)."""
        raise NotComposableError(f"compress() truncates a LoRA's rank by SVD; a {self.name} adapter has no rank.")

    # ------------------------------------------------------------------------------------------- models
    def check_fits(self, adapter: Any, model: Any, modules: Mapping[str, Any] | None) -> None:
        """Raise :class:`IncompatibleAdaptersError` unless ``adapter`` can run on ``model``."""

    def init_peft(self, model: Any, adapter: Any, adapter_name: str) -> Any:
        """A trainable ``PeftModel`` whose adapter starts equal to ``adapter``."""
        raise NotComposableError(f"Training from a {self.name} adapter is not supported.")

    def new_peft(self, model: Any, options: Mapping[str, Any]) -> Any:
        """A fresh trainable ``PeftModel`` of this kind (``hub train``; ``options``: its command-line values)."""
        raise NotImplementedError(f"hub train cannot train {self.name} adapters yet.")

    def as_road(self, adapter: Any) -> Any:
        """For ``engine_role == "output"``: the RoAd adapter whose output transform equals ``adapter``'s, which the
        engine turns into per-row tables (a RoAd adapter is its own); :class:`NotComposableError` with the reason
        where there is none."""
        return adapter

    # ------------------------------------------------------------------------------------------ showing
    def describe(self, adapter: Any) -> dict[str, Any]:
        """Kind-specific fields of :func:`composer.describe` (``hub show``, the app)."""
        return {}

    def label(self, adapter: Any) -> str:
        """The short kind label of the app's adapter list (``road (road_1, g=64)``)."""
        return self.name

    def layer_rows(self, adapter: Any, layer_of: Any) -> list[dict[str, Any]]:
        """Rows ``{"layer", "norm", "series"}`` for the app's per-layer plot."""
        return []

    def diff_extra(self, a: Any, b: Any) -> dict[str, Any]:
        """Kind-specific fields of ``hub diff`` between two adapters of this kind."""
        return {}


def linear_layer(modules: Mapping[str, Any], m: str, adapter: Any, what: str, tensor: str) -> torch.nn.Linear:
    """The model's ``nn.Linear`` named ``m``, or the error saying the adapter does not fit this model."""
    layer = modules.get(m)
    if not isinstance(layer, torch.nn.Linear):
        example = next((n for n, x in modules.items() if isinstance(x, torch.nn.Linear)), "?")
        raise IncompatibleAdaptersError(
            f"Module '{m}' of the {what} is not a Linear layer of this model (e.g. '{example}'); was it "
            f"trained on another base model ({adapter.base_model!r})?",
            field="modules", left=m, right=None, tensor=tensor)
    return layer


def linear_targets(model: Any, config: Any, why: str) -> None:
    """Refuse, before PEFT wraps ``model``, a PEFT ``config`` whose ``target_modules`` select a module that is not an
    ``nn.Linear`` (a convolution block, fused experts): ``why`` says who adapts linear layers only (PEFT's RoAd; this
    hub's LoRA and IA³), and PEFT's own error would print the module's whole repr over many lines.

    Raises:
        InvalidArgumentError: naming the first such module, its type, and this model's linear layers to target instead.
    """
    if not getattr(config, "target_modules", None):
        return  # PEFT's own default for the model type: linear projections
    from peft.tuners.tuners_utils import check_target_module_exists

    for name, module in model.named_modules():
        if name and check_target_module_exists(config, name) and not isinstance(module, torch.nn.Linear):
            linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] != "lm_head"})
            arch = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
            raise InvalidArgumentError(
                f"target_modules selects '{name}', of type {type(module).__name__} in this {arch} model, and {why}. "
                f"Target its linear layers instead: {', '.join(linears[:12])}{', ...' if len(linears) > 12 else ''}.",
                name="target_modules", value=name)
