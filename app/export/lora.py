"""``--format lora``: a plain PEFT LoRA folder of a LoRA mix, for vLLM, LoRAX and PEFT.

vLLM's LoRA loader reads only ``r``, ``lora_alpha``, ``target_modules`` (and ``use_rslora``; it refuses DoRA, a
bias and ``modules_to_save``); it ignores ``rank_pattern`` / ``alpha_pattern``, so a LoRA relying on them would be
served with the wrong scale. What is written is therefore always plain: each module's scale folded into ``B``, one
rank ``r`` for every module (smaller ones zero-padded, which changes no ΔW), ``lora_alpha = r`` (``s = 1``), no
rsLoRA, no patterns (:func:`composer.kinds.lora.result_like`, the form every composition already has). vLLM serves
ranks up to 512 with ``--max-lora-rank`` at least ``r`` (one of 8, 16, 32, 64, 128, 256, 320, 512; default 16).

``--rank N`` compresses first (:func:`composer.compress`: the best rank-N approximation by truncated SVD) and reports
the error it made, per module and over all. RoAd mixes are refused: RoAd's update ``ΔW = (R − I)·W`` is full rank,
so no LoRA equals it (:data:`ROAD`).

    DIR/
    ├── adapter_config.json        peft_type LORA, r, lora_alpha = r, target_modules
    ├── adapter_model.safetensors  base_model.model.<module>.lora_A.weight / lora_B.weight
    ├── recipe.json, README.md     how the mix was made (composer.save)
    └── export.json                the mix pinned, the rank, the compression's errors
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ExportError
from . import mix as mixes
from .record import Exported, write_record
from .target import staged

FORMAT = "lora"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices (vllm/config/lora.py)
ROAD = ("RoAd's update of a weight, ΔW = (R − I)·W, is full rank (R rotates every output pair of W), so no LoRA "
        "equals it; a truncated SVD of the shipped SmolLM2 adapters' ΔW still misses 82% of it (relative Frobenius "
        "error) at rank 16, 52% at rank 64 and 11% at rank 256")


def lora_of(mix: Any) -> Any:
    """The mix as one plain LoRA (several LoRA parts added, exactly).

    Raises:
        ExportError: a prompt vector, a RoAd part, another PEFT type, or a LoRA variant that is not ``s·B·A``.
    """
    import composer

    mixes.refuse_prefix(mix, FORMAT)
    ps = mixes.parts(mix)
    if not ps:
        raise ExportError("The base model has no adapter to export as a LoRA; name one.", format=FORMAT,
                          reason="empty")
    for p in ps:
        if mixes.role(p) == "output":
            raise ExportError(f"Cannot export a RoAd adapter as a LoRA: {ROAD}. Export --format merged (exact) "
                              "instead; vLLM and TGI serve that folder.", format=FORMAT, reason="road")
        if mixes.role(p) != "weight":
            raise ExportError(f"Cannot export a {p.kind} adapter as a LoRA (it is not one). Export --format merged "
                              "instead.", format=FORMAT, reason="kind")
        if p.not_low_rank:
            raise ExportError(f"Cannot export this LoRA as a plain LoRA ({p.not_low_rank}); vLLM would serve it "
                              "wrongly. Export --format merged instead.", format=FORMAT, reason="variant")
    return ps[0] if len(ps) == 1 else composer.add(*ps)


def plain(adapter: Any) -> Any:
    """The same ΔW per module as a plain LoRA: scale folded into ``B``, one rank, ``lora_alpha = r``, no patterns."""
    from composer.kinds.lora import result_like

    lora_b = {m: adapter.lora_b[m] * adapter.scaling[m] for m in adapter.lora_a}
    return result_like(adapter, [adapter], dict(adapter.lora_a), lora_b, adapter.recipe)


def max_lora_rank(r: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts for rank ``r`` (``None`` past 512)."""
    return next((v for v in VLLM_RANKS if v >= r), None)


def write_lora(mix: Any, to: str | Path, *, rank: int | None = None, expression: str | None = None,
               force: bool = False, announce: Callable[[str], None] | None = None) -> Exported:
    """Write a LoRA mix as a plain PEFT LoRA folder at ``to``.

    Args:
        mix: a LoRA (e.g. ``composer.add`` of LoRAs), or a list of LoRAs (added).
        to: the target folder (absent or empty, or any folder with ``force``); written atomically.
        rank: compress to at most this rank per module first (truncated SVD; the error is reported).
        expression: the mix as the user wrote it (recorded).
        announce: called with a line per stage.

    Returns:
        :class:`Exported`: exact without ``rank`` (or when nothing was cut); ``deviation`` and, in ``details``,
        ``errors`` per module otherwise; ``details["vllm_max_lora_rank"]``, the flag vLLM needs.

    Raises:
        ExportError: see :func:`lora_of`, or the target is in the way.
    """
    import composer

    say = announce or (lambda _: None)
    adapter = lora_of(mix)
    rec = mixes.record(mix, expression)
    ranks = sorted({adapter.rank(m) for m in adapter.lora_a})
    exact, deviation, errors = True, None, {}
    if rank is not None:
        say(f"Compressing rank {ranks[-1]} to at most {rank} (truncated SVD) ...")
        adapter = composer.compress(adapter, rank)
        exact, deviation = adapter.recipe.exact, adapter.recipe.deviation
        errors = dict(adapter.recipe.params.get("errors") or {})
    out = plain(adapter)
    r = int(out.config["r"])
    vllm = max_lora_rank(r)
    notes = []
    if vllm is None:
        notes.append(f"Rank {r} is over the 512 vLLM serves; pass --rank 512 (or less) to compress.")
    elif vllm > 16:
        notes.append(f"vLLM serves rank {r} with --max-lora-rank {vllm} (its default is 16).")
    result = Exported(format=FORMAT, exact=bool(exact), deviation=None if exact else deviation, mix=rec,
                      base_model=adapter.base_model,
                      details={"r": r, "lora_alpha": out.config["lora_alpha"], "ranks_in": ranks,
                               "target_modules": out.config.get("target_modules"), "modules": len(out.lora_a),
                               "errors": errors, "vllm_max_lora_rank": vllm}, notes=notes)
    say(f"Writing a rank-{r} LoRA over {len(out.lora_a)} modules ...")
    with staged(to, force) as tmp:
        composer.save(out, tmp)
        write_record(tmp, result)
    result.path = Path(to)
    return result
