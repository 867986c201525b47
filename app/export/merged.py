"""``--format merged``: a transformers model folder with the mix folded into the weights.

RoAd and LoRA (and a list of both) are folded by the engine itself (:meth:`app.engine.Engine.merged_weights`): the
very weights it runs when a batch shares the mix folded, ``R·(W + ΔW)`` and ``R·b``, so the folder's logits are the
engine's row. A PEFT type the engine does not run per row (IA³, LoHa, LoKr, OFT, BOFT, VeRA, FourierFT, AdaLoRA,
DoRA, LoRA bias ...) is folded by PEFT's own ``merge_and_unload`` on a copy of the model: as exact as PEFT's merge.
Prompt vectors are refused (:data:`app.export.mix.PREFIX`).

    DIR/
    ├── config.json, generation_config.json
    ├── model.safetensors                  every weight, the adapted ones merged (the base model's dtype)
    ├── tokenizer.json, tokenizer_config.json, chat_template.jinja ...   the base model's tokenizer
    ├── README.md                          model card: base model, the mix (names pinned), what is exact
    └── export.json                        the same as data
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import ExportError, MixError
from . import mix as mixes
from .record import Exported, card, write_record
from .target import staged

FORMAT = "merged"


def merged_tensors(model: Any, mix: Any, *, fmt: str = FORMAT) -> tuple[dict[str, torch.Tensor], str]:
    """The model's state-dict entries that ``mix`` changes, merged, and who merged them (``"engine"`` or ``"peft"``).

    Raises:
        ExportError: a prompt vector, a mix that does not fit the model, a tied weight the mix would change.
    """
    mixes.refuse_prefix(mix, fmt)
    part = mixes.peft_part(mix, fmt)
    if part is not None:
        return _peft_merged(model, part, fmt), "peft"
    from ..engine import Engine

    engine = Engine(model, None)  # folding needs no tokenizer
    try:
        folded = engine.merged_weights(mix)
    except MixError as e:
        raise ExportError(f"Cannot merge this mix into the model: {e}", format=fmt, reason="mix") from e
    finally:
        engine.close()
    out: dict[str, torch.Tensor] = {}
    for m, (w, b) in folded.items():
        out[f"{m}.weight"] = w
        if b is not None:
            out[f"{m}.bias"] = b
    _refuse_tied(model, out, fmt)
    return out, "engine"


def _refuse_tied(model: Any, changed: dict[str, torch.Tensor], fmt: str) -> None:
    """A weight shared by two names (tied embeddings and output layer) cannot take a change meant for one of them."""
    by_ptr: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        by_ptr.setdefault(t.data_ptr(), []).append(name)
    for names in by_ptr.values():
        hit = [n for n in names if n in changed]
        if hit and len(names) > 1:
            others = ", ".join(repr(n) for n in names if n != hit[0])
            raise ExportError(f"The mix changes '{hit[0]}', which this model ties to {others}; a merged folder "
                              "cannot hold both. Export --format lora (for a LoRA), or untie the "
                              "weights first.", format=fmt, reason="tied")


def _peft_merged(model: Any, adapter: Any, fmt: str) -> dict[str, torch.Tensor]:
    """PEFT's ``merge_and_unload`` of ``adapter`` on a copy of ``model``: the entries it changed."""
    from peft import PeftModel

    import composer

    work = copy.deepcopy(model)
    try:
        with tempfile.TemporaryDirectory() as d:
            composer.save(adapter, d)
            merged = PeftModel.from_pretrained(work, d).merge_and_unload(safe_merge=True)
    except (ValueError, TypeError, NotImplementedError, RuntimeError, KeyError) as e:
        raise ExportError(f"PEFT could not merge this {adapter.kind} adapter into the model: {e}", format=fmt,
                          reason="peft merge") from e
    before = model.state_dict()
    changed = {k: v.detach() for k, v in merged.state_dict().items() if k in before and not torch.equal(v, before[k])}
    _refuse_tied(model, changed, fmt)
    return changed


def write_merged(mix: Any, to: str | Path, *, model: Any, tokenizer: Any, expression: str | None = None,
                 force: bool = False, announce: Callable[[str], None] | None = None) -> Exported:
    """Write ``model`` with ``mix`` merged into its weights as a transformers folder at ``to``.

    Args:
        mix: an adapter or a list of parts (as the engine takes).
        to: the target folder (absent or empty, or any folder with ``force``); written atomically.
        model, tokenizer: the base model the mix was made for, and its tokenizer (saved beside it).
        expression: the mix as the user wrote it (recorded).
        announce: called with a line per stage (the CLI prints them on stderr).

    Returns:
        What was written: :class:`Exported` (exact: always, for what it accepts).

    Raises:
        ExportError: see :func:`merged_tensors`, or the target is in the way.
    """
    say = announce or (lambda _: None)
    changed, how = merged_tensors(model, mix)
    state = dict(model.state_dict())
    state.update(changed)
    rec = mixes.record(mix, expression)
    base = str(getattr(model, "name_or_path", "") or "")
    result = Exported(format=FORMAT, exact=True, deviation=None, mix=rec, base_model=base or None,
                      details={"merged_by": how, "changed_tensors": len(changed),
                               "dtype": str(next(iter(state.values())).dtype).removeprefix("torch.")})
    say(f"Merged {len(changed)} tensors ({'the engine' if how == 'engine' else 'PEFT merge_and_unload'}); writing "
        f"the model ...")
    with staged(to, force) as tmp, _unmarked(model):
        model.save_pretrained(tmp, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_card(result, mixes.name_of(mix, expression)), encoding="utf-8")
        write_record(tmp, result)
    result.path = Path(to)
    return result


@contextmanager
def _unmarked(model: Any) -> Iterator[None]:
    """A model transformers de-quantised from a GGUF file keeps a "quantised with gguf" marker, and save_pretrained
    refuses it although its weights are plain tensors; the marker is off while saving (as load_base's conversion
    drops it for good)."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        yield
        return
    cfg = model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if cfg is not None:
            model.config.quantization_config = cfg


def _card(result: Exported, name: str) -> str:
    how = ("folded by the engine: the weights it serves for this mix (RoAd: R·W and R·b; LoRA: W + s·B·A)"
           if result.details.get("merged_by") == "engine" else "folded by PEFT's merge_and_unload")
    return card(result, name, [f"- merged: {how}; exact as math (float rounding only)",
                               "- load: `AutoModelForCausalLM.from_pretrained(folder)`, `vllm serve folder`, or TGI's "
                               "`--model-id folder`"], library="transformers")
