"""PEFT-format I/O: :func:`load`, :func:`save`, :func:`from_peft`, :func:`validate_folder`.

A folder written by :func:`save` is what ``peft.PeftModel.from_pretrained(base, folder)`` loads, with no
missing or unexpected keys::

    <folder>/
    ├── adapter_config.json          PEFT config (peft_type ROAD, LORA or PROMPT_TUNING)
    ├── adapter_model.safetensors    road_theta/road_alpha or lora_A/lora_B per module, or prompt_embeddings
    ├── prompt_vector.safetensors    prompts only: init (P₀) and vector (τ), prompt = init + vector
    ├── recipe.json                  composed adapters only
    └── README.md                    model card

Only safetensors are read: pickles (``.bin``, ``.pt``) can run code when loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import limits, lora_math
from .adapters import VARIANTS, Adapter, LoraAdapter, PromptVector, Recipe, RoadAdapter, check_finite
from .card import build_card
from .data import FILE_MODE
from .errors import AdapterFormatError, ComposerError, NotComposableError, UnsafeFormatError
from .road_math import layer_width

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PROMPT_VECTOR = "prompt_vector.safetensors"
RECIPE = "recipe.json"
CARD = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_PREFIX = "base_model.model."


def _read_json(path: Path, what: str) -> Any:
    """A small JSON file, bounded in size and nesting, parsed without ever recursing past the limit."""
    size = path.stat().st_size
    limits.check("config_bytes", size, f"{path} ({what})")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and integers of thousands of digits
        raise AdapterFormatError(f"{path} is not valid JSON: {e}", path=path) from e
    except RecursionError as e:
        raise limits.exceeded("nesting", "hundreds of levels", what=f"The nesting of {path}") from e
    limits.check_nesting(data, str(path))
    return data


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise AdapterFormatError(
            f"'{folder}' has no {CONFIG}; a PEFT adapter folder needs {CONFIG} and {WEIGHTS}. "
            f"Found: {', '.join(repr(n)[1:-1] for n in present) or 'nothing'}.", path=folder)
    cfg = _read_json(path, "an adapter config")
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{path} must hold a JSON object, got {type(cfg).__name__}", path=path)
    return cfg


# What PEFT and our arithmetic handle; float8 and complex tensors would fail later, deep inside torch.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as e:
        raise AdapterFormatError(
            f"{path} is not a readable safetensors file ({e}). It may be truncated or corrupt; "
            "re-export it with safetensors.torch.save_file.", path=path) from e
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise AdapterFormatError(
                f"Tensor '{name}' in {path} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64 "
                "(convert it with tensor.float() before saving).", path=path, tensor=name)
    return tensors


def _check_sizes(folder: Path) -> None:
    """Refuse adapter files over the size limit before reading a byte of them."""
    total = sum(p.stat().st_size for p in (folder / WEIGHTS, folder / PROMPT_VECTOR) if p.is_file())
    limits.check("adapter_bytes", total, f"The adapter in '{folder}'")


def _dimension(cfg: dict[str, Any], key: str, default: Any, folder: Path) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterFormatError(f"{CONFIG}: {key} must be a positive integer, got {str(value)[:60]!r}.",
                                 path=folder)
    limits.check("dimension", value, f"{CONFIG}: {key}")
    return value


def _peft_reads(folder: Path, cfg: dict[str, Any]) -> Any:
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


def _check_targets(folder: Path, cfg: dict[str, Any], modules: list[str], suffix: str = "road_theta") -> None:
    """Every tensor's module must be one PEFT targets, and every listed target must have tensors."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = cfg.get("target_modules")
    ok = (isinstance(targets, str) and 0 < len(targets) <= 1000) or (
        isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets))
    if not ok:
        raise AdapterFormatError(
            f"{CONFIG}: target_modules must be a non-empty list of module names (e.g. [\"q_proj\", \"v_proj\"]) "
            f"or a regular expression, got {str(targets)[:80]!r}.", path=folder)
    pcfg = _peft_reads(folder, cfg)
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


# Module names a pattern is tried on before PEFT ever matches it: the adapter's own (digits folded) and names every
# transformer has that an adapter rarely targets, where a backtracking pattern fails slowest.
_PROBES = ("model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.layers.0.mlp.act_fn",
           "model.layers.0.self_attn.rotary_emb", "model.embed_tokens", "model.norm", "lm_head", "a" * 48)
