"""Fit the mix to a few examples: what ``hub fit`` and the app's "Fit the weights to examples" panel share.

    adapters (folders or store ids; the app's chosen adapters)
        │  composer.fit on the base model: the command line loads one, the app borrows its engine's model
        │  (Engine.exclusive: no batch runs while PEFT wraps the model for the fit)
        ▼
    RoadAdapter with a "fit" recipe ──► summary(): mean weight per adapter, per-group coefficients, losses
        └──► save(): a PEFT folder with recipe.json (composer.rebuild makes it again from the pinned inputs)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import composer


def summary(adapter: Any, names: Sequence[str] | None = None) -> dict[str, Any]:
    """What a fit found, JSON-friendly.

    Args:
        adapter: the result of :func:`composer.fit` (its recipe has ``method: "fit"``).
        names: how to call the inputs (default: the recipe's input names).

    Returns:
        ``{"adapters", "weights"`` (mean coefficient per adapter, in order), ``"granularity"``,
        ``"coefficients"`` (``{group: [c per adapter]}``), ``"first_loss"``, ``"final_loss"``, ``"seconds"``,
        ``"examples"``, ``"data_sha256"``, ``"steps"``, ``"lr"``, ``"batch_size"``, ``"seed"}``.

    Raises:
        composer.FitError: the adapter was not made by a fit.
    """
    r = adapter.recipe
    if r is None or r.method != "fit":
        raise composer.FitError("This adapter was not made by composer.fit (its recipe's method is "
                                f"{getattr(r, 'method', None)!r}).")
    p = r.params
    names = list(names) if names is not None else [str(i.get("name")) for i in r.inputs]
    losses = p.get("losses") or {}
    return {"adapters": names, "weights": [float(w) for w in r.weights], "granularity": p["granularity"],
            "coefficients": p["coefficients"], "first_loss": losses.get("first"), "final_loss": losses.get("final"),
            "seconds": p.get("seconds"), "examples": p.get("examples"), "data_sha256": p.get("data_sha256"),
            "steps": p.get("steps"), "lr": p.get("lr"), "batch_size": p.get("batch_size"), "seed": p.get("seed")}


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The summary as lines of text: one per adapter (mean weight, and its range over layers), then the loss."""
    coef = s["coefficients"]
    width = max((len(n) for n in s["adapters"]), default=0)
    per = f"per {s['granularity']}"
    lines = [f"fitted {len(s['adapters'])} adapter{'s' if len(s['adapters']) != 1 else ''} {per} "
             f"({len(coef) * len(s['adapters'])} coefficients) on {s['examples']} examples, {s['steps']} steps, "
             f"lr {s['lr']:g}"]
    for i, name in enumerate(s["adapters"]):
        vals = [cs[i] for cs in coef.values()]
        spread = (f"  (over {len(vals)} {s['granularity']}s: {min(vals):.4g} .. {max(vals):.4g})"
                  if len(vals) > 1 else "")
        lines.append(f"  {name:{width}}  mean weight {s['weights'][i]:.4g}{spread}")
    lines.append(f"loss {_num(s['first_loss'])} -> {_num(s['final_loss'])} in {s['seconds']} s")
    return lines


def coefficients_markdown(s: dict[str, Any], *, code: bool = True) -> str:
    """The per-group coefficients as a Markdown table (groups down, adapters across; names in code spans unless
    ``code=False``, for names the caller has escaped itself)."""
    head = "| group | " + " | ".join(f"`{n}`" if code else str(n) for n in s["adapters"]) + " |"
    rule = "|---|" + "---:|" * len(s["adapters"])
    rows = [f"| {g} | " + " | ".join(f"{c:.3f}" for c in cs) + " |" for g, cs in s["coefficients"].items()]
    mean = "| **mean** | " + " | ".join(f"**{w:.3f}**" for w in s["weights"]) + " |"
    return "\n".join([head, rule, *rows, mean])


BARS = "▁▂▃▄▅▆▇█"


def coefficients_plot(s: dict[str, Any]) -> str:
    """The coefficients as a small text plot: one line per adapter, one bar per transformer layer (the mean of
    that layer's coefficients), scaled over all adapters together, with the range and the mean. Groups outside
    any layer (``adapter`` granularity) give one bar."""
    from composer.mixfit import layer_number

    by_layer: dict[int, list[list[float]]] = {}
    for g, cs in s["coefficients"].items():
        n = layer_number(g)
        by_layer.setdefault(-1 if n is None else n, []).append(list(cs))
    layers = sorted(by_layer)
    means = [[sum(c[i] for c in by_layer[k]) / len(by_layer[k]) for k in layers] for i in range(len(s["adapters"]))]
    lo = min((v for row in means for v in row), default=0.0)
    hi = max((v for row in means for v in row), default=1.0)
    span = hi - lo or 1.0
    width = max((len(str(n)) for n in s["adapters"]), default=0)
    lines = []
    for name, row in zip(s["adapters"], means):
        bars = "".join(BARS[min(len(BARS) - 1, int((v - lo) / span * len(BARS)))] for v in row)
        lines.append(f"{str(name):<{width}}  {bars}  {min(row):.2f} .. {max(row):.2f}, mean "
                     f"{sum(row) / len(row):.2f}")
    where = f"layers {layers[0]} .. {layers[-1]}, left to right" if layers and layers[0] >= 0 else "one group"
    return "\n".join([f"({where}; bar height from {lo:.2f} to {hi:.2f})", *lines])


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def save(adapter: Any, out: str | os.PathLike, *, base_model: str | None = None) -> Path:
    """Write the fitted adapter as a PEFT folder with its ``recipe.json`` (and the recipe in the card)."""
    from composer.card import build_card

    return composer.save(adapter, out, card=build_card(adapter, base_model=base_model))


__all__ = ["summary", "summary_lines", "coefficients_markdown", "coefficients_plot", "save"]
