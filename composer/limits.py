"""Limits on size and work: each set far above what a real user meets, each changeable by one variable.

One table owns them all (composer, hub and the app read it through :func:`get`), so the README, the errors
and the code cannot disagree::

    name                 variable                               default     guards
    adapter_bytes        ADAPTER_HUB_MAX_ADAPTER_BYTES          512 MiB     files read by load / push
    config_bytes         ADAPTER_HUB_MAX_CONFIG_BYTES           1 MiB       adapter_config.json, recipe.json, README.md
    nesting              ADAPTER_HUB_MAX_NESTING                32          JSON / YAML nesting depth
    dimension            ADAPTER_HUB_MAX_DIMENSION              1048576     group_size, token_dim, virtual tokens
    expression_chars     ADAPTER_HUB_MAX_EXPRESSION_CHARS       10000       expression length
    expression_terms     ADAPTER_HUB_MAX_EXPRESSION_TERMS       256         adapter names in one expression
    expression_depth     ADAPTER_HUB_MAX_EXPRESSION_DEPTH       32          parentheses / calls nested
    lock_timeout         ADAPTER_HUB_LOCK_TIMEOUT               600 s       waiting for another writer's lock
    history_chars        ADAPTER_HUB_MAX_HISTORY_CHARS          200000      a chat request's whole history
    history_turns        ADAPTER_HUB_MAX_HISTORY_TURNS          1000        a chat request's turns
    remote_deadline      ADAPTER_HUB_REMOTE_DEADLINE            600 s       all of one pull's reads from a remote

A variable that is not a positive number is refused with a :class:`LimitExceededError` that says so, rather
than silently ignored.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import LimitExceededError


@dataclass(frozen=True)
class Limit:
    name: str
    env: str
    default: float
    unit: str
    what: str


_TABLE = (
    Limit("adapter_bytes", "ADAPTER_HUB_MAX_ADAPTER_BYTES", 512 * 2**20, "bytes", "adapter files"),
    Limit("config_bytes", "ADAPTER_HUB_MAX_CONFIG_BYTES", 2**20, "bytes", "a config, recipe or card file"),
    Limit("nesting", "ADAPTER_HUB_MAX_NESTING", 32, "levels", "JSON/YAML nesting"),
    Limit("dimension", "ADAPTER_HUB_MAX_DIMENSION", 2**20, "", "a size in adapter_config.json"),
    Limit("expression_chars", "ADAPTER_HUB_MAX_EXPRESSION_CHARS", 10_000, "characters", "an expression"),
    Limit("expression_terms", "ADAPTER_HUB_MAX_EXPRESSION_TERMS", 256, "adapter names", "an expression"),
    Limit("expression_depth", "ADAPTER_HUB_MAX_EXPRESSION_DEPTH", 32, "levels", "expression nesting"),
    Limit("parts", "ADAPTER_HUB_MAX_PARTS", 16, "parts", "a recipe of parts"),
    Limit("lock_timeout", "ADAPTER_HUB_LOCK_TIMEOUT", 600, "seconds", "waiting for a lock"),
    Limit("history_chars", "ADAPTER_HUB_MAX_HISTORY_CHARS", 200_000, "characters", "a chat history"),
    Limit("history_turns", "ADAPTER_HUB_MAX_HISTORY_TURNS", 1000, "turns", "a chat history"),
    Limit("remote_deadline", "ADAPTER_HUB_REMOTE_DEADLINE", 600, "seconds", "one pull from a remote"),
)
LIMITS: dict[str, Limit] = {lim.name: lim for lim in _TABLE}


def get(name: str) -> float:
    """The current value of limit ``name`` (its variable when set, else the default)."""
    lim = LIMITS[name]
    raw = os.environ.get(lim.env)
    if raw is None or raw.strip() == "":
        return lim.default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise LimitExceededError(f"{lim.env}={raw!r} is not a positive number; unset it or give one "
                                 f"(default {_fmt(lim.default)}).", limit=name, value=raw, maximum=lim.default)
    return value


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def check(name: str, value: float, what: str | None = None) -> None:
    """Raise :class:`LimitExceededError` if ``value`` exceeds limit ``name``, saying how to raise it."""
    maximum = get(name)
    if value > maximum:
        raise exceeded(name, value, what)


def exceeded(name: str, value: object, what: str | None = None) -> LimitExceededError:
    lim = LIMITS[name]
    maximum = get(name)
    unit = f" {lim.unit}" if lim.unit else ""
    shown = _fmt(value) if isinstance(value, (int, float)) else str(value)
    return LimitExceededError(
        f"{what or lim.what} is over the limit: {shown}{unit}, the most allowed is {_fmt(maximum)}{unit}. "
        f"If that is intended, raise it with {lim.env}=<number>.", limit=name, value=value, maximum=maximum)


def depth(obj: object, maximum: int) -> int:
    """Nesting depth of a parsed JSON/YAML value, stopping as soon as it passes ``maximum`` (iterative)."""
    deepest = 0
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            items = list(o.values())
        elif isinstance(o, (list, tuple)):
            items = list(o)
        else:
            continue
        deepest = max(deepest, d)
        if deepest > maximum:
            return deepest
        stack.extend((c, d + 1) for c in items)
    return deepest


def check_nesting(obj: object, what: str) -> None:
    maximum = int(get("nesting"))
    d = depth(obj, maximum)
    if d > maximum:
        raise exceeded("nesting", f"more than {maximum}", what=f"The nesting of {what}")
