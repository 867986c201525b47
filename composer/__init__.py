"""composer: task arithmetic on RoAd adapters, LoRA adapters and task prompt vectors, in PEFT format.

Public surface::

    load(path) / save(adapter, path) / from_peft(model)        PEFT-format I/O
    Parts / load_any(path)                                       a recipe of parts (``a ; b``), one row (parts)
    add, sub, negate, scale, interpolate, merge, compose         arithmetic (see DESIGN.md)
    compress(lora, rank=...)                                     LoRA rank truncation by SVD, error reported
    evaluate("0.7*a + 0.3*b - c", resolve=...) / parse(text)     expressions; format_name(name) writes a name
    init(model, adapter_or_expression)                           a trainable PeftModel starting there
    check_compatible(adapters) / check_fits(adapter, model)      the checks every operation runs first
    METHODS                                                      merge methods and the parameters they declare
    fit(adapters, examples, model=..., tokenizer=...)            mix coefficients fitted to a few examples
    subspace.Subspace / active_pairs / overlap                   RoAd adapters trained in a share of the pairs
    kinds.of(adapter) / kinds.by_peft_type(t)                    the adapter kinds, one module each (composer/kinds/)
    precheck.check(folder)                                       a push's quick check, without torch or PEFT

Errors are :class:`ComposerError` subclasses (each also a ``ValueError``), in :mod:`composer.errors`.

Not to be confused with MosaicML's ``composer`` package on PyPI, which uses the same import name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# Errors are plain Python and always loaded; everything else (torch, safetensors, PEFT) is imported on first
# use, so that ``import composer`` and ``from composer.errors import ...`` cost nothing for a command line
# that only lists or tags versions.
from .errors import (
    AdapterFormatError,
    ApproximationWarning,
    CompatibilityWarning,
    ComposerError,
    DataError,
    ExpressionError,
    IncompatibleAdaptersError,
    InvalidArgumentError,
    InvalidCardError,
    InvalidValueError,
    LimitExceededError,
    NotComposableError,
    UnsafeFormatError,
)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and editors
    from .adapters import Adapter, LoraAdapter, PromptVector, Recipe, RoadAdapter, describe
    from .expr import format_name, parse
    from .initialise import check_fits, init
    from .interpret import evaluate
    from .io import from_peft, load, save, validate_folder
    from .merge_methods import METHODS
    from .mixfit import FitError, apply_coefficients, fit, rebuild
    from .ops import add, check_compatible, compose, compress, interpolate, merge, negate, scale, sub
    from .parts import Parts, load_any
    from .subspace import Subspace, SubspaceError, active_pairs, overlap

_LAZY = {
    "adapters": ("Adapter", "RoadAdapter", "LoraAdapter", "PromptVector", "Recipe", "describe"),
    "io": ("load", "save", "from_peft", "validate_folder"),
    "parts": ("Parts", "load_any"),
    "ops": ("add", "sub", "negate", "scale", "interpolate", "merge", "compose", "compress", "check_compatible"),
    "interpret": ("evaluate",),
    "expr": ("parse", "format_name"),
    "initialise": ("init", "check_fits"),
    "merge_methods": ("METHODS",),
    "mixfit": ("fit", "apply_coefficients", "rebuild", "FitError"),
    "subspace": ("Subspace", "SubspaceError", "active_pairs", "overlap"),
}
_OWNER = {name: module for module, names in _LAZY.items() for name in names}
_SUBMODULES = set(_LAZY) | {"road_math", "lora_math", "card", "errors", "data", "limits", "advice", "env", "kinds",
                             "provenance", "folder", "arith", "precheck", "road_sizes"}


def __getattr__(name: str):
    import importlib

    if name in _OWNER:
        value = getattr(importlib.import_module(f".{_OWNER[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'composer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_OWNER))


__version__ = "0.1.0"

__all__ = [
    "Adapter", "RoadAdapter", "LoraAdapter", "PromptVector", "Recipe", "describe",
    "load", "load_any", "save", "from_peft", "validate_folder", "Parts",
    "add", "sub", "negate", "scale", "interpolate", "merge", "compose", "compress", "check_compatible", "METHODS",
    "evaluate", "parse", "format_name", "init", "check_fits", "fit", "apply_coefficients", "rebuild",
    "Subspace", "active_pairs", "overlap", "FitError", "SubspaceError", "DataError",
    "ComposerError", "AdapterFormatError", "UnsafeFormatError", "InvalidValueError",
    "IncompatibleAdaptersError", "NotComposableError", "ExpressionError", "InvalidArgumentError",
    "InvalidCardError", "LimitExceededError",
    "CompatibilityWarning", "ApproximationWarning",
]
