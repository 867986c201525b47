"""The push's quick check: whether an adapter folder is one :func:`composer.load` certainly accepts, decided
without torch or PEFT (importing those two takes seconds; ``hub push`` of a shipped adapter should not).

::

    check(folder) -> Checked | None      Checked: kind, config, recipe (what the model card needs)

``None`` means "cannot tell here": the caller runs the full :func:`composer.load`, which accepts or names what
is wrong. The quick check never refuses, so every error message keeps one owner (the full reader), and it only
has to be sound for what it accepts; it accepts only what it checks as completely as the full reader does:

- ``adapter_config.json`` through the same bounded reader (:func:`composer.folder.read_json`); its
  ``peft_type`` one of ROAD, LORA, PROMPT_TUNING, and every key one that PEFT's config class for that type
  knows, holding a value that class accepts (:data:`COMMON` and :data:`KEYS`: values other than these, DoRA,
  rank patterns, a ``target_modules`` regular expression, ``modules_to_save`` ... go to the full reader);
- each safetensors file's header read as JSON (8-byte length, then the header): float dtypes only, every
  tensor's bytes where its offsets say, the offsets tiling the data exactly; the values checked finite on
  their raw bits (an exponent of all ones is inf or NaN in every float format), at C speed with ``bytes``;
- the kind's tensor names and shapes against the config, as its module in :mod:`composer.kinds` reads them,
  and ``target_modules`` against the tensors as PEFT matches a list of names;
- ``recipe.json`` through the same reader (:func:`composer.folder.read_recipe`).

IA³, bottleneck adapters and every other PEFT type go to the full reader. ``tests/test_precheck.py`` holds
this against PEFT's own config classes and :func:`composer.load`, kind by kind: what it accepts, both accept.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import limits
from .errors import ComposerError
from .folder import CONFIG, PREFIX, PROMPT_VECTOR, WEIGHTS, dimension, number, read_json, read_recipe
from .provenance import Recipe
from .road_sizes import VARIANTS, layer_width

__all__ = ["Checked", "check", "COMMON", "KEYS", "KIND_NAMES"]


@dataclass(frozen=True)
class Checked:
    """A folder the quick check accepted: what :func:`composer.card.build_card` reads of an adapter."""

    kind: str
    config: dict[str, Any]
    recipe: Recipe | None = None

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


class _Unsure(Exception):
    """Something this check does not decide: the full reader will."""


def _none(v: Any) -> bool:
    return v is None


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _str_or_none(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _is(value: Any) -> Callable[[Any], bool]:
    return lambda v: type(v) is type(value) and v == value


def _count_or_none(v: Any) -> bool:
    return v is None or (type(v) is int and v > 0)


def _names_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, dict) and all(isinstance(x, str) for x in v.values()))


# PEFT's task types (peft.TaskType; PeftConfig refuses any other): the test keeps this equal to PEFT's list.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# Keys every PEFT config has, and the values accepted here.
COMMON: dict[str, Callable[[Any], bool]] = {
    "peft_type": lambda v: isinstance(v, str),
    "task_type": lambda v: v is None or v in TASK_TYPES,
    "base_model_name_or_path": _str_or_none,
    "revision": _str_or_none,
    "peft_version": _str_or_none,
    "inference_mode": _bool,
    "auto_mapping": _names_or_none,  # PEFT records the model class of a base saved without a Hub id
    "modules_to_save": _none,
}
_TARGETS = {"target_modules": lambda v: isinstance(v, list)}  # a regular expression: the full reader times it

# Per type, the other keys its PEFT config class has (as PEFT 0.21 writes them) and the values accepted here:
# the fields this check reads itself (r, group_size, token_dim ...) are checked below, the rest must hold the
# value PEFT writes by default, or one PEFT's class is known to take without a check of its own.
KEYS: dict[str, dict[str, Callable[[Any], bool]]] = {
    "ROAD": {"variant": lambda v: v in VARIANTS, "group_size": lambda v: True, "init_weights": _bool,
             **_TARGETS},
    "LORA": {
        **_TARGETS,
        "r": lambda v: True, "lora_alpha": lambda v: True, "use_rslora": _bool, "fan_in_fan_out": _bool,
        "lora_dropout": lambda v: type(v) in (int, float) and 0 <= v < 1,
        "init_lora_weights": _bool, "bias": _is("none"), "lora_bias": _is(False), "use_dora": _is(False),
        "rank_pattern": _is({}), "alpha_pattern": _is({}), "loftq_config": _is({}),
        "megatron_core": _is("megatron.core"), "use_qalora": _is(False), "ensure_weight_tying": _is(False),
        "qalora_group_size": lambda v: type(v) is int and v > 0,
        **dict.fromkeys(("exclude_modules", "layers_to_transform", "layers_pattern", "megatron_config",
                         "trainable_token_indices", "eva_config", "corda_config", "lora_ga_config",
                         "velora_config", "alora_invocation_tokens", "monteclora_config", "layer_replication",
                         "target_parameters", "use_bdlora", "arrow_config", "kasa_config"), _none),
    },
    "PROMPT_TUNING": {
        "num_virtual_tokens": lambda v: True, "token_dim": lambda v: True,
        "num_transformer_submodules": lambda v: True, "num_attention_heads": _count_or_none,
        "num_layers": _count_or_none,
        "prompt_tuning_init": lambda v: v in ("RANDOM", "SAMPLE_VOCAB"),  # TEXT needs a tokenizer
        "prompt_tuning_init_text": _str_or_none, "tokenizer_name_or_path": _str_or_none,
        "tokenizer_kwargs": _none,
    },
}
KIND_NAMES = {"ROAD": "road", "LORA": "lora", "PROMPT_TUNING": "prompt"}  # as composer.kinds names them


def check(folder: str | Path) -> Checked | None:
    """The folder's kind, config and recipe when :func:`composer.load` certainly accepts it, else ``None``.

    Never raises for what the folder holds (the full reader says what is wrong).
    """
    folder = Path(folder)
    try:
        return _check(folder)
    except (_Unsure, ComposerError, OSError):
        return None


def _check(folder: Path) -> Checked:
    if not folder.is_dir():
        raise _Unsure
    cfg = read_json(folder / CONFIG, "an adapter config")
    if not isinstance(cfg, dict):
        raise _Unsure
    peft_type = cfg.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in KEYS:
        raise _Unsure
    known = {**COMMON, **KEYS[peft_type]}
    for key, value in cfg.items():
        if key not in known or not known[key](value):
            raise _Unsure
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise _Unsure
    size = sum(p.stat().st_size for p in (weights, folder / PROMPT_VECTOR) if p.is_file())
    limits.check("adapter_bytes", size, "the adapter")
    tensors = _Safetensors(weights)
    {"ROAD": _road, "LORA": _lora, "PROMPT_TUNING": _prompt}[peft_type](folder, cfg, tensors)
    return Checked(KIND_NAMES[peft_type], cfg, read_recipe(folder))


# ------------------------------------------------------------------------------------------- safetensors

_ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # composer.folder.FLOAT_DTYPES, by size
_HEADER_MAX = 100_000_000  # what safetensors itself reads at most


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Unsure  # a name twice: which one a reader keeps is its own business
    return out


class _Safetensors:
    """A safetensors file's header (names, dtypes, shapes, where each tensor's bytes are) and, on demand, its
    values; :class:`_Unsure` for anything but a plainly well-formed file of float tensors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data = path.read_bytes()
        if len(data) < 10:
            raise _Unsure
        n = int.from_bytes(data[:8], "little")
        if not 2 <= n <= min(len(data) - 8, _HEADER_MAX):
            raise _Unsure
        try:
            header = json.loads(data[8:8 + n].decode("utf-8"), object_pairs_hook=_unique)
        except (ValueError, RecursionError):
            raise _Unsure from None
        if not isinstance(header, dict):
            raise _Unsure
        meta = header.pop("__metadata__", None)
        strings = isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
        if meta is not None and not strings:
            raise _Unsure
        self.info: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, t in header.items():
            if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
                raise _Unsure
            shape, offsets = t["shape"], t["data_offsets"]
            if not (t["dtype"] in _ITEMSIZE and isinstance(shape, list) and isinstance(offsets, list)
                    and all(type(d) is int and d >= 0 for d in shape)
                    and len(offsets) == 2 and all(type(o) is int for o in offsets)):
                raise _Unsure
            start, end = offsets
            if start < 0 or end - start != math.prod(shape) * _ITEMSIZE[t["dtype"]]:
                raise _Unsure
            self.info[name] = (t["dtype"], tuple(shape), 8 + n + start, 8 + n + end)
        at = 8 + n
        for _, _, start, end in sorted(self.info.values(), key=lambda i: (i[2], i[3])):
            if start != at:
                raise _Unsure  # a gap or an overlap
            at = end
        if at != len(data):
            raise _Unsure
        self._data = data

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info[name][1]

    def dtype(self, name: str) -> str:
        return self.info[name][0]

    def _bytes(self, name: str) -> bytes:
        _, _, start, end = self.info[name]
        return self._data[start:end]

    def check_finite(self, name: str) -> None:
        """:class:`_Unsure` when any value is inf or NaN (the full reader names the tensor and the index).

        A value is inf or NaN when its exponent bits are all ones; with the file's little-endian bytes taken
        with a stride (one byte of every value, at C speed), that is a test of one or two bytes per value."""
        size = _ITEMSIZE[self.dtype(name)]
        data = self._bytes(name)
        (hi, hi_mask), low = _EXPONENT[self.dtype(name)]
        top = data[hi::size].translate(_ALL_SET[hi_mask])
        if low is None:
            bad = b"\x01" in top
        else:
            lo, lo_mask = low
            low_set = data[lo::size].translate(_ALL_SET[lo_mask])
            bad = int.from_bytes(top, "little") & int.from_bytes(low_set, "little")
        if bad:
            raise _Unsure

    def values(self, name: str) -> list[float]:
        """A float32 or float64 tensor's values, flat (Python floats widen both exactly)."""
        dtype = self.dtype(name)
        if dtype not in ("F32", "F64") or sys.byteorder != "little":
            raise _Unsure
        return memoryview(self._bytes(name)).cast("f" if dtype == "F32" else "d").tolist()


