"""Whether a chosen set of adapters will compose in behaviour, from what their cards record.

Exact algebra is not enough: the composition bench (``bench/composition_quality.py``) measured that adapters
trained with plain cross-entropy add badly in behaviour (both styles in 0–8% of replies), and that adapters
moving the same 2D pairs interfere. :func:`notes` turns the training records of the inputs into plain
sentences with the next step, for ``hub compose`` and the app's mixer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import kinds
from .adapters import Adapter

PLAIN = ("{name} was trained with plain cross-entropy: such adapters rarely add in behaviour (both styles in "
         "0–8% of replies in the bench). Fit the mix to a few examples (`hub fit`), or retrain it with `hub "
         "train`'s default (anchored) objective and the other adapter applied (`--with OTHER=pair.jsonl`).")
ALONE = ("{name} was trained alone (no `--with` companions): in the bench, pairs of adapters trained alone kept both "
         "behaviours and the content in 0–14% of replies to prompts of unseen forms, pairs trained with each other "
         "applied in 70–90%. Fit the mix (`hub fit`), or retrain it with `hub train --with OTHER=pair.jsonl` "
         "(examples of both behaviours together).")
OVERLAP = ("{a} and {b} move the same 2D pairs ({share:.0%} of the smaller one's): they interfere where they "
           "overlap. Fit the mix (`hub fit`), or retrain one of them with `hub train` (its default picks a free "
           "subspace slot).")
OVERLAP_LIMIT = 0.25


def notes(inputs: Sequence[tuple[str, Adapter, dict[str, Any] | None]]) -> list[str]:
    """Sentences about ``(name, adapter, training record or None)`` inputs that will not compose well.

    An input without a training record (composed, or from elsewhere) gets no objective note; one trained anchored but
    alone (no companions) gets a note when it is mixed with another layered adapter; RoAd pairs are checked for
    overlapping active pairs whatever their records say.
    """
    from .subspace import overlap

    out = []
    several = sum(kinds.of(a).layered for _, a, _ in inputs) > 1
    for name, adapter, training in inputs:
        if not (kinds.of(adapter).layered and isinstance(training, dict) and training.get("steps") is not None):
            continue
        # A record without an objective comes from a hub train that had only cross-entropy.
        if training.get("objective", "cross_entropy") == "cross_entropy":
            out.append(PLAIN.format(name=name))
        elif several and not training.get("companions"):
            out.append(ALONE.format(name=name))
    roads = [(n, a) for n, a, _ in inputs if kinds.of(a).subspaces]
    for i, (na, a) in enumerate(roads):
        for nb, b in roads[i + 1:]:
            o = overlap(a, b)
            if o["modules"] and o["overlap"] > OVERLAP_LIMIT:
                out.append(OVERLAP.format(a=na, b=nb, share=o["overlap"]))
    return out
