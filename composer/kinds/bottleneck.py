"""Bottleneck adapters (LLM-Adapters' series and parallel adapters) as AdapterHub's ``adapters`` library (1.x)
saves them, read, stored and combined without that package. Not a PEFT format: the folder is claimed by its
config (:meth:`BottleneckKind.claims`)::

    <folder>/
    ├── adapter_config.json    {"config": {...BnConfig...}, "hidden_size", "model_type", "name", "version", ...}
    ├── adapter.safetensors    per layer i and place (attention: after self-attention; output: after the MLP)
    │                          [model.]layers.<i>.<place>_adapters.adapters.<name>.adapter_down.0.{weight,bias}
    │                          [model.]layers.<i>.<place>_adapters.adapters.<name>.adapter_up.{weight,bias}
    └── pytorch_adapter.bin    the pickled alternative: never read (it runs code when loaded)

``seq_bn`` (Pfeiffer) adapts the output place, ``double_seq_bn`` (Houlsby) both places, ``par_bn`` (He et al.) runs
in parallel with the sublayer. With ``f(u) = s·(W_up·act(W_down·u + b_down) + b_up)`` (``s``: ``scaling``), for a
Llama decoder sublayer with input stream ``x`` and output ``h`` (attention or MLP), the library computes::

    seq_bn         x + h + f(x + h)      (original_ln_before: the adapter reads the stream after the residual)
    double_seq_bn  x + h + f(h)          (it reads the sublayer's output)
    par_bn         x + h + f(x)          (it reads the sublayer's input stream, in parallel)

(:func:`sublayer_output`; other flag combinations move the residual as the library does). Layers in ``leave_out``
have no tensors; a per-layer ``reduction_factor`` mapping (``{"1": 4, "default": 8}``) sets each layer's width
``max(1, hidden_size // reduction_factor)``.

Arithmetic is on outputs, and exact: ``Σ wᵢ·fᵢ(u)`` is one bottleneck adapter whose down-projections are stacked and
whose up-projections are concatenated, each scaled by ``wᵢ·sᵢ`` (the activation acts element-wise; a width that one
input lacks at a place is zero-padded, which adds nothing). So ``add``, ``sub``, ``negate``, ``scale`` and
``interpolate`` are exact sums of the adapters' contributions to the residual stream, and a weighted sum with weights
summing to 1 is the library's ``Average`` block (output averaging). Parameter averaging, the library's
``average_adapter``, is **not** that: ``act`` is nonlinear, so ``f`` of averaged weights is not the average of the
``f``'s. It is offered as :func:`average_parameters`, labelled ``exact=False``; TIES/DARE on parameters and the
sequential product (``compose``) are refused. Results grow in width (like LoRA's rank concatenation).

:func:`attached` runs one on a Hugging Face Llama-family model (forward hooks, the library's placement:
:func:`places`, :func:`terms`), which is how the tests check this module against the library itself
(``tests/reference/make_bottleneck.py``). The engine serves them per row (``engine_role = "stream"``:
:mod:`app.engine.bottleneck`, the same places and terms, every row's adapter by batched matmuls).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .. import limits
from ..arith import check_result, inputs
from ..errors import AdapterFormatError, IncompatibleAdaptersError, NotComposableError
from ..folder import CONFIG
from ..provenance import Provenance, Recipe, check_finite
from .base import Kind

WEIGHTS_FILE = "adapter.safetensors"
PLACES = ("attention", "output")  # the library's mh_adapter and output_adapter, in a decoder layer's order
_FLAG = {"attention": "mh_adapter", "output": "output_adapter"}
PARAMS = {"down": "adapter_down.0.weight", "down_bias": "adapter_down.0.bias", "up": "adapter_up.weight",
          "up_bias": "adapter_up.bias"}
ACTIVATIONS: dict[str, Any] = {  # the library's names (transformers' ACT2FN, lower-cased) for what it computes
    "relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "swish": F.silu, "silu": F.silu,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "leakyrelu": F.leaky_relu,
}
# Config fields whose other values change what is computed in ways this module does not (yet) reproduce:
# each must hold the library default.
_PLAIN = {"ln_before": False, "ln_after": False, "use_gating": False, "phm_layer": False, "inv_adapter": None}
_BOOLS = ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "is_parallel",
          "adapter_residual_before_ln", "cross_adapter")
_IGNORED = ("dropout", "init_weights", "init_weights_seed")  # training-only: two adapters may differ in them


class Block(NamedTuple):
    """One place's tensors: ``down`` (r, hidden), ``down_bias`` (r,), ``up`` (hidden, r), ``up_bias`` (hidden,)."""

    down: torch.Tensor
    down_bias: torch.Tensor
    up: torch.Tensor
    up_bias: torch.Tensor


