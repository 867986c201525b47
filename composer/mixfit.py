"""Fit the mix to a few examples: one coefficient per adapter (optionally per layer), base and adapters frozen.

The mix of RoAd adapters ``a₁ … aₙ`` with coefficients ``c`` is generator arithmetic, module by module::

    θ_m = Σᵢ cᵢ,g(m) · θᵢ,m        log α_m = Σᵢ cᵢ,g(m) · log αᵢ,m        g(m): the module's group

with ``granularity="adapter"`` (one group: ``n`` numbers), ``"layer"`` (one group per transformer layer,
``n × layers`` numbers, a few dozen for SmolLM2) or ``"module"`` (one per adapted layer: 420 for two SmolLM2
adapters on all 7 projections). For road_1 the mix is exact (``c = 1`` everywhere is
``composer.add``); for road_2/road_4 it is the same per-element approximation as the other linear operations.

:func:`fit` learns ``c`` by gradient descent on the answer tokens of at most 32 examples of the combined
behaviour, starting from ``c = 1`` (plain ``add``). The result is an ordinary :class:`RoadAdapter` whose recipe
(``method: "fit"``) records the coefficients, the groups and the data's sha256; :func:`apply_coefficients`
(what :func:`rebuild` calls) turns the same inputs and coefficients back into the same adapter, bit for bit.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from . import kinds
from .adapters import Adapter, Recipe, RoadAdapter
from .arith import inputs as _inputs
from .arith import label as _label
from .errors import ComposerError, DataError, IncompatibleAdaptersError
from .kinds.road import checked_generator as _generator
from .kinds.road import result_like as _road_result
from .ops import check_compatible

GRANULARITIES = ("adapter", "layer", "module")
MAX_EXAMPLES = 32
_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)(?:\.|$)")


def layer_number(name: str) -> int | None:
    """The transformer layer a module or coefficient group belongs to (``model.layers.3.mlp.up_proj`` and
    ``layer.3`` -> 3), or ``None``: the one layer rule of the fit, the mixer's plot and the fit panel."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


class FitError(ComposerError, ValueError):
    """The fit cannot run as asked (unsupported adapters, granularity, too many examples, bad settings)."""


def group_of(module: str, granularity: str) -> str:
    """The coefficient group of a module: ``"all"``, ``"layer.N"`` from the ``layers.N.`` in its name, or the
    module's own name (``"module"``: one coefficient per adapter and adapted layer)."""
    if granularity == "adapter":
        return "all"
    if granularity == "module":
        return module
    n = layer_number(module)
    return f"layer.{n}" if n is not None else "other"


def groups(adapter: RoadAdapter, granularity: str) -> list[str]:
    """The coefficient groups of ``adapter``'s modules, in layer order."""
    if granularity not in GRANULARITIES:
        raise FitError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}.")
    found = {group_of(m, granularity) for m in adapter.theta}

    def order(g: str) -> tuple:
        n = layer_number(g)
        return (n is None, n if n is not None else -1, g)

    return sorted(found, key=order)


def _check(adapters: Sequence[Adapter]) -> list[RoadAdapter]:
    if len(adapters) < 1:
        raise FitError("Give at least one adapter to fit.")
    for i, a in enumerate(adapters):
        kinds.of(a)  # a recipe of parts: refused with the reason (it is served as it is)
        if not isinstance(a, RoadAdapter):
            raise FitError(f"{_label(a, i)} is a {a.kind} adapter; fitting mix coefficients is for RoAd adapters. "
                           "Prompt vectors are mixed by plain τ arithmetic (composer.add / scale).")
    if len(adapters) > 1:
        check_compatible(adapters)
    return list(adapters)  # type: ignore[return-value]


