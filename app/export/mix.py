"""What a mix holds, as far as an export cares: its parts, who folds it (the engine, or PEFT's own merge), what each
format refuses and why, and the record written beside every export.

A mix is what the engine serves on a row: an adapter (:func:`composer.evaluate`'s result for ``ID|EXPR``) or a
list of parts (RoAd, LoRA, at most one prompt vector), or a stored recipe of parts (:class:`composer.Parts`).
"""

from __future__ import annotations

from typing import Any

from composer import kinds
from composer.lora_math import NOT_LOW_RANK
from composer.parts import items, unserved

from ..errors import ExportError

PREFIX = ("a prompt vector is an input prefix (virtual tokens in front of the prompt), not a change of weights, so "
          "no weight file can hold it")
PREFIX_NEXT = ("Serve it with 'hub api' (or PEFT's PeftModel.from_pretrained), or export the mix without the prompt "
               "vector.")
# LoRA variants whose effect depends on the tokens (or samples), so no merged weight equals them.
NOT_MERGEABLE = ("alora_invocation_tokens", "arrow_config", "monteclora_config", "layer_replication")


def parts(mix: Any) -> list[Any]:
    """The mix's adapters, in order (``None`` entries dropped; a recipe of parts is its parts)."""
    return items(mix)


def role(part: Any) -> str | None:
    """How the engine serves ``part``: ``"output"`` (RoAd, IA³), ``"weight"`` (LoRA), ``"prefix"`` (prompt vector,
    p-tuning), ``"past_kv"`` (prefix tuning), ``"stream"`` (bottleneck), or ``None`` (a PEFT type only PEFT runs)."""
    return kinds.of(part).engine_role


def refuse_prefix(mix: Any, fmt: str) -> None:
    """Raise when any part is an input prefix (a prompt vector, prefix tuning, or a stored prompt-learning type), or a
    bottleneck adapter (a network added to the stream: no weight file holds it either)."""
    for p in parts(mix):
        if role(p) in ("prefix", "past_kv") or (role(p) is None and not getattr(p, "modules", ())):
            what = "a prompt vector" if p.kind == "prompt" else f"a {p.kind} adapter (prompt learning)"
            raise ExportError(f"Cannot export {what} as '{fmt}': {PREFIX}. {PREFIX_NEXT}", format=fmt,
                              reason="prefix")
        if role(p) == "stream":
            raise ExportError(f"Cannot export a bottleneck adapter as '{fmt}': it adds a small network "
                              "(down-projection, nonlinearity, up-projection) to the residual stream, not a change of "
                              "weights, so no weight file can hold it. Serve it with 'hub api', or with the adapters "
                              "library.",
                              format=fmt, reason="stream")


def peft_part(mix: Any, fmt: str) -> Any | None:
    """The one part that PEFT's own ``merge_and_unload`` folds (a PEFT type the engine does not run per row: IA³,
    LoHa, LoKr, OFT, …, or a LoRA variant such as DoRA or LoRA bias), or ``None`` when the engine folds the mix.

    Raises:
        ExportError: such a part comes with other parts, or its effect depends on the tokens (aLoRA, Arrow ...).
    """
    ps = parts(mix)
    odd = [p for p in ps if not _engine_folds(p)]
    if not odd:
        return None
    p = odd[0]
    for key in NOT_MERGEABLE:
        if p.config.get(key):
            raise ExportError(f"Cannot merge this LoRA into the weights: {key}: {NOT_LOW_RANK[key]}, so no fixed "
                              "weight equals it. Serve it with PEFT (PeftModel.from_pretrained).", format=fmt,
                              reason="not mergeable")
    if len(ps) > 1:
        raise ExportError(f"A {p.kind} adapter is merged by PEFT on its own; this mix holds {len(ps)} parts. Export "
                          "it alone, or compose the others first.", format=fmt, reason="mixed")
    return p


def _engine_folds(part: Any) -> bool:
    """Whether the engine's own folding applies: it serves the part per row (a plain LoRA, an output kind that equals
    a RoAd adapter: an IA³ that scales a feedforward module's input does not, PEFT merges it)."""
    return unserved(part) is None


def record(mix: Any, expression: str | None = None) -> dict[str, Any]:
    """What the export was made from: the expression as asked, the same with every name pinned, and each part's kind,
    source and recipe (written to ``export.json`` and the card)."""
    from composer.errors import ExpressionError
    from composer.expr import rename

    ps = parts(mix)
    pinned = None
    if expression:
        if len(ps) == 1 and ps[0].recipe is None:
            pinned = ps[0].source or expression
        elif len(ps) == 1:
            try:
                pinned = rename(expression, {i["name"]: str(i["ref"]) for i in ps[0].recipe.inputs})
            except ExpressionError:
                pinned = ps[0].recipe.expression
    return {"expression": expression, "pinned": pinned,
            "parts": [{"kind": p.kind, "source": p.source, "recipe": p.recipe.to_dict() if p.recipe else None}
                      for p in ps]}


def name_of(mix: Any, expression: str | None = None) -> str:
    """A short text naming the mix (cards, messages)."""
    rec = record(mix, expression)
    if rec["pinned"] or rec["expression"]:
        return rec["pinned"] or rec["expression"]
    return " ; ".join(str((p["recipe"] or {}).get("expression") or p["source"] or p["kind"]) for p in rec["parts"])