@dataclass(frozen=True, eq=False)
class BottleneckAdapter(Provenance):
    """A bottleneck adapter of the ``adapters`` library (its ``adapter_config.json`` and ``adapter.safetensors``).

    Attributes:
        tensors: the safetensors contents by their on-disk names (written back as they are).
        config: the whole ``adapter_config.json`` (the library's ``BnConfig`` under ``"config"``).
        recipe, source: as for every adapter.
    """

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    recipe: Recipe | None = None
    source: str | None = None

    kind = "bottleneck"

    @property
    def bn(self) -> dict[str, Any]:
        """The library's ``BnConfig`` fields."""
        return self.config["config"]

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    @property
    def base_model(self) -> str | None:
        return self.config.get("model_name") or None

    @property
    def prefix(self) -> str:
        """``"model."`` (saved from a model with a head, as ``LlamaForCausalLM``) or ``""`` (a bare ``LlamaModel``)."""
        return "model." if next(iter(self.tensors), "").startswith("model.") else ""

    def key(self, layer: int, place: str, param: str) -> str:
        return f"{self.prefix}layers.{layer}.{place}_adapters.adapters.{self.name}.{PARAMS[param]}"

    def blocks(self) -> dict[tuple[int, str], Block]:
        """``(layer, place) -> Block``, in layer order."""
        found = {(int(m["layer"]), m["place"]) for k in self.tensors if (m := _KEY.match(k))}
        return {lp: Block(*(self.tensors[self.key(*lp, p)] for p in PARAMS)) for lp in sorted(found)}

    @property
    def architecture(self) -> str:
        """``seq_bn``, ``double_seq_bn`` or ``par_bn`` when the placement is that preset's, else ``custom``."""
        bn = self.bn
        if bn.get("is_parallel"):
            return "par_bn" if _residuals(bn) == 0 else "custom"
        if _residuals(bn) != 0:
            return "custom"
        if bn.get("original_ln_before") and not bn["mh_adapter"] and bn["output_adapter"]:
            return "seq_bn"
        if not bn.get("original_ln_before") and bn["mh_adapter"] and bn["output_adapter"]:
            return "double_seq_bn"
        return "custom"

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def validate(self) -> None:
        for k, t in self.tensors.items():
            check_finite(k, t)

    def task_vectors(self) -> dict[str, torch.Tensor]:
        """Each tensor, flat in float64, as ``layers.<i>.<place>.<down|down_bias|up|up_bias>`` (without the
        adapter's name, so two versions named differently compare): what ``hub diff`` compares (parameters;
        arithmetic here acts on outputs, see the module docstring)."""
        out = {f"layers.{i}.{p}.{param}": t.double().flatten()
               for (i, p), b in self.blocks().items() for param, t in zip(PARAMS, b)}
        return dict(sorted(out.items()))

    def norms(self) -> dict[str, dict[str, float]]:
        """Per place ``layers.<i>.<place>``: ``‖W_down‖`` and ``‖s·W_up‖`` (the up-projection sets the output)."""
        s = abs(float(self.bn.get("scaling", 1.0)))
        return {f"layers.{i}.{p}": {"down": float(b.down.double().norm()), "up": s * float(b.up.double().norm())}
                for (i, p), b in self.blocks().items()}

    def __repr__(self) -> str:
        return (f"BottleneckAdapter({self.architecture}, blocks={len(self.blocks())}, params={self.num_parameters()}, "
                f"source={self.source!r})")


_KEY = re.compile(r"^(?:model\.)?layers\.(?P<layer>\d{1,6})\.(?P<place>attention|output)_adapters\.adapters\."
                  r"(?P<name>[^.]+)\.(?P<param>adapter_down\.0\.weight|adapter_down\.0\.bias|adapter_up\.weight|"
                  r"adapter_up\.bias)$")


