"""Next-token choice: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import torch


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
