"""PEFT-format I/O: :func:`load`, :func:`save`, :func:`from_peft`, :func:`validate_folder`.

A folder written by :func:`save` is what ``peft.PeftModel.from_pretrained(base, folder)`` loads, with no
missing or unexpected keys::

    <folder>/
    ├── adapter_config.json          PEFT config (peft_type ROAD, LORA or PROMPT_TUNING)
    ├── adapter_model.safetensors    road_theta/road_alpha or lora_A/lora_B per module, or prompt_embeddings
    ├── prompt_vector.safetensors    prompts only: init (P₀) and vector (τ), prompt = init + vector
    ├── recipe.json                  composed adapters only
    └── README.md                    model card

A kind with a format of its own (no ``peft_type``) claims its folders (``composer.kinds.claiming``) and names its
weights file: the ``adapters`` library's bottleneck adapters (``adapter_config.json`` + ``adapter.safetensors``,
:mod:`composer.kinds.bottleneck`) are read and written back in that format.

Only safetensors are read: pickles (``.bin``, ``.pt``) can run code when loaded.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from . import kinds, limits
from .adapters import Adapter
from .card import build_card
from .data import FILE_MODE
from .errors import AdapterFormatError, UnsafeFormatError
from .folder import (
    CARD,
    CONFIG,
    MANIFEST,
    PICKLE_SUFFIXES,
    PREFIX,
    PROMPT_VECTOR,
    RECIPE,
    WEIGHTS,
    read_json,
    read_recipe,
    read_safetensors,
)
from .text import shown


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file() and (folder / MANIFEST).is_file():
        raise AdapterFormatError(
            f"'{shown(folder)}' is a recipe of parts (parts.json: adapters applied together on one row), not one "
            "adapter folder: load it with composer.load_any (hub.load does), or load one of its part folders.",
            path=folder)
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise AdapterFormatError(
            f"'{folder}' has no {CONFIG}; a PEFT adapter folder needs {CONFIG} and {WEIGHTS}. "
            f"Found: {', '.join(repr(n)[1:-1] for n in present) or 'nothing'}.", path=folder)
    cfg = read_json(path, "an adapter config")
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{path} must hold a JSON object, got {type(cfg).__name__}", path=path)
    return cfg


def _check_sizes(folder: Path, weights: str) -> None:
    """Refuse adapter files over the size limit before reading a byte of them."""
    total = sum(p.stat().st_size for p in (folder / weights, folder / PROMPT_VECTOR) if p.is_file())
    limits.check("adapter_bytes", total, f"The adapter in '{folder}'")


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
    """Refuse regular expressions that backtrack catastrophically (``(.+)+z``): PEFT matches ``target_modules``,
    ``exclude_modules`` and IA³'s ``feedforward_modules`` (strings) and the ``rank_pattern`` / ``alpha_pattern``
    keys against every module name of the base model with Python's ``re``, which has no time limit, so such a
    pattern would hang this push and every client that loads the adapter. Each is tried with ``re`` itself, in a
    child process killed after ``PATTERN_SECONDS``, on the adapter's own module names and on names every
    transformer has. Costs a process start (about 30 ms), only for adapters whose config holds patterns."""
    import json
    import subprocess
    import sys

    tries = [(key, cfg[key], "{}") for key in ("target_modules", "exclude_modules", "feedforward_modules")
             if isinstance(cfg.get(key), str)]
    for key in ("rank_pattern", "alpha_pattern"):
        if isinstance(cfg.get(key), dict):
            tries += [(f"a key of {key}", k, r"(.*\.)?({})$") for k in cfg[key] if isinstance(k, str)]
    if not tries:
        return
    names = {re.sub(r"\d+", "0", k[len(PREFIX):] if k.startswith(PREFIX) else k) for k in tensors}
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


def _weights_path(folder: Path, kind: kinds.Kind) -> Path:
    path = folder / kind.weights_file
    if path.is_file():
        return path
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeFormatError(
            f"'{folder}' holds only pickled weights ({', '.join(pickles)}); pickles can run arbitrary code when "
            f"loaded, so only {kind.weights_file} is read. Convert it where you trust the file: "
            f"{kind.pickle_hint}.", path=folder)
    raise AdapterFormatError(f"'{folder}' has no {kind.weights_file}.", path=folder)


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
        raise AdapterFormatError(f"'{shown(folder)}' is not a folder. Pass the folder that holds {CONFIG}.",
                                 path=folder)
    cfg = _read_config(folder)
    peft_type = cfg.get("peft_type")
    kind = kinds.by_peft_type(peft_type) if isinstance(peft_type, str) else None
    if kind is None and "peft_type" not in cfg:
        kind = kinds.claiming(folder, cfg)
        if kind is None:
            raise AdapterFormatError(
                f"{folder / CONFIG} has no peft_type and is in no other format this hub reads (PEFT adapters, and "
                "the adapters library's bottleneck adapters: 'config', 'hidden_size', 'model_type' and "
                "adapter.safetensors). Re-save it with PEFT's save_pretrained.", path=folder)
    if kind is None:
        raise AdapterFormatError(
            f"{folder / CONFIG}: peft_type {peft_type!r} is not a type PEFT knows; this hub stores every PEFT type "
            f"and composes {', '.join(kinds.peft_types())} adapters.", path=folder)
    if cfg.get("modules_to_save"):
        raise AdapterFormatError(
            f"{folder / CONFIG}: modules_to_save {str(cfg['modules_to_save'])[:80]} asks PEFT to load full copies of "
            "those modules, which this adapter's weights do not hold (PEFT fails to load it) and this hub does not "
            "check yet. Set modules_to_save to null if nothing was saved that way.", path=folder)
    _check_sizes(folder, kind.weights_file)
    tensors = read_safetensors(_weights_path(folder, kind))
    _check_patterns(folder, cfg, tensors)
    adapter: Adapter = kind.parse(folder, cfg, tensors)
    recipe = read_recipe(folder)
    return type(adapter)(**{**adapter.__dict__, "recipe": recipe, "source": str(folder)})


def validate_folder(path: str | os.PathLike) -> Adapter:
    """Load ``path`` with every check; returns the adapter or raises (see :func:`load`)."""
    return load(path)


def _peft_config(adapter: Adapter) -> dict[str, Any]:
    cfg = dict(adapter.config)
    kind = kinds.of(adapter)
    if kind.peft_type is None:  # a format of its own: the kind writes its config whole
        return kind.peft_config(adapter, cfg)
    cfg.setdefault("base_model_name_or_path", None)
    cfg["inference_mode"] = True
    cfg["peft_type"] = kind.peft_type
    return kind.peft_config(adapter, cfg)


def atomic_write(path: Path, write) -> None:
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
    """Write ``adapter`` as a PEFT folder that ``PeftModel.from_pretrained`` loads (a
    :class:`composer.parts.Parts` as a recipe of parts, :func:`composer.parts.save`).

    Args:
        adapter: the adapter to write.
        path: target folder (created; existing adapter files in it are replaced file by file).
        card: model card text for ``README.md``; a minimal card is written when ``None``.

    Returns:
        The folder path.
    """
    if not isinstance(adapter, kinds.adapter_classes()) and hasattr(adapter, "save_to"):
        return adapter.save_to(path, card=card)  # a recipe of parts (composer.parts) writes its own layout
    adapter.validate()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = _peft_config(adapter)
    for name, tensors in kinds.of(adapter).files(adapter).items():
        if tensors is None:
            (folder / name).unlink(missing_ok=True)
            continue
        plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        atomic_write(folder / name, lambda p, plain=plain: save_file(plain, p, metadata={"format": "pt"}))
    if adapter.recipe is not None:
        atomic_write(folder / RECIPE, lambda p: Path(p).write_text(adapter.recipe.to_json(), encoding="utf-8"))
    else:
        (folder / RECIPE).unlink(missing_ok=True)
    if card is None and not (folder / CARD).exists():
        card = build_card(adapter)
    if card is not None:
        atomic_write(folder / CARD, lambda p: Path(p).write_text(card, encoding="utf-8"))
    atomic_write(folder / CONFIG, lambda p: Path(p).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n",
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
    kind = kinds.by_peft_type(peft_type)
    if kind is None:
        raise AdapterFormatError(f"peft_type {peft_type!r} is not supported; use "
                                 f"{', '.join(kinds.peft_types())}.")
    return kind.from_peft(model, adapter_name, cfg, init=init, source=source)
