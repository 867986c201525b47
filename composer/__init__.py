"""composer: task arithmetic on RoAd adapters and task prompt vectors, in PEFT format.

Public surface::

    load(path) / save(adapter, path) / from_peft(model)        PEFT-format I/O
    add, sub, negate, scale, interpolate, merge, compose         arithmetic (see DESIGN.md)
    evaluate("0.7*a + 0.3*b - c", resolve=...)                   expressions
    init(model, adapter_or_expression)                           a trainable PeftModel starting there
    check_compatible(adapters)                                   the checks every operation runs first
    fit(adapters, examples, model=..., tokenizer=...)            mix coefficients fitted to a few examples
    subspace.Subspace / active_pairs / overlap                   RoAd adapters trained in a share of the pairs

Not to be confused with MosaicML's ``composer`` package on PyPI, which uses the same import name.
"""

from __future__ import annotations

from .adapters import Adapter, PromptVector, Recipe, RoadAdapter, describe
from .errors import (
    AdapterFormatError,
    ApproximationWarning,
    CompatibilityWarning,
    ComposerError,
    DataError,
    ExpressionError,
    IncompatibleAdaptersError,
    InvalidValueError,
    NotComposableError,
    UnsafeFormatError,
)
from .io import from_peft, load, save, validate_folder
from .ops import add, check_compatible, compose, interpolate, merge, negate, scale, sub
from .expr import evaluate, parse
from .initialise import init
from .fit import FitError, apply_coefficients, fit, rebuild
from .subspace import Subspace, SubspaceError, active_pairs, overlap
from .merge_methods import METHODS

__version__ = "0.1.0"

__all__ = [
    "Adapter", "RoadAdapter", "PromptVector", "Recipe", "describe",
    "load", "save", "from_peft", "validate_folder",
    "add", "sub", "negate", "scale", "interpolate", "merge", "compose", "check_compatible", "METHODS",
    "evaluate", "parse", "init", "fit", "apply_coefficients", "rebuild",
    "Subspace", "active_pairs", "overlap",
    "ComposerError", "AdapterFormatError", "UnsafeFormatError", "InvalidValueError",
    "IncompatibleAdaptersError", "NotComposableError", "ExpressionError", "DataError", "FitError",
    "SubspaceError",
    "CompatibilityWarning", "ApproximationWarning",
]
