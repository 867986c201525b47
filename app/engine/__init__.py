"""The engine: the offline base model and per-request adapter mixes served in one batch.

    load_base(name_or_path=None) -> (model, tokenizer)
    Engine(model, tokenizer).forward(input_ids, attention_mask, mixes)   logits per row, each with its mix
    Engine.generate(requests, **sampling) / Engine.stream(...)           batched chat with a KV cache
    RunningBatch(engine).join(rows) / .step() / .leave(rows)             iteration-level scheduling
    DecodeMix(parts, weights)                                            a mix combined at decode time
"""

from __future__ import annotations

from .base import DEFAULT_NAME, INSTALL_HINT, cache_root, default_cache_dir, gguf_path, load_base
from .continuous import Row, RunningBatch
from .decode_mix import DecodeMix
from .engine import Engine, Request

__all__ = ["load_base", "Engine", "Request", "Row", "RunningBatch", "DecodeMix", "DEFAULT_NAME", "INSTALL_HINT",
           "default_cache_dir", "cache_root", "gguf_path"]