# ------------------------------------------------------------------------------------------------- the math
def bottleneck(u: torch.Tensor, block: Block, activation: str, scaling: float) -> torch.Tensor:
    """``s·(W_up·act(W_down·u + b_down) + b_up)`` on the last dimension of ``u`` (the block taken to ``u``'s device and
    dtype: adapters load on the CPU, a model may run elsewhere)."""
    d = ACTIVATIONS[activation](F.linear(u, block.down.to(u), block.down_bias.to(u)))
    return F.linear(d, block.up.to(u), block.up_bias.to(u)) * scaling


def _residuals(bn: Mapping[str, Any]) -> int:
    """How many extra copies of the sublayer's input stream the library adds past Llama's own residual (0 for the
    presets): ``original_ln_after`` adds one, the library's own residual replaces Llama's, and a series adapter with
    ``original_ln_before`` and ``residual_before_ln: false`` adds the stream once more."""
    extra = int(bool(bn.get("original_ln_after", True))) - 1
    if not bn.get("is_parallel") and bn.get("original_ln_before") and bn.get("residual_before_ln", True) is False:
        extra += 1
    return extra


def terms(bn: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(a, b, e)`` such that the library's sublayer output with the adapter is ``h' = h + f(a·x + b·h) + e·x``
    (``x``: the stream entering the sublayer, ``h``: the attention's or MLP's output): what the bottleneck reads
    (``(1, 0)`` the input stream, in parallel; ``(1, 1)`` the stream after the residual; ``(0, 1)`` the sublayer's
    output) and the extra copies of the stream the library's residual adds (:func:`_residuals`; 0 for the presets)."""
    if bn.get("is_parallel"):
        a, b = 1, 0
    else:
        a, b = (1, 1) if bn.get("original_ln_before") else (0, 1)
    return a, b, _residuals(bn)


def sublayer_output(x: torch.Tensor, h: torch.Tensor, block: Block, bn: Mapping[str, Any]) -> torch.Tensor:
    """The sublayer output ``h'`` that makes a Llama layer's ``x + h'`` what the library computes with the adapter
    (``x``: the stream entering the sublayer, ``h``: the attention's or MLP's output)."""
    a, b, extra = terms(bn)
    u = x if not b else h if not a else x + h
    out = h + bottleneck(u, block, bn["non_linearity"].lower(), float(bn.get("scaling", 1.0)))
    return out + extra * x if extra else out


def places(layer: Any) -> dict[str, tuple[Any, Any]]:
    """Where the library places a Llama decoder layer's adapters: per place, the norm whose input is the stream ``x``
    entering the sublayer, and the sublayer whose output ``h`` the adapter changes."""
    return {"attention": (layer.input_layernorm, layer.self_attn),
            "output": (layer.post_attention_layernorm, layer.mlp)}


@contextmanager
def attached(model: Any, adapter: BottleneckAdapter) -> Iterator[Any]:
    """Run ``adapter`` on a Hugging Face Llama-family model inside this block (forward hooks on each decoder layer's
    norms, ``self_attn`` and ``mlp``, placed as the ``adapters`` library places them); removed on exit.

    Raises:
        IncompatibleAdaptersError: the model is not Llama-shaped or its sizes differ
            (:meth:`BottleneckKind.check_fits`).
    """
    KIND.check_fits(adapter, model, None)
    layers = decoder_layers(model)
    bn = adapter.bn
    handles = []
    for (i, place), block in adapter.blocks().items():
        handles += hook_place(layers[i], place, lambda x, h, block=block: sublayer_output(x, h, block, bn))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def hook_place(layer: Any, place: str, change: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> list[Any]:
    """Hooks that replace the output ``h`` of ``layer``'s sublayer at ``place`` (:func:`places`) by
    ``change(x, h)``, ``x`` the stream entering that sublayer's norm; returns their handles (``.remove()`` each).
    The one placement of a bottleneck: this reader and the engine's batched rows
    (:func:`app.engine.bottleneck.applied`) both hook through it."""
    norm, sub = places(layer)[place]
    seen: dict[str, torch.Tensor] = {}

    def keep(_mod, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    def adapt(_mod, _args, _kwargs, output):
        h = output[0] if isinstance(output, tuple) else output
        new = change(seen.pop("x"), h)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return [norm.register_forward_pre_hook(keep, with_kwargs=True),
            sub.register_forward_hook(adapt, with_kwargs=True)]


def decoder_layers(model: Any) -> Any:
    """The model's decoder layers when they are Llama's (two norms, each before its sublayer), else ``None``. Layers
    with norms after their sublayers too (Gemma 2/3's ``pre_/post_feedforward_layernorm``, where
    ``post_attention_layernorm`` normalises the attention's output) would put the adapter in another place."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        return None
    need = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    after = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
    ok = all(hasattr(la, n) for la in layers for n in need) and not any(hasattr(la, n) for la in layers for n in after)
    return layers if ok else None


# ------------------------------------------------------------------------------------------------ reading
def _fail(folder: Path, msg: str, tensor: str | None = None) -> AdapterFormatError:
    return AdapterFormatError(f"{folder / CONFIG}: {msg}" if tensor is None else msg, path=folder, tensor=tensor)


def _check_config(folder: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``BnConfig`` fields this module computes with, checked; returns ``cfg["config"]``."""
    bn = cfg.get("config")
    if not isinstance(bn, dict):
        raise _fail(folder, f"'config' must be the adapters library's adapter config (an object), got "
                            f"{str(bn)[:60]!r}.")
    arch = bn.get("architecture")
    if arch not in (None, "bottleneck"):
        raise _fail(folder, f"config.architecture is {str(arch)[:40]!r}: this hub reads the adapters library's "
                            "bottleneck adapters (seq_bn, double_seq_bn, par_bn) only. Load this one with the adapters "
                            "library, or save it as a PEFT adapter.")
    hidden = cfg.get("hidden_size")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0:
        raise _fail(folder, f"hidden_size must be a positive integer (the model's width), got {str(hidden)[:40]!r}.")
    limits.check("dimension", hidden, f"{CONFIG}: hidden_size")
    for key in ("name", "model_type"):
        if not isinstance(cfg.get(key), str) or not cfg[key] or (key == "name" and not re.fullmatch(r"[^.]+",
                                                                                                     cfg[key])):
            raise _fail(folder, f"{key} must be a non-empty string{' without dots' if key == 'name' else ''}, got "
                                f"{str(cfg.get(key))[:40]!r}.")
    for key in ("version", "model_name", "model_class"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise _fail(folder, f"{key} must be a string, got {str(cfg[key])[:40]!r}.")
    for key in ("mh_adapter", "output_adapter"):
        if key not in bn:
            raise _fail(folder, f"config.{key} is missing; the adapters library requires it (true or false).")
    for key in _BOOLS:
        if key in bn and not isinstance(bn[key], bool):
            raise _fail(folder, f"config.{key} must be true or false, got {str(bn[key])[:40]!r}.")
    if not (bn["mh_adapter"] or bn["output_adapter"]):
        raise _fail(folder, "config.mh_adapter and config.output_adapter are both false: the adapter adapts nothing.")
    for key, default in _PLAIN.items():
        if bn.get(key, default) is not default:
            raise _fail(folder, f"config.{key} is {json.dumps(bn[key])[:40]}; this hub reads bottleneck adapters "
                                f"with {key} = {json.dumps(default)} (as the seq_bn, double_seq_bn and par_bn presets "
                                "have it). Load this one with the adapters library.")
    if bn.get("residual_before_ln", True) not in (True, False):
        raise _fail(folder, f"config.residual_before_ln is {str(bn['residual_before_ln'])[:40]!r}; on Llama-family "
                            "models (no layer norm passed to the adapter) the adapters library runs true or false "
                            "only.")
    nl = bn.get("non_linearity")
    if not isinstance(nl, str) or nl.lower() not in ACTIVATIONS:
        raise _fail(folder, f"config.non_linearity is {str(nl)[:40]!r}; expected one of {', '.join(ACTIVATIONS)}.")
    scaling = bn.get("scaling", 1.0)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise _fail(folder, f"config.scaling is {str(scaling)[:40]!r}; this hub reads a constant scaling (a finite "
                            "number). 'learned' and 'channel' scalings are trained tensors it does not read yet.")
    leave = bn.get("leave_out", [])
    if not isinstance(leave, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1_000_000
                                              for i in leave):
        raise _fail(folder, f"config.leave_out must be a list of layer indices, got {str(leave)[:60]!r}.")
    rf = bn.get("reduction_factor")
    values = list(rf.items()) if isinstance(rf, dict) else [("", rf)]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                             for _, v in values):
        raise _fail(folder, f"config.reduction_factor must be a positive number or a mapping of layer indices (and "
                            f"'default') to positive numbers, got {str(rf)[:60]!r}.")
    if isinstance(rf, dict) and not all(k == "default" or re.fullmatch(r"\d{1,6}", k) for k in rf):
        raise _fail(folder, f"config.reduction_factor's keys are layer indices or 'default', got {sorted(rf)[:4]}.")
    return bn


def width(bn: Mapping[str, Any], hidden: int, layer: int) -> int | None:
    """The bottleneck width the library gives ``layer``: ``max(1, int(hidden // reduction_factor))``; ``None`` when a
    reduction factor mapping has neither this layer nor a default (the library fails to build it)."""
    rf = bn["reduction_factor"]
    if isinstance(rf, dict):
        rf = rf.get(str(layer), rf.get("default"))
        if rf is None:
            return None
    return max(1, int(hidden // rf))


def _check_tensors(folder: Path, cfg: dict[str, Any], bn: dict[str, Any],
                   tensors: Mapping[str, torch.Tensor]) -> None:
    name, hidden = cfg["name"], cfg["hidden_size"]
    if not tensors:
        raise AdapterFormatError(f"{folder / WEIGHTS_FILE} holds no tensors.", path=folder)
    prefixes, found = set(), {}
    for key in sorted(tensors):
        m = _KEY.match(key)
        if m is None or m["name"] != name:
            raise AdapterFormatError(
                f"Unexpected tensor '{key[:120]}' in a bottleneck adapter named {name!r}: the adapters library saves a "
                f"Llama-family model's as '[model.]layers.<i>.<attention|output>_adapters.adapters.{name}."
                "<adapter_down.0|adapter_up>.<weight|bias>'. Other model families and methods are not read yet.",
                path=folder, tensor=key)
        prefixes.add(key.startswith("model."))
        found.setdefault((int(m["layer"]), m["place"]), set()).add(m["param"])
    if len(prefixes) > 1:
        raise AdapterFormatError("The tensors mix 'model.layers.…' and 'layers.…' names; the library saves one model's "
                                 "state dict, with one prefix.", path=folder)
    leave = set(bn.get("leave_out", []))
    top = max(i for i, _ in found)
    for i in range(top + 1):
        for place in PLACES:
            want = bool(bn[_FLAG[place]]) and i not in leave
            have = found.get((i, place), set())
            what = f"layers.{i}.{place}_adapters"
            if not want and have:
                why = f"layer {i} is in leave_out" if i in leave else f"config.{_FLAG[place]} is false"
                raise AdapterFormatError(f"The weights hold tensors for {what}, but {why}: the library would not load "
                                         "them.", path=folder, tensor=f"{what}.adapters.{name}")
            missing = sorted(set(PARAMS.values()) - have) if want else []
            if missing:
                raise AdapterFormatError(
                    f"Tensor '{what}.adapters.{name}.{missing[0]}' is missing: config.{_FLAG[place]} adapts layer {i} "
                    f"(layers 0 to {top} are present and leave_out is {sorted(leave)}); the library would leave it "
                    "randomly initialised. Add it, or list the layer in leave_out.", path=folder,
                    tensor=f"{what}.adapters.{name}.{missing[0]}")
    prefix = "model." if prefixes == {True} else ""
    for (i, place) in sorted(found):
        r = width(bn, hidden, i)
        if r is None:
            raise _fail(folder, f"config.reduction_factor {str(bn['reduction_factor'])[:60]} has no entry for layer "
                                f"{i} and no 'default'; the library cannot build that layer's adapter.")
        base = f"{prefix}layers.{i}.{place}_adapters.adapters.{name}."
        for param, shape in zip(PARAMS.values(), ((r, hidden), (r,), (hidden, r), (hidden,))):
            t = tensors[base + param]
            if tuple(t.shape) != shape:
                raise AdapterFormatError(
                    f"Tensor '{base + param}' has shape {tuple(t.shape)}; hidden_size {hidden} and reduction_factor "
                    f"{str(bn['reduction_factor'])[:40]} give layer {i} a bottleneck of width {r}, so the library "
                    f"expects {shape} and would refuse to load it.", path=folder, tensor=base + param)
            check_finite(base + param, t)


class BottleneckKind(Kind):
    """The ``adapters`` library's bottleneck adapters: a format of their own (no ``peft_type``)."""

    name = "bottleneck"
    peft_type = None
    weights_file = WEIGHTS_FILE
    pickle_hint = ("load it with the adapters library (model.load_adapter) and save it with "
                   "model.save_adapter(folder, name, use_safetensors=True)")
    adapter_class = BottleneckAdapter
    engine_role = "stream"
    layered = False

    def claims(self, folder: Path, cfg: dict[str, Any]) -> bool:
        """A config without ``peft_type`` holding the library's ``config`` object and its model fields."""
        return "peft_type" not in cfg and "config" in cfg and ("hidden_size" in cfg or "model_type" in cfg)

    def parse(self, folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> BottleneckAdapter:
        bn = _check_config(folder, cfg)
        _check_tensors(folder, cfg, bn, tensors)
        return BottleneckAdapter(tensors=dict(tensors), config=cfg)

    def peft_config(self, adapter: BottleneckAdapter, cfg: dict[str, Any]) -> dict[str, Any]:
        return cfg  # written as read: the library's own adapter_config.json

    def files(self, adapter: BottleneckAdapter) -> dict[str, dict[str, torch.Tensor] | None]:
        return {WEIGHTS_FILE: adapter.tensors}

    # ----------------------------------------------------------------------------------------- arithmetic
    def check_pair(self, first: BottleneckAdapter, other: BottleneckAdapter, names: str, *,
                   same_variant: bool) -> None:
        if first.hidden_size != other.hidden_size:
            raise IncompatibleAdaptersError(
                f"{names} have hidden_size {first.hidden_size} vs {other.hidden_size}: they belong to "
                "different models.", field="hidden_size", left=first.hidden_size, right=other.hidden_size)
        for what, get in (("non_linearity", lambda a: a.bn["non_linearity"].lower()),
                          ("input (is_parallel, original_ln_before)", _reads),
                          ("residual (original_ln_after, residual_before_ln)", lambda a: _residuals(a.bn))):
            if get(first) != get(other):
                raise IncompatibleAdaptersError(
                    f"{names} differ in {what} ({get(first)!r} vs {get(other)!r}): a sum of their outputs is not one "
                    "bottleneck adapter. Serve them side by side with the adapters library (an Average or Stack "
                    "block).", field=what.split(" ")[0], left=get(first), right=get(other))

    def linear(self, adapters: Sequence[BottleneckAdapter], weights: list[float], method: str, params: dict,
               expr: str, op: str | None) -> BottleneckAdapter:
        """``Σ wᵢ·fᵢ`` exactly, as one adapter of stacked widths (see the module docstring)."""
        if method != "task_arithmetic":
            raise NotComposableError(
                f"{method} trims and elects signs of parameter vectors; a bottleneck adapter's output is a nonlinear "
                "function of its parameters, so that has no meaning here. Combine bottleneck adapters by weighted sums "
                "of their outputs (composer.add, composer.interpolate, weights summing to 1 for the adapters "
                "library's Average block), or average their parameters, approximately, with "
                "composer.kinds.bottleneck.average_parameters (the library's average_adapter).")
        recipe = Recipe(expression=expr, inputs=inputs(adapters), weights=tuple(weights), method=op or method,
                        params=params, exact=True)
        return output_sum(adapters, weights, recipe)

    def compose(self, a: Any, b: Any, expr: str) -> Any:
        raise NotComposableError(
            "compose() is the exact product of adapters applied one after the other; two bottleneck adapters in "
            "series (the adapters library's Stack block) feed one's output into the other's nonlinearity, which no "
            "single bottleneck adapter equals. Stack them with the adapters library, or sum their outputs with "
            "composer.add(a, b) (what both applied in parallel add to the stream).")

    # ------------------------------------------------------------------------------------------- models
    def check_fits(self, adapter: BottleneckAdapter, model: Any, modules: Mapping[str, Any] | None) -> None:
        layers = decoder_layers(model)
        if layers is None:
            raise IncompatibleAdaptersError(
                "This model has no Llama-style decoder layers (model.layers[i] with input_layernorm, self_attn, "
                "post_attention_layernorm and mlp), where the adapters library places bottleneck adapters for "
                f"{adapter.config.get('model_type')!r} models. Load it with the adapters library.",
                field="architecture", left=adapter.config.get("model_type"), right=type(model).__name__)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden != adapter.hidden_size:
            raise IncompatibleAdaptersError(
                f"The adapter was saved for hidden_size {adapter.hidden_size}, the model has {hidden}; was it trained "
                f"on another base model ({adapter.base_model!r})?", field="hidden_size", left=adapter.hidden_size,
                right=hidden)
        top = max(i for i, _ in adapter.blocks())
        if top >= len(layers):
            raise IncompatibleAdaptersError(
                f"The adapter has tensors for layer {top}, the model has {len(layers)} layers.", field="layers",
                left=top + 1, right=len(layers))
        leave = set(adapter.bn.get("leave_out", []))
        missing = [i for i in range(top + 1, len(layers)) if i not in leave]
        if missing:
            raise IncompatibleAdaptersError(
                f"The adapter has no tensors for layer {missing[0]} of this {len(layers)}-layer model and leave_out "
                "does not list it (the library would add a fresh, untrained adapter there); was it trained on a "
                "smaller model?", field="layers", left=top + 1, right=len(layers))

    # ------------------------------------------------------------------------------------------ showing
    def describe(self, adapter: BottleneckAdapter) -> dict[str, Any]:
        bn, blocks = adapter.bn, adapter.blocks()
        return {"architecture": adapter.architecture, "reduction_factor": bn["reduction_factor"],
                "non_linearity": bn["non_linearity"], "scaling": bn.get("scaling", 1.0),
                "places": [p for p in PLACES if bn[_FLAG[p]]], "layers": sorted({i for i, _ in blocks}),
                "widths": sorted({b.down.shape[0] for b in blocks.values()}), "hidden_size": adapter.hidden_size,
                "model_type": adapter.config.get("model_type"), "adapter_name": adapter.name,
                "composable": True, "served_per_row": True}

    def label(self, adapter: BottleneckAdapter) -> str:
        return f"bottleneck ({adapter.architecture}, {adapter.bn['non_linearity']})"

    def layer_rows(self, adapter: BottleneckAdapter, layer_of: Any) -> list[dict[str, Any]]:
        acc: dict[int, float] = {}
        for place, n in adapter.norms().items():
            layer = int(place.split(".")[1])
            acc[layer] = acc.get(layer, 0.0) + n["up"] ** 2
        return [{"layer": i, "norm": math.sqrt(v), "series": "bottleneck ‖s·W_up‖"} for i, v in sorted(acc.items())]


def _reads(a: BottleneckAdapter) -> str:
    """What the adapter's bottleneck reads: the sublayer's input stream, its output, or the stream after both."""
    if a.bn.get("is_parallel"):
        return "input"
    return "stream" if a.bn.get("original_ln_before") else "output"


# ------------------------------------------------------------------------------------------- combining
def output_sum(adapters: Sequence[BottleneckAdapter], weights: Sequence[float], recipe: Recipe) -> BottleneckAdapter:
    """The adapter whose ``f`` is ``Σ wᵢ·fᵢ`` at every place: down-projections stacked, up-projections concatenated
    and scaled by ``wᵢ·sᵢ`` (its ``scaling`` is 1), zero-padded to one width per layer (the library gives both places
    of a layer one width)."""
    first = adapters[0]
    hidden = first.hidden_size
    places: dict[tuple[int, str], list[tuple[float, Block]]] = {}
    for a, w in zip(adapters, weights):
        s = float(a.bn.get("scaling", 1.0))
        for lp, b in a.blocks().items():
            places.setdefault(lp, []).append((w * s, b))
    flags = {p: any(a.bn[_FLAG[p]] for a in adapters) for p in PLACES}
    layers = sorted({i for i, _ in places})
    dtype = first.tensors[next(iter(first.tensors))].dtype
    out_blocks: dict[tuple[int, str], Block] = {}
    widths: dict[int, int] = {}
    for i in layers:
        parts = {p: places.get((i, p), []) for p in PLACES if flags[p]}
        r = max(1, max(sum(b.down.shape[0] for _, b in ps) for ps in parts.values()))
        widths[i] = r
        for p, ps in parts.items():
            down = torch.zeros(r, hidden, dtype=torch.float64)
            down_bias = torch.zeros(r, dtype=torch.float64)
            up = torch.zeros(hidden, r, dtype=torch.float64)
            up_bias = torch.zeros(hidden, dtype=torch.float64)
            at = 0
            for w, b in ps:
                n = b.down.shape[0]
                down[at:at + n], down_bias[at:at + n] = b.down.double(), b.down_bias.double()
                up[:, at:at + n] = w * b.up.double()
                up_bias += w * b.up_bias.double()
                at += n
            out_blocks[(i, p)] = Block(*(t.to(dtype) for t in (down, down_bias, up, up_bias)))
    below = set(range(max(layers) + 1))
    gaps = below - set(layers)  # layers no input adapts, up to the last one some input adapts
    beyond = set.intersection(*(set(a.bn.get("leave_out", [])) for a in adapters)) - below  # every input leaves out
    bn = dict(first.bn)
    bn.update(mh_adapter=flags["attention"], output_adapter=flags["output"], scaling=1.0,
              reduction_factor=_reduction_factors(hidden, widths), leave_out=sorted(gaps | beyond))
    cfg = dict(first.config)
    cfg["config"] = bn
    result = BottleneckAdapter(tensors={}, config=cfg, recipe=recipe)
    tensors = {result.key(i, p, param): t for (i, p), b in out_blocks.items() for param, t in zip(PARAMS, b)}
    for k, t in tensors.items():
        check_result(k, t, None, list(weights))
    return BottleneckAdapter(tensors=tensors, config=cfg, recipe=recipe)


def _reduction_factors(hidden: int, widths: Mapping[int, int]) -> float | dict[str, float]:
    """Reduction factors giving each layer its width under the library's ``int(hidden // rf)``: one number when every
    layer has the same width, else a per-layer mapping."""
    def rf(r: int) -> float:
        value = hidden / r
        while int(hidden // value) != r:  # float division landing just below r: nudge the factor down
            value = math.nextafter(value, 0.0)
        return value

    distinct = set(widths.values())
    if len(distinct) == 1:
        return rf(distinct.pop())
    common = max(distinct, key=lambda r: sum(1 for v in widths.values() if v == r))
    out: dict[str, float] = {"default": rf(common)}
    out.update({str(i): rf(r) for i, r in widths.items() if r != common})
    return out


def average_parameters(adapters: Sequence[BottleneckAdapter], weights: Sequence[float] | None = None, *,
                       expression: str | None = None) -> BottleneckAdapter:
    """The adapters library's ``average_adapter`` (``combine_strategy="linear"``): ``Σ wᵢ·θᵢ`` over every tensor of
    adapters with the same config and places (weights normalised to sum to 1, as the library does). **Approximate**:
    the nonlinearity makes ``f`` of averaged parameters differ from the average of the ``f``'s (the exact output
    average is ``composer.add``/``composer.merge`` with weights summing to 1), so the recipe says ``exact=False``.

    Raises:
        IncompatibleAdaptersError: the configs (apart from dropout and initialisation) or the places differ.
        InvalidArgumentError: weights of the wrong length, or summing to 0.
    """
    from ..errors import InvalidArgumentError

    adapters = list(adapters)
    if not adapters:
        raise InvalidArgumentError("No adapters given; pass at least one.", name="adapters", value=[])
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    total = sum(weights)
    if len(weights) != len(adapters) or not math.isfinite(total) or total == 0:
        raise InvalidArgumentError(f"weights must be {len(adapters)} finite numbers with a non-zero sum, got "
                                   f"{weights}.", name="weights", value=weights)
    weights = [w / total for w in weights]
    first = adapters[0]
    same = {k: v for k, v in first.bn.items() if k not in _IGNORED}
    for a in adapters[1:]:
        a.validate()
        other = {k: v for k, v in a.bn.items() if k not in _IGNORED}
        if other != same or a.hidden_size != first.hidden_size or set(a.blocks()) != set(first.blocks()):
            diff = next((k for k in sorted(set(same) | set(other)) if same.get(k) != other.get(k)), "places")
            raise IncompatibleAdaptersError(
                f"average_parameters needs adapters of one config and the same places (the library's "
                f"average_adapter requires it); they differ in {diff}. Sum their outputs instead (composer.add).",
                field=diff, left=same.get(diff), right=other.get(diff))
    from ..arith import label

    labels = [label(a, i) for i, a in enumerate(adapters)]
    expr = expression or f"average_parameters({', '.join(f'{w:g}*{n}' for w, n in zip(weights, labels))})"
    recipe = Recipe(expression=expr, inputs=inputs(adapters), weights=tuple(weights), method="average_parameters",
                    exact=False)
    fb = first.blocks()
    tensors = {}
    for lp in fb:
        for param in PARAMS:
            key = first.key(*lp, param)
            acc = sum(w * a.tensors[a.key(*lp, param)].double() for w, a in zip(weights, adapters))
            tensors[key] = acc.to(first.tensors[key].dtype)
    return BottleneckAdapter(tensors=tensors, config=dict(first.config), recipe=recipe)


KIND = BottleneckKind()