# Where each format keeps its exponent, as (byte, mask) pairs within one little-endian value: the value is inf
# or NaN when every masked bit is set. float16 0x7C00, bfloat16 0x7F80, float32 0x7F800000, float64 0x7FF0...
_EXPONENT = {"F16": ((1, 0x7C), None), "BF16": ((1, 0x7F), (0, 0x80)), "F32": ((3, 0x7F), (2, 0x80)),
             "F64": ((7, 0x7F), (6, 0xF0))}
# byte -> 1 when every bit of the mask is set in it, else 0 (a bytes.translate table per mask)
_ALL_SET = {m: bytes(int(b & m == m) for b in range(256)) for m in {0x7C, 0x7F, 0x80, 0xF0}}


# ----------------------------------------------------------------------------------------------- kinds


def _modules(tensors: _Safetensors, suffixes: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``module -> {suffix: tensor name}`` for tensor names ``base_model.model.<module><suffix>``."""
    out: dict[str, dict[str, str]] = {}
    for name in tensors.info:
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if not name.startswith(PREFIX) or suffix is None or len(name) <= len(PREFIX) + len(suffix):
            raise _Unsure
        out.setdefault(name[len(PREFIX):-len(suffix)], {})[suffix] = name
    if not out or any(len(parts) != len(suffixes) for parts in out.values()):
        raise _Unsure
    return out


def _targets(cfg: dict[str, Any], modules: list[str]) -> None:
    """``target_modules`` as PEFT matches a list of names (``check_target_module_exists``: the name itself or
    a ``.name`` suffix; no layer or exclude options here), and every listed name used (as the full reader
    asks)."""
    targets = cfg.get("target_modules")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise _Unsure
    for m in modules:
        if not any(m == t or m.endswith("." + t) for t in targets):
            raise _Unsure
    for t in targets:
        if not any(m == t or m.endswith("." + t) for m in modules):
            raise _Unsure


def _road(folder: Path, cfg: dict[str, Any], tensors: _Safetensors) -> None:
    variant = cfg.get("variant", "road_1")
    g = dimension(cfg, "group_size", 64, folder)
    if g % 2:
        raise _Unsure
    modules = _modules(tensors, (".road_theta", ".road_alpha"))
    for parts in modules.values():
        shape = tensors.shape(parts[".road_theta"])
        if len(shape) != 1 or tensors.shape(parts[".road_alpha"]) != shape:
            raise _Unsure
        width = layer_width(variant, shape[0])
        if width is None or width % g:
            raise _Unsure
        for name in parts.values():
            tensors.check_finite(name)
    _targets(cfg, sorted(modules))


def _lora(folder: Path, cfg: dict[str, Any], tensors: _Safetensors) -> None:
    r = dimension(cfg, "r", 8, folder)
    number(cfg, "lora_alpha", 8, folder)
    modules = _modules(tensors, (".lora_A.weight", ".lora_B.weight"))
    for parts in modules.values():
        a, b = tensors.shape(parts[".lora_A.weight"]), tensors.shape(parts[".lora_B.weight"])
        if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
            raise _Unsure
        for name in parts.values():
            tensors.check_finite(name)
    _targets(cfg, sorted(modules))


def _prompt(folder: Path, cfg: dict[str, Any], tensors: _Safetensors) -> None:
    if set(tensors.info) != {"prompt_embeddings"}:
        raise _Unsure
    tokens = dimension(cfg, "num_virtual_tokens", None, folder)
    n = tokens * dimension(cfg, "num_transformer_submodules", 1, folder)
    shape = (n, dimension(cfg, "token_dim", None, folder))
    if tensors.shape("prompt_embeddings") != shape:
        raise _Unsure
    tensors.check_finite("prompt_embeddings")
    path = folder / PROMPT_VECTOR
    if not path.is_file():
        return
    parts = _Safetensors(path)
    if not {"init", "vector"} <= set(parts.info):
        raise _Unsure
    for name in ("init", "vector"):
        if parts.shape(name) != shape:
            raise _Unsure
        parts.check_finite(name)
    # The full reader asks torch.allclose(init + vector, prompt, rtol=1e-5, atol=1e-6) in the tensors' dtype;
    # accepted here for float32/float64 only (a 16-bit sum rounds by more than the tolerance), and only within
    # half the tolerance (in float64), so that rounding there cannot tip the answer.
    dtypes = {tensors.dtype("prompt_embeddings"), parts.dtype("init"), parts.dtype("vector")}
    if len(dtypes) != 1 or dtypes & {"F16", "BF16"}:
        raise _Unsure
    prompt = tensors.values("prompt_embeddings")
    pairs = zip(prompt, parts.values("init"), parts.values("vector"))
    if not all(abs(i + v - p) <= 0.5 * (1e-6 + 1e-5 * abs(p)) for p, i, v in pairs):
        raise _Unsure
