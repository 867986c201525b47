"""Next-token choice: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import math

import torch

from ..errors import RequestError


def check_sampling(temperature: object, top_p: object) -> tuple[float, float]:
    """``(temperature, top_p)`` as floats, or :class:`RequestError` for values sampling cannot use.

    NaN and inf pass a ``<= 0`` test and only fail deep inside ``torch.multinomial``; refuse them here.
    """
    try:
        t, p = float(temperature), float(top_p)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise RequestError(f"temperature and top_p must be numbers, got {temperature!r} and {top_p!r}.",
                           field="temperature", value=temperature) from None
    if not math.isfinite(t) or t < 0:
        raise RequestError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}.",
                           field="temperature", value=temperature)
    if not math.isfinite(p) or not 0 < p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p!r}.", field="top_p", value=top_p)
    return t, p


def pick_next(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose one token per row from ``logits`` of shape ``(batch, vocab)``.

    ``temperature <= 0`` is greedy (argmax, ties to the lowest id as ``transformers`` does). Otherwise the
    logits are divided by ``temperature``, the smallest set of tokens whose probability reaches ``top_p`` is
    kept (always at least the most likely one), and one token is drawn with ``generator``.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p; the first token always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
