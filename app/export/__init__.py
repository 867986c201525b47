"""``hub export``: a mix written as what other serving stacks load, one module per format.

    write_merged(mix, to, model=, tokenizer=)          merged.py  transformers folder, mix folded in   (vLLM, TGI)
    write_lora(mix, to, rank=None)                     lora.py    plain PEFT LoRA of a LoRA mix       (vLLM, LoRAX)
    write_gguf(mix, to, model=, source=)               gguf.py    the merged model as GGUF     (llama.cpp, Ollama)

    what is exact:   merged   RoAd and LoRA exactly as the engine serves them (the same folded weights); PEFT-only
                              types as PEFT's merge_and_unload; prompt vectors refused (an input prefix, not a weight)
                     lora     exact; with rank= a truncated SVD, its error reported; RoAd refused (full-rank ΔW)
                     gguf     exact in f32; f16 / q8_0 / the source's type: rounding error reported

Each returns an :class:`Exported` and writes it as ``export.json`` beside the files; every folder is written into a
hidden sibling and renamed onto ``to`` at the end (:mod:`app.export.target`), so an export is whole or absent. A
``mix`` is what the engine takes: an adapter (``composer.evaluate(expression, resolve=...)``) or a list of parts.
"""

from __future__ import annotations

from .gguf import TENSOR_TYPES, write_gguf
from .lora import write_lora
from .merged import write_merged
from .record import Exported
from .target import check as check_target

FORMATS = {"merged": write_merged, "lora": write_lora, "gguf": write_gguf}
"""Format name -> writer (``hub export --format`` lists these names)."""

__all__ = ["FORMATS", "TENSOR_TYPES", "Exported", "check_target", "write_gguf", "write_lora", "write_merged"]