def check_inputs(adapters: Sequence[Adapter], examples: str | os.PathLike | Iterable[dict], *,
                 steps: int = 30, lr: float = 0.1, batch_size: int = 8) -> tuple[list[RoadAdapter], list]:
    """What :func:`fit` checks before it touches a model: the adapters, the settings and the examples (read
    and counted). A caller about to load a base model for :func:`fit` calls it first, so that a typo in the
    data file's name costs no model load (``hub fit``).

    Returns:
        The adapters (as RoAd adapters) and the examples' conversations.

    Raises:
        FitError, DataError, IncompatibleAdaptersError.
    """
    from .data import read_examples

    road = _check(adapters)
    if steps < 0 or batch_size < 1 or not (lr > 0 and math.isfinite(lr)):
        raise FitError(f"Need steps >= 0, batch_size >= 1 and a finite lr > 0; got {steps}, {batch_size}, "
                       f"{lr}.")
    convs = read_examples(examples)
    if len(convs) > MAX_EXAMPLES:
        raise FitError(f"{len(convs)} examples given; fit takes at most {MAX_EXAMPLES} (a few dozen numbers "
                       "are fitted, more data is what training is for: hub train --init).")
    return road, convs


def _mixed(gens: list[tuple[torch.Tensor, torch.Tensor]], weights: list[torch.Tensor]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    theta = sum(w * g[0] for w, g in zip(weights, gens))
    log_alpha = sum(w * g[1] for w, g in zip(weights, gens))
    return theta, log_alpha  # type: ignore[return-value]


def apply_coefficients(adapters: Sequence[Adapter], coefficients: dict[str, Sequence[float]] | torch.Tensor, *,
                       granularity: str = "layer", recipe: Recipe | None = None) -> RoadAdapter:
    """The mix ``Σᵢ cᵢ,g · genᵢ`` per module (exact for road_1), with the given recipe.

    Args:
        adapters: compatible RoAd adapters.
        coefficients: ``{group: [c per adapter]}`` (as recorded in a fit recipe) or a tensor
            ``(len(adapters), len(groups))`` in :func:`groups` order.
        granularity: ``"adapter"`` or ``"layer"``.
        recipe: the recipe to attach (default: one naming ``method: "fit_coefficients"``).

    Raises:
        FitError: a group without coefficients, or the wrong number of them.
    """
    road = _check(adapters)
    names = groups(road[0], granularity)
    if isinstance(coefficients, torch.Tensor):
        if tuple(coefficients.shape) != (len(road), len(names)):
            raise FitError(f"Expected coefficients of shape ({len(road)}, {len(names)}), got "
                           f"{tuple(coefficients.shape)}.")
        table = {g: [float(coefficients[i, j]) for i in range(len(road))] for j, g in enumerate(names)}
    else:
        table = {str(g): [float(c) for c in cs] for g, cs in coefficients.items()}
    for g in names:
        if g not in table or len(table[g]) != len(road):
            raise FitError(f"No coefficients for group {g!r} (need one per adapter, {len(road)}); "
                           f"got groups {sorted(table)[:5]}.")
        if not all(math.isfinite(c) for c in table[g]):
            raise FitError(f"Coefficients of group {g!r} are not finite: {table[g]}.")
    first = road[0]
    theta, alpha = {}, {}
    for m in first.theta:
        w = [torch.tensor(c, dtype=torch.float64) for c in table[group_of(m, granularity)]]
        th, la = _mixed([_generator(a, m) for a in road], w)
        theta[m] = th.to(first.theta[m].dtype)
        alpha[m] = la.exp().to(first.alpha[m].dtype)
    if recipe is None:
        recipe = Recipe(expression=_fit_expression(road), inputs=_inputs(road),
                        weights=tuple(_mean(table, i) for i in range(len(road))), method="fit_coefficients",
                        params={"granularity": granularity, "coefficients": table},
                        exact=first.variant == "road_1")
    return _road_result(first, theta, alpha, recipe)


def _mean(table: dict[str, list[float]], i: int) -> float:
    vals = [cs[i] for cs in table.values()]
    return sum(vals) / len(vals)


def _fit_expression(adapters: Sequence[Adapter]) -> str:
    """A readable label (``fit(a, b)``); the recipe's coefficients, not this text, rebuild the adapter."""
    return "fit(" + ", ".join(_label(a, i) for i, a in enumerate(adapters)) + ")"


PIN = "#sha256:"


def rebuild(recipe: Recipe, resolve: Callable[[str], Adapter] | None = None) -> Adapter:
    """Rebuild a fitted adapter from its recipe: resolve each pinned input, apply the recorded coefficients.

    An input pinned as a folder (``/abs/path#sha256:<digest>``, what ``hub fit`` records for folders) is loaded
    here, after checking that its weights still have that digest; any other reference (a store id pinned to its
    commit, ``alice/a@<sha>``) goes to ``resolve`` (``hub.load`` for the local store).

    Raises:
        FitError: the recipe is not a fit, a pinned folder changed or is gone, or an input needs ``resolve``.
    """
    if recipe.method not in ("fit", "fit_coefficients"):
        raise FitError(f"Recipe method {recipe.method!r} is not a fit; use composer.evaluate(recipe.expression).")
    inputs = [_input(i.get("ref") or i["name"], resolve) for i in recipe.inputs]
    return apply_coefficients(inputs, recipe.params["coefficients"], granularity=recipe.params["granularity"],
                              recipe=recipe)


def _input(ref: str, resolve: Callable[[str], Adapter] | None) -> Adapter:
    folder, pinned, digest = ref.partition(PIN)
    if pinned:
        from .data import file_sha256
        from .io import load

        weights = os.path.join(folder, "adapter_model.safetensors")
        now = file_sha256(weights) if os.path.isfile(weights) else None
        if now is None or not digest or not now.startswith(digest):
            state = f"its weights now have sha256:{now[:len(digest) or 16]}" if now else "its weights are gone"
            raise FitError(f"The fit's input {folder} was pinned at sha256:{digest}, but {state}; restore that "
                           "version of the folder or fit again.")
        return load(folder)
    if resolve is None:
        raise FitError(f"The fit's input {ref!r} is not a pinned folder; pass resolve= to find it "
                       "(hub.load for a store id).")
    return resolve(ref)


class _Mix(torch.nn.Module):
    """A parametrization: the PEFT tensor becomes Σᵢ c[i, group] · genᵢ (exp'd for α)."""

    def __init__(self, coef: torch.nn.Parameter, group: int, gens: torch.Tensor, exp: bool) -> None:
        super().__init__()
        self.coef = coef
        self.group = group
        self.register_buffer("gens", gens, persistent=False)
        self.exp = exp

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        v = (self.coef[:, self.group, None] * self.gens).sum(0)
        return v.exp() if self.exp else v


def fit(adapters: Sequence[Adapter], examples: str | os.PathLike | Iterable[dict], *, model: Any, tokenizer: Any,
        granularity: str = "module", steps: int = 30, lr: float = 0.1, batch_size: int = 8, seed: int = 0,
        max_length: int = 256, init: Sequence[float] | None = None,
        callback: Callable[[int, int, float], None] | None = None, progress: bool = False) -> RoadAdapter:
    """Learn mix coefficients on a few examples of the combined behaviour; base and adapters stay frozen.

    Args:
        adapters: compatible RoAd adapters (their names in the recipe come from ``source``).
        examples: a JSONL path or rows (``{"messages": [...]}`` / ``{"prompt", "completion"}``), at most 32.
        model, tokenizer: the base causal LM (not wrapped by PEFT; it is handed back unchanged) and its tokenizer.
        granularity: ``"adapter"`` (one coefficient per adapter), ``"layer"`` (one per adapter and layer) or
            ``"module"`` (one per adapter and adapted module).
        steps, lr, batch_size, seed: Adam on the coefficients, starting from ``init`` (default 1.0 each: ``add``).
        max_length: examples are cut to this many tokens.
        callback: called after every step with ``(step, steps, loss)`` (progress bars, the app's panel).
        progress: show a tqdm bar (``HF_HUB_DISABLE_PROGRESS_BARS`` silences it).

    Returns:
        A :class:`RoadAdapter` whose recipe has ``method: "fit"`` and params ``granularity``, ``coefficients``
        (``{group: [c per adapter]}``), ``data_sha256``, ``examples``, ``steps``, ``lr``, ``batch_size``,
        ``seed``, ``losses`` (first and final mean loss over all examples) and ``seconds``.

    Raises:
        FitError: unsupported adapters or settings, or more than 32 examples.
        DataError: unusable examples.
        IncompatibleAdaptersError: the adapters do not fit ``model``.
    """
    from torch.nn.utils import parametrize

    from .data import collate, encode_all, examples_sha256
    from .initialise import init as peft_init
    from .ops import add

    road, convs = check_inputs(adapters, examples, steps=steps, lr=lr, batch_size=batch_size)
    digest = examples_sha256(examples, convs)
    rows = encode_all(tokenizer, convs, max_length)
    names = groups(road[0], granularity)
    start = list(init) if init is not None else [1.0] * len(road)
    if len(start) != len(road):
        raise FitError(f"init has {len(start)} weights for {len(road)} adapters.")
    coef = torch.nn.Parameter(torch.tensor(start, dtype=torch.float32)[:, None].repeat(1, len(names)))
    t0 = time.perf_counter()
    pm = peft_init(model, road[0] if len(road) == 1 else add(*road))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        for p in pm.parameters():
            p.requires_grad_(False)
        index = {g: j for j, g in enumerate(names)}
        for name, mod in pm.named_modules():
            if not hasattr(mod, "road_theta") or "default" not in getattr(mod, "road_theta", {}):
                continue
            m = name.removeprefix("base_model.model.")
            if m not in road[0].theta:
                raise IncompatibleAdaptersError(f"The model adapts '{m}', which the adapters do not.",
                                                field="modules", left=m, right=None)
            gens = [_generator(a, m) for a in road]
            dtype = mod.road_theta["default"].dtype
            j = index[group_of(m, granularity)]
            parametrize.register_parametrization(
                mod.road_theta, "default", _Mix(coef, j, torch.stack([g[0] for g in gens]).to(dtype), False),
                unsafe=True)
            parametrize.register_parametrization(
                mod.road_alpha, "default", _Mix(coef, j, torch.stack([g[1] for g in gens]).to(dtype), True),
                unsafe=True)
        pm.eval()  # no dropout: the coefficients are fitted to the model as it will run
        opt = torch.optim.Adam([coef], lr=lr)
        gen = torch.Generator().manual_seed(seed)

        def mean_loss() -> float:
            with torch.no_grad():
                total, count = 0.0, 0
                for i in range(0, len(rows), batch_size):
                    batch = collate(rows[i:i + batch_size], pad)
                    n = int((batch["labels"][:, 1:] != -100).sum())
                    total += float(pm(**batch).loss) * n
                    count += n
            return total / max(count, 1)

        first = mean_loss()
        bar = None
        if progress:
            from huggingface_hub.utils import tqdm

            bar = tqdm(total=steps, desc="fit mix")
        order: list[int] = []
        for step in range(steps):
            while len(order) < batch_size:  # epochs in a seeded order; a batch may span two of them
                order += torch.randperm(len(rows), generator=gen).tolist()
            batch_rows, order = [rows[i] for i in order[:batch_size]], order[batch_size:]
            loss = pm(**collate(batch_rows, pad)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
            if callback is not None:
                callback(step + 1, steps, value)
        if bar is not None:
            bar.close()
        final = mean_loss()
    finally:
        for _, mod in pm.named_modules():
            for attr in ("road_theta", "road_alpha"):
                holder = getattr(mod, attr, None)
                if holder is not None and parametrize.is_parametrized(holder, "default"):
                    parametrize.remove_parametrizations(holder, "default", leave_parametrized=False)
        pm.unload()  # hand the caller's model back with its plain layers
    table = {g: [float(coef[i, j].detach()) for i in range(len(road))] for j, g in enumerate(names)}
    params = {"granularity": granularity, "coefficients": table, "data_sha256": digest, "examples": len(convs),
              "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
              "losses": {"first": first, "final": final}, "seconds": round(time.perf_counter() - t0, 1)}
    recipe = Recipe(expression=_fit_expression(road), inputs=_inputs(road),
                    weights=tuple(_mean(table, i) for i in range(len(road))), method="fit", params=params,
                    exact=road[0].variant == "road_1")
    return apply_coefficients(road, table, granularity=granularity, recipe=recipe)


__all__ = ["fit", "apply_coefficients", "rebuild", "groups", "group_of", "FitError", "DataError",
           "GRANULARITIES", "MAX_EXAMPLES"]
