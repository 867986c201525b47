"""Next-token choice: greedy, or temperature + nucleus (top-p) sampling, each row with its own generator.

A sampled row draws one uniform number per step from its *own* ``torch.Generator`` and picks the token by
inverse CDF on its own probabilities (every other operation is row-wise), so what a row gets depends only on
its logits and its seed, never on which rows share its batch.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

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


def pick_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
              generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Choose one token per row of ``logits`` ``(batch, vocab)``, each row with its own settings.

    Args:
        logits: the last position's logits of each row.
        temperature: ``(batch,)``; rows at 0 are greedy (argmax, ties to the lowest id as ``transformers``).
        top_p: ``(batch,)`` nucleus mass: the smallest set of tokens whose probability reaches it is kept
            (always at least the most likely one).
        generators: one per row (``None`` for greedy rows); a sampled row draws exactly one number from its
            own generator per call.

    Returns:
        ``(batch,)`` token ids.
    """
    out = logits.argmax(-1)
    hot = (temperature > 0).nonzero().flatten()
    if hot.numel() == 0:
        return out
    lg = logits.index_select(0, hot).float() / temperature.index_select(0, hot).float()[:, None]
    # A temperature so small that logits / t overflow (1e-45 is allowed: finite and > 0) is the t -> 0 limit:
    # greedy. Its row still draws its one number below, so its generator stays in step.
    finite = torch.isfinite(lg).all(-1)
    lg = torch.where(finite[:, None], lg, torch.zeros_like(lg))
    probs = lg.softmax(-1)
    p = top_p.index_select(0, hot).float()
    u = torch.stack([torch.rand((), generator=generators[i], dtype=torch.float64) for i in hot.tolist()])
    picked = torch.empty_like(hot)
    # Rows with top_p < 1 choose in sorted order, the others in id order: either way per row, whatever the
    # settings of the other rows.
    for part in ((p < 1).nonzero().flatten(), (p >= 1).nonzero().flatten()):
        if part.numel():
            picked[part] = _inverse_cdf(probs.index_select(0, part), p.index_select(0, part), u.index_select(0, part))
    out[hot] = torch.where(finite, picked, out.index_select(0, hot))
    return out


def _inverse_cdf(probs: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    order = None
    if bool((top_p < 1).any()):
        # A stable sort: tokens of equal probability keep their id order whatever the batch.
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        # Drop a token when the mass before it already reaches top_p; the first token always stays.
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p[:, None], 0.0)
    cdf = probs.double().cumsum(-1)
    # The first index whose cumulative mass exceeds u * total: never a token of probability 0.
    k = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_max(cdf.shape[-1] - 1)
    return k.squeeze(-1) if order is None else order.gather(-1, k).squeeze(-1)


def generator(seed: int | None) -> torch.Generator:
    """A row's own sampler: seeded with ``seed``, or with fresh entropy when ``seed`` is ``None``."""
    return torch.Generator().manual_seed(int(seed) if seed is not None else secrets.randbits(63))
