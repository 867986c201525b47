"""What every kind's folder reader shares: the PEFT folder's file names and the checked readers of its
config, recipe and safetensors (bounded sizes, float dtypes, positive dimensions, PEFT's own config class,
target modules that match the tensors). :mod:`composer.io` reads and writes whole folders; each kind
(:mod:`composer.kinds`) parses its own tensors with these.

Importing it loads neither torch nor PEFT (each reader that needs one imports it), so the push's quick check
(:mod:`composer.precheck`) shares the same config, recipe and size rules."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import limits
from .errors import AdapterFormatError, ComposerError
from .provenance import Recipe
from .text import shown

if TYPE_CHECKING:
    import torch

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PROMPT_VECTOR = "prompt_vector.safetensors"
RECIPE = "recipe.json"
MANIFEST = "parts.json"  # a recipe of parts (composer.parts) instead of an adapter_config.json
CARD = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
PREFIX = "base_model.model."


def read_json(path: Path, what: str) -> Any:
    """A small JSON file, bounded in size and nesting, parsed without ever recursing past the limit."""
    size = path.stat().st_size
    limits.check("config_bytes", size, f"{path} ({what})")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and integers of thousands of digits
        raise AdapterFormatError(f"{shown(path)} is not valid JSON: {e}", path=path) from e
    except RecursionError as e:
        raise limits.exceeded("nesting", "hundreds of levels", what=f"The nesting of {path}") from e
    limits.check_nesting(data, str(path))
    return data


def read_recipe(folder: Path) -> Recipe | None:
    """The folder's ``recipe.json`` (``None`` when it has none), every field checked.

    Raises:
        AdapterFormatError: not JSON, or not a recipe; LimitExceededError: too big, too deep, too long.
    """
    path = folder / RECIPE
    if not path.is_file():
        return None
    data = read_json(path, "a recipe")
    try:
        recipe = Recipe.from_dict(data)
        limits.check("expression_chars", len(recipe.expression), f"{path}: the expression's length")
    except (TypeError, ValueError) as e:
        if isinstance(e, ComposerError):
            raise
        raise AdapterFormatError(f"{path} is not a valid recipe: {e}", path=path) from e
    return recipe


# What PEFT and our arithmetic handle (safetensors' names; composer.precheck reads the same set from headers);
# float8 and complex tensors would fail later, deep inside torch.
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as e:
        raise AdapterFormatError(
            f"{path} is not a readable safetensors file ({e}). It may be truncated or corrupt; "
            "re-export it with safetensors.torch.save_file.", path=path) from e
    for name, t in tensors.items():
        if t.dtype not in floats:
            raise AdapterFormatError(
                f"Tensor '{name}' in {path} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64 "
                "(convert it with tensor.float() before saving).", path=path, tensor=name)
    return tensors


def dimension(cfg: dict[str, Any], key: str, default: Any, folder: Path) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterFormatError(f"{CONFIG}: {key} must be a positive integer, got {str(value)[:60]!r}.",
                                 path=folder)
    limits.check("dimension", value, f"{CONFIG}: {key}")
    return value


def peft_reads(folder: Path, cfg: dict[str, Any]) -> Any:
    """PEFT's own config class for ``cfg`` (what ``PeftModel.from_pretrained`` builds), or a one-line error."""
    from peft import PeftConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return PeftConfig.from_peft_type(**PeftConfig.check_kwargs(**cfg))
    except (TypeError, ValueError, KeyError, AttributeError, re.error) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AdapterFormatError(f"{folder / CONFIG}: PEFT cannot load this config ({first}). Fix the field "
                                 "it names, or re-save the adapter with PEFT.", path=folder) from e


def check_targets(folder: Path, cfg: dict[str, Any], modules: list[str], suffix: str = "road_theta") -> None:
    """Every tensor's module must be one PEFT targets, and every listed target must have tensors."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = cfg.get("target_modules")
    ok = (isinstance(targets, str) and 0 < len(targets) <= 1000) or (
        isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets))
    if not ok:
        raise AdapterFormatError(
            f"{CONFIG}: target_modules must be a non-empty list of module names (e.g. [\"q_proj\", \"v_proj\"]) "
            f"or a regular expression, got {str(targets)[:80]!r}.", path=folder)
    pcfg = peft_reads(folder, cfg)
    try:
        # PEFT returns a truthy marker for excluded modules: those are not adapted either.
        found = {m: check_target_module_exists(pcfg, m) for m in modules}
        unlisted = [m for m, hit in found.items() if not hit or type(hit).__name__ == "_ExcludedModule"]
    except re.error as e:
        raise AdapterFormatError(f"{CONFIG}: target_modules {targets!r:.80} is not a valid regular expression "
                                 f"({e}).", path=folder) from e
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        # e.g. modules_to_save: 1 or layers_to_transform: "x" — PEFT's own matching fails on them
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AdapterFormatError(f"{CONFIG}: PEFT cannot match its modules with this config ({first}); check "
                                 "modules_to_save, exclude_modules, layers_to_transform and layers_pattern.",
                                 path=folder) from e
    if unlisted:
        raise AdapterFormatError(
            f"{CONFIG}: the weights hold tensors for '{unlisted[0]}', which target_modules {targets!r:.80} does "
            "not select; PEFT would not load them. List every adapted module in target_modules.",
            path=folder, tensor=f"{unlisted[0]}.{suffix}")
    if isinstance(targets, list):
        unused = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
        if unused:
            raise AdapterFormatError(
                f"{CONFIG}: target_modules lists '{unused[0]}', but the weights hold no tensors for it; PEFT "
                "would adapt modules this adapter has no values for. Remove it from target_modules.",
                path=folder)


def number(cfg: dict[str, Any], key: str, default: Any, folder: Path) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterFormatError(f"{CONFIG}: {key} must be a finite number, got {str(value)[:60]!r}.", path=folder)
    return float(value)