PATTERN_SECONDS = 3.0  # the whole check: a process start plus every probe


_MATCH_ALL = """
import json, re, sys
tries, probes = json.load(sys.stdin)
for what, pattern, wrap in tries:
    try:
        compiled = re.compile(wrap.format(pattern))
    except (re.error, ValueError, OverflowError, RecursionError):
        continue
    for probe in probes:
        print(json.dumps([what, pattern, probe]), flush=True)
        compiled.fullmatch(probe) if wrap == "{}" else compiled.match(probe)
print("done", flush=True)
"""


def _check_patterns(folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Refuse regular expressions that backtrack catastrophically (``(.+)+z``): PEFT matches ``target_modules``
    (a string) and the ``rank_pattern`` / ``alpha_pattern`` keys against every module name of the base model with
    Python's ``re``, which has no time limit, so such a pattern would hang this push and every client that loads
    the adapter. Each is tried with ``re`` itself, in a child process killed after ``PATTERN_SECONDS``, on the
    adapter's own module names and on names every transformer has. Costs a process start (about 30 ms), only
    for adapters whose config holds patterns."""
    import json
    import subprocess
    import sys

    tries = []
    if isinstance(cfg.get("target_modules"), str):
        tries.append(("target_modules", cfg["target_modules"], "{}"))
    for key in ("rank_pattern", "alpha_pattern"):
        if isinstance(cfg.get(key), dict):
            tries += [(f"a key of {key}", k, r"(.*\.)?({})$") for k in cfg[key] if isinstance(k, str)]
    if not tries:
        return
    names = {re.sub(r"\d+", "0", k[len(_PREFIX):] if k.startswith(_PREFIX) else k) for k in tensors}
    probes = sorted({n for k in names for n in (k, k.rsplit(".", 1)[0], k.rsplit(".", 2)[0])} | set(_PROBES))
    try:
        p = subprocess.run([sys.executable, "-I", "-c", _MATCH_ALL], input=json.dumps([tries, probes]),
                           capture_output=True, text=True, timeout=PATTERN_SECONDS)
        if p.stdout.rstrip().endswith("done"):
            return
        last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else None
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        last = out.strip().splitlines()[-1] if out.strip() else None
    what, pattern, probe = json.loads(last) if last else (tries[0][0], tries[0][1], probes[0])
    raise AdapterFormatError(
        f"{CONFIG}: {what} {pattern!r:.80} takes more than {PATTERN_SECONDS:g} s to match the module name "
        f"'{probe}' (a pattern that backtracks, such as a nested repeat like '(.+)+'): PEFT would hang matching it "
        "against the base model. List the module names instead (e.g. [\"q_proj\", \"v_proj\"]) or write the "
        "pattern without nested repeats.", path=folder)


def _weights_path(folder: Path) -> Path:
    path = folder / WEIGHTS
    if path.is_file():
        return path
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeFormatError(
            f"'{folder}' holds only pickled weights ({', '.join(pickles)}); pickles can run arbitrary code when "
            f"loaded, so only {WEIGHTS} is read. Convert it where you trust the file: "
            "load it with PeftModel.from_pretrained and call save_pretrained(..., safe_serialization=True).",
            path=folder)
    raise AdapterFormatError(f"'{folder}' has no {WEIGHTS}.", path=folder)


def _parse_road(folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> RoadAdapter:
    variant = cfg.get("variant", "road_1")
    if variant not in VARIANTS:
        raise AdapterFormatError(f"{CONFIG}: variant {variant!r} is not one of {', '.join(VARIANTS)}.",
                                 path=folder)
    g = _dimension(cfg, "group_size", 64, folder)
    if g % 2:
        raise AdapterFormatError(f"{CONFIG}: group_size must be a positive even integer, got {g!r}.", path=folder)
    theta: dict[str, torch.Tensor] = {}
    alpha: dict[str, torch.Tensor] = {}
    for key in sorted(tensors):
        if not key.startswith(_PREFIX) or not key.endswith((".road_theta", ".road_alpha")):
            raise AdapterFormatError(
                f"Unexpected tensor '{key}' in a ROAD adapter: expected "
                f"'{_PREFIX}<module>.road_theta' / '.road_alpha' only.", path=folder, tensor=key)
        module, _, which = key[len(_PREFIX):].rpartition(".")
        (theta if which == "road_theta" else alpha)[module] = tensors[key]
    if not theta and not alpha:
        raise AdapterFormatError(f"{folder / WEIGHTS} holds no RoAd tensors.", path=folder)
    for m in sorted(set(theta) | set(alpha)):
        if m not in theta or m not in alpha:
            missing = "road_theta" if m not in theta else "road_alpha"
            raise AdapterFormatError(f"Module '{m}' has no {missing} tensor.", path=folder,
                                     tensor=f"{m}.{missing}")
        t, a = theta[m], alpha[m]
        if t.dim() != 1 or t.shape != a.shape:
            raise AdapterFormatError(
                f"Tensor '{m}.road_theta' has shape {tuple(t.shape)} and '{m}.road_alpha' {tuple(a.shape)}; "
                "both must be 1-D and equal.", path=folder, tensor=f"{m}.road_theta")
        n = t.numel()
        width = layer_width(variant, n)
        if width is None:
            raise AdapterFormatError(
                f"Tensor '{m}.road_theta' has {n} values, which no layer width gives for {variant}.",
                path=folder, tensor=f"{m}.road_theta")
        if width % g:
            raise AdapterFormatError(
                f"group_size {g} does not divide the width {width} of layer '{m}' "
                f"(tensor '{m}.road_theta' has {n} values for {variant}); pick a group size that divides it.",
                path=folder, tensor=f"{m}.road_theta")
        check_finite(f"{m}.road_theta", t)
        check_finite(f"{m}.road_alpha", a)
    _check_targets(folder, cfg, sorted(theta))
    return RoadAdapter(variant=variant, group_size=g, theta=theta, alpha=alpha, config=cfg)


def _parse_prompt(folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PromptVector:
    if set(tensors) != {"prompt_embeddings"}:
        extra = sorted(set(tensors) - {"prompt_embeddings"})
        raise AdapterFormatError(
            f"A PROMPT_TUNING adapter holds exactly 'prompt_embeddings'; found {sorted(tensors)}.",
            path=folder, tensor=extra[0] if extra else "prompt_embeddings")
    prompt = tensors["prompt_embeddings"]
    n = _dimension(cfg, "num_virtual_tokens", None, folder) * _dimension(cfg, "num_transformer_submodules", 1,
                                                                          folder)
    expected = (n, _dimension(cfg, "token_dim", None, folder))
    if tuple(prompt.shape) != expected:
        raise AdapterFormatError(
            f"Tensor 'prompt_embeddings' has shape {tuple(prompt.shape)} but the config says "
            f"num_virtual_tokens x token_dim = {expected}.", path=folder, tensor="prompt_embeddings")
    check_finite("prompt_embeddings", prompt)
    _peft_reads(folder, cfg)
    pv = folder / PROMPT_VECTOR
    if not pv.is_file():
        return PromptVector(prompt=prompt, init=None, vector=None, config=cfg)
    parts = _read_safetensors(pv)
    for name in ("init", "vector"):
        if name not in parts:
            raise AdapterFormatError(f"{pv} has no '{name}' tensor (it needs 'init' and 'vector').",
                                     path=pv, tensor=name)
        if parts[name].shape != prompt.shape:
            raise AdapterFormatError(
                f"Tensor '{name}' in {PROMPT_VECTOR} has shape {tuple(parts[name].shape)}, "
                f"'prompt_embeddings' has {tuple(prompt.shape)}.", path=pv, tensor=name)
        check_finite(name, parts[name])
    init, vector = parts["init"], parts["vector"]
    if not torch.allclose(init + vector, prompt, rtol=1e-5, atol=1e-6):
        err = float((init + vector - prompt).abs().max())
        raise AdapterFormatError(
            f"'prompt_embeddings' differs from init + vector by up to {err:.3g}: {PROMPT_VECTOR} does not belong "
            "to this prompt.", path=pv, tensor="prompt_embeddings")
    return PromptVector(prompt=prompt, init=init, vector=vector, config=cfg)


_LORA_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b", ".lora_B.bias": "bias",
                  ".lora_magnitude_vector": "magnitude"}
# Variant tensors: stored and round-tripped, required exactly when the config field says so.
_LORA_EXTRA = {"bias": "lora_bias", "magnitude": "use_dora"}


def _number(cfg: dict[str, Any], key: str, default: Any, folder: Path) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterFormatError(f"{CONFIG}: {key} must be a finite number, got {str(value)[:60]!r}.", path=folder)
    return float(value)


def _parse_lora(folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LoraAdapter:
    _dimension(cfg, "r", 8, folder)
    _number(cfg, "lora_alpha", 8, folder)
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
            raise AdapterFormatError(f"{CONFIG}: {key} must map module names to numbers, got {str(pattern)[:80]!r}.",
                                     path=folder)
        for k in pattern:
            (_dimension if key == "rank_pattern" else _number)(pattern, k, None, folder)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(tensors):
        suffix = next((x for x in _LORA_SUFFIXES if key.endswith(x)), None)
        if not key.startswith(_PREFIX) or suffix is None:
            raise AdapterFormatError(
                f"Unexpected tensor '{key}' in a LORA adapter: expected '{_PREFIX}<module>.lora_A.weight' / "
                "'.lora_B.weight' only (plus '.lora_B.bias' with lora_bias, '.lora_magnitude_vector' with use_dora). "
                "LoRA on embeddings or convolutions (lora_embedding_A/B), modules_to_save and trainable tokens "
                "are not supported yet.", path=folder, tensor=key)
        what = _LORA_SUFFIXES[suffix]
        flag = _LORA_EXTRA.get(what)
        if flag is not None and not cfg.get(flag):
            raise AdapterFormatError(
                f"Tensor '{key}' is a {flag} tensor, but {CONFIG} does not set {flag}: PEFT would not load it. "
                f"Set \"{flag}\": true or remove the tensor.", path=folder, tensor=key)
        parts.setdefault(key[len(_PREFIX):-len(suffix)], {})[what] = tensors[key]
    if not parts:
        raise AdapterFormatError(f"{folder / WEIGHTS} holds no LoRA tensors.", path=folder)
    lora_a, lora_b, scaling, extra = {}, {}, {}, {}
    for m, p in parts.items():
        for what, name in (("a", "lora_A.weight"), ("b", "lora_B.weight")):
            if what not in p:
                raise AdapterFormatError(f"Module '{m}' has no {name} tensor; a LoRA module needs both lora_A and "
                                         "lora_B.", path=folder, tensor=f"{m}.{name}")
        a, b = p["a"], p["b"]
        try:
            r, s = lora_math.rank_and_scale(cfg, m)
        except re.error as e:
            raise AdapterFormatError(f"{CONFIG}: a key of rank_pattern / alpha_pattern is not a valid regular "
                                     f"expression ({e}).", path=folder) from e
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterFormatError(
                f"Tensor '{m}.lora_A.weight' has shape {tuple(a.shape)} and '{m}.lora_B.weight' {tuple(b.shape)}; "
                "both must be 2-D (A: r x in_features, B: out_features x r).", path=folder,
                tensor=f"{m}.lora_A.weight")
        if a.shape[0] != r or b.shape[1] != r:
            bad, shape = (("lora_A.weight", tuple(a.shape)) if a.shape[0] != r else ("lora_B.weight", tuple(b.shape)))
            raise AdapterFormatError(
                f"Tensor '{m}.{bad}' has shape {shape}, but the config gives this module rank r = {r} "
                "(A must be r x in_features, B out_features x r); PEFT would refuse to load it. Fix r / rank_pattern "
                "or re-save the adapter with PEFT.", path=folder, tensor=f"{m}.{bad}")
        for what, name in (("bias", "lora_B.bias"), ("magnitude", "lora_magnitude_vector")):
            if cfg.get(_LORA_EXTRA[what]):
                t = p.get(what)
                if t is None or tuple(t.shape) != (b.shape[0],):
                    got = "is missing" if t is None else f"has shape {tuple(t.shape)}"
                    raise AdapterFormatError(
                        f"Tensor '{m}.{name}' {got}; with {_LORA_EXTRA[what]} it must be 1-D of out_features "
                        f"{b.shape[0]}.", path=folder, tensor=f"{m}.{name}")
                check_finite(f"{m}.{name}", t)
                extra[f"{m}.{name}"] = t
        check_finite(f"{m}.lora_A.weight", a)
        check_finite(f"{m}.lora_B.weight", b)
        lora_a[m], lora_b[m], scaling[m] = a, b, s
    _check_targets(folder, cfg, sorted(lora_a), suffix="lora_A.weight")
    return LoraAdapter(lora_a=lora_a, lora_b=lora_b, scaling=scaling, config=cfg, extra=extra)


def load(path: str | os.PathLike) -> Adapter:
    """Read a PEFT adapter folder.

    Args:
        path: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        A :class:`RoadAdapter` (``peft_type: ROAD``), :class:`LoraAdapter` (``LORA``; DoRA and LoRA bias are
        read and kept, and refused later by the arithmetic) or :class:`PromptVector` (``PROMPT_TUNING``).

    Raises:
        AdapterFormatError: missing files, bad JSON, unknown ``peft_type``, corrupt safetensors, shapes that
            disagree with the config (a group size that does not divide a layer's width, LoRA ranks other than
            ``r``/``rank_pattern``), tensors PEFT would not load.
        UnsafeFormatError: only pickled weights are present.
        InvalidValueError: NaN or inf values.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFormatError(f"'{folder}' is not a folder. Pass the folder that holds {CONFIG}.", path=folder)
    cfg = _read_config(folder)
    peft_type = cfg.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in _PARSERS:
        raise AdapterFormatError(
            f"{folder / CONFIG}: peft_type {peft_type!r} is not supported; this hub handles ROAD, LORA and "
            "PROMPT_TUNING adapters.", path=folder)
    if cfg.get("modules_to_save"):
        raise AdapterFormatError(
            f"{folder / CONFIG}: modules_to_save {str(cfg['modules_to_save'])[:80]} asks PEFT to load full copies of "
            "those modules, which this adapter's weights do not hold (PEFT fails to load it) and this hub does not "
            "check yet. Set modules_to_save to null if nothing was saved that way.", path=folder)
    _check_sizes(folder)
    tensors = _read_safetensors(_weights_path(folder))
    _check_patterns(folder, cfg, tensors)
    adapter: Adapter = _PARSERS[peft_type](folder, cfg, tensors)
    recipe = None
    rp = folder / RECIPE
    if rp.is_file():
        data = _read_json(rp, "a recipe")
        try:
            recipe = Recipe.from_dict(data)
            limits.check("expression_chars", len(recipe.expression), f"{rp}: the expression's length")
        except (TypeError, ValueError) as e:
            if isinstance(e, ComposerError):
                raise
            raise AdapterFormatError(f"{rp} is not a valid recipe: {e}", path=rp) from e
    return type(adapter)(**{**adapter.__dict__, "recipe": recipe, "source": str(folder)})


_PARSERS = {"ROAD": _parse_road, "LORA": _parse_lora, "PROMPT_TUNING": _parse_prompt}


def validate_folder(path: str | os.PathLike) -> Adapter:
    """Load ``path`` with every check; returns the adapter or raises (see :func:`load`)."""
    return load(path)


def _peft_config(adapter: Adapter) -> dict[str, Any]:
    cfg = dict(adapter.config)
    cfg.setdefault("base_model_name_or_path", None)
    cfg["inference_mode"] = True
    if isinstance(adapter, RoadAdapter):
        cfg["peft_type"] = "ROAD"
        cfg["variant"] = adapter.variant
        cfg["group_size"] = adapter.group_size
        cfg.setdefault("init_weights", True)
        cfg.setdefault("task_type", None)
        targets = sorted({m.rsplit(".", 1)[-1] for m in adapter.theta})
        if not cfg.get("target_modules") or not isinstance(cfg.get("target_modules"), (list, str)):
            cfg["target_modules"] = targets
        elif isinstance(cfg["target_modules"], list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
    elif isinstance(adapter, LoraAdapter):
        cfg["peft_type"] = "LORA"
        cfg.setdefault("task_type", None)
        if not cfg.get("target_modules") or not isinstance(cfg.get("target_modules"), (list, str)):
            cfg["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in adapter.lora_a})
        elif isinstance(cfg["target_modules"], list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
    else:
        cfg["peft_type"] = "PROMPT_TUNING"
        cfg.setdefault("task_type", "CAUSAL_LM")
        cfg["num_virtual_tokens"] = adapter.shape[0] // cfg.get("num_transformer_submodules", 1)
        cfg["token_dim"] = adapter.shape[1]
    return cfg


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # not mkstemp's 0600: what any new file would get
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(adapter: Adapter, path: str | os.PathLike, *, card: str | None = None) -> Path:
    """Write ``adapter`` as a PEFT folder that ``PeftModel.from_pretrained`` loads.

    Args:
        adapter: the adapter to write.
        path: target folder (created; existing adapter files in it are replaced file by file).
        card: model card text for ``README.md``; a minimal card is written when ``None``.

    Returns:
        The folder path.
    """
    adapter.validate()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = _peft_config(adapter)
    if isinstance(adapter, (RoadAdapter, LoraAdapter)):
        tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.tensors().items()}
    else:
        tensors = {"prompt_embeddings": adapter.prompt.detach().contiguous().cpu()}
    _atomic_write(folder / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    if isinstance(adapter, PromptVector):
        if adapter.composable:
            parts = {"init": adapter.init.detach().contiguous().cpu(),
                     "vector": adapter.vector.detach().contiguous().cpu()}
            _atomic_write(folder / PROMPT_VECTOR, lambda p: save_file(parts, p, metadata={"format": "pt"}))
        else:
            (folder / PROMPT_VECTOR).unlink(missing_ok=True)
    if adapter.recipe is not None:
        _atomic_write(folder / RECIPE, lambda p: Path(p).write_text(adapter.recipe.to_json(), encoding="utf-8"))
    else:
        (folder / RECIPE).unlink(missing_ok=True)
    if card is None and not (folder / CARD).exists():
        card = build_card(adapter)
    if card is not None:
        _atomic_write(folder / CARD, lambda p: Path(p).write_text(card, encoding="utf-8"))
    _atomic_write(folder / CONFIG, lambda p: Path(p).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n",
                                                                encoding="utf-8"))
    return folder


def from_peft(model: Any, *, adapter_name: str = "default", init: torch.Tensor | None = None,
              source: str | None = None) -> Adapter:
    """Read the adapter out of a live PEFT model (e.g. after training).

    Args:
        model: a ``PeftModel`` carrying a RoAd, LoRA or prompt-tuning adapter.
        adapter_name: which adapter to read.
        init: for prompts, the origin P₀ the prompt was trained from; without it the result cannot be
            composed. When the model was built by :func:`composer.init`, its recorded init is used.

    Returns:
        A :class:`RoadAdapter`, :class:`LoraAdapter` or :class:`PromptVector` holding detached float32 copies.
    """
    pcfg = model.peft_config[adapter_name]
    cfg = pcfg.to_dict()
    cfg = json.loads(json.dumps(cfg, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    peft_type = str(cfg.get("peft_type", "")).split(".")[-1]
    cfg["peft_type"] = peft_type
    if peft_type == "ROAD":
        theta, alpha = {}, {}
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "road_theta") and adapter_name in getattr(module, "road_theta", {}):
                theta[name] = module.road_theta[adapter_name].detach().float().cpu().clone()
                alpha[name] = module.road_alpha[adapter_name].detach().float().cpu().clone()
        return RoadAdapter(variant=cfg["variant"], group_size=cfg["group_size"], theta=theta, alpha=alpha,
                           config=cfg, source=source)
    if peft_type == "LORA":
        lora_a, lora_b, scaling, extra = {}, {}, {}, {}
        for name, module in model.base_model.model.named_modules():
            if adapter_name in getattr(module, "lora_A", {}) and isinstance(module.lora_A[adapter_name],
                                                                            torch.nn.Linear):
                lora_a[name] = module.lora_A[adapter_name].weight.detach().float().cpu().clone()
                lora_b[name] = module.lora_B[adapter_name].weight.detach().float().cpu().clone()
                scaling[name] = float(module.scaling[adapter_name])
                if module.lora_B[adapter_name].bias is not None:
                    extra[f"{name}.lora_B.bias"] = module.lora_B[adapter_name].bias.detach().float().cpu().clone()
                mag = getattr(module, "lora_magnitude_vector", {})
                if adapter_name in mag:
                    extra[f"{name}.lora_magnitude_vector"] = mag[adapter_name].weight.detach().float().cpu().clone()
        return LoraAdapter(lora_a=lora_a, lora_b=lora_b, scaling=scaling, config=cfg, extra=extra, source=source)
    if peft_type == "PROMPT_TUNING":
        prompt = model.get_prompt_embedding_to_save(adapter_name).detach().float().cpu().clone()
        if init is None:
            init = getattr(model, "composer_prompt_init", None)
        if init is None:
            return PromptVector(prompt=prompt, init=None, vector=None, config=cfg, source=source)
        init = init.detach().float().cpu().clone()
        if init.shape != prompt.shape:
            raise NotComposableError(f"init has shape {tuple(init.shape)}, the prompt {tuple(prompt.shape)}.")
        return PromptVector(prompt=prompt, init=init, vector=prompt - init, config=cfg, source=source)
    raise AdapterFormatError(f"peft_type {peft_type!r} is not supported; use ROAD, LORA or PROMPT_TUNING.")
