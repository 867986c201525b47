"""The "Fit the weights to examples" panel without Gradio: read the examples, fit on the engine's model, keep the
fitted adapter as the session's current mix.

    examples (pasted JSONL or a .jsonl file) + the chosen RoAd adapters
        │  fit_steps(): composer.fit in a worker thread that holds the engine (Engine.exclusive), so no chat
        │  batch runs while PEFT wraps the model; yields ("step", step, steps, loss) ... ("done", adapter)
        ▼
    Fitted(selected, weights shown on the sliders, adapter with its coefficients, summary)
        │  current(): the session's mix is the fitted adapter while the adapters, the method (task arithmetic)
        │  and the sliders are as the fit left them; moving any of them goes back to the plain weighted sum
        ▼
    chat / compare / save use the fitted adapter (save pushes it with its "fit" recipe)
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import composer
from composer.data import parse_jsonl

from .. import fitting
from .mixer import WEIGHT_RANGE, MixInputError, plain

SLIDER_STEP = 0.05
# Half a slider step: a browser may snap a slider shown at 1.07 to 1.05, which is still the fit; one step of
# the user's (0.05) is not.
TOLERANCE = SLIDER_STEP / 2
MAX_TEXT_CHARS = 2_000_000


@dataclass
class Fitted:
    """A session's fitted mix.

    Attributes:
        selected: the adapters it was fitted for, in the picker's order.
        weights: what the sliders show (each adapter's mean coefficient, rounded to 0.01, clamped to the range).
        adapter: the fitted :class:`composer.RoadAdapter` (its coefficients, ``fit`` recipe).
        summary: :func:`app.fitting.summary` of it, under the picker's names.
    """

    selected: list[str]
    weights: list[float]
    adapter: Any = field(repr=False)
    summary: dict = field(repr=False)


def examples_from(text: Any, file: Any) -> str | list[dict]:
    """The examples to fit on: the uploaded file's path, else the pasted JSONL as rows.

    Raises:
        MixInputError: nothing given, too much text, or JSONL that does not parse (with the line).
    """
    path = file.get("path") if isinstance(file, dict) else getattr(file, "name", file)
    if path:
        return str(path)
    text = text if isinstance(text, str) else ""
    if not text.strip():
        raise MixInputError("Paste a few examples of the combined behaviour (JSONL, one "
                            '{"messages": [...]} or {"prompt": ..., "completion": ...} per line) or upload a '
                            ".jsonl file first.")
    if len(text) > MAX_TEXT_CHARS:
        raise MixInputError(f"The pasted text has {len(text):,} characters; a fit takes a few dozen examples "
                            "at most (32). Paste fewer.")
    try:
        return [{"messages": c} for c in parse_jsonl(text, name="pasted examples")]
    except composer.ComposerError as e:
        raise MixInputError(str(e)) from None


def slider_values(weights: Sequence[float]) -> list[float]:
    """Each mean coefficient as a slider shows it: rounded to 0.01 and kept inside the slider's range."""
    lo, hi = WEIGHT_RANGE
    return [min(hi, max(lo, round(float(w), 2))) for w in weights]


def current(fitted: Fitted | None, selected: Sequence[str], method: str, weights: Sequence[Any]) -> Any:
    """The fitted adapter if the page still shows the fit's choices (same adapters in the same order, task
    arithmetic, every slider within half a step of the fitted mean), else ``None``."""
    if not isinstance(fitted, Fitted) or method != "task_arithmetic" or list(selected or []) != fitted.selected:
        return None
    for w, f in zip(weights, fitted.weights):
        try:
            w = float(w)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(w) or abs(w - f) > TOLERANCE:
            return None
    return fitted.adapter


def fit_steps(engine: Any, named: Sequence[tuple[str, Any]], examples: str | list[dict], *, granularity: str,
              steps: int) -> Iterator[tuple]:
    """Fit in a worker thread on ``engine``'s model while holding the engine; yield its progress.

    Yields:
        ``("step", step, steps, loss)`` after each optimisation step, then ``("done", Fitted)``; a failure is
        raised here (known ones as :class:`MixInputError`).
    """
    events: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            with engine.exclusive() as model:
                adapter = composer.fit([a for _, a in named], examples, model=model, tokenizer=engine.tokenizer,
                                       granularity=granularity, steps=int(steps),
                                       callback=lambda i, n, loss: events.put(("step", i, n, loss)))
            events.put(("done", adapter))
        except BaseException as e:  # noqa: BLE001 - handed to the page's thread, which reports it
            events.put(("error", e))

    # A daemon thread: a page closed mid-fit leaves the fit to finish (it holds the engine until then).
    threading.Thread(target=work, name="app-fit", daemon=True).start()
    while True:
        event = events.get()
        if event[0] == "step":
            yield event
        elif event[0] == "done":
            adapter = event[1]
            names = [n for n, _ in named]
            s = fitting.summary(adapter, names)
            yield ("done", Fitted(selected=names, weights=slider_values(s["weights"]), adapter=adapter, summary=s))
            return
        else:
            e = event[1]
            if isinstance(e, (composer.ComposerError, ValueError, LookupError, OSError)):
                raise MixInputError(f"Cannot fit: {e}") from e
            raise e


def progress_text(step: int, steps: int, loss: float, elapsed: float | None = None) -> str:
    """One line of progress: a text bar, the step, the batch loss and, given the seconds so far, the time left."""
    done = round(20 * step / max(steps, 1))
    text = f"**Fitting** `{'█' * done}{'░' * (20 - done)}` step {step}/{steps} · batch loss {loss:.4f}"
    if elapsed is not None and step > 0:
        text += f" · {elapsed:.0f} s, about {elapsed / step * (steps - step):.0f} s left"
    return text


def summary_markdown(f: Fitted) -> tuple[str, str]:
    """``(status, coefficients)`` for the page once a fit is done."""
    s = f.summary
    per = f"per {s['granularity']}"
    means = ", ".join(f"{plain(n)} {w:.3f}" for n, w in zip(s["adapters"], s["weights"]))
    clamped = any(abs(w - v) > 0.005 + 1e-9 for w, v in zip(s["weights"], f.weights))
    status = (f"**Fitted** {len(s['adapters'])} adapter{'s' if len(s['adapters']) != 1 else ''} {per} on "
              f"{s['examples']} examples in {s['seconds']} s: loss {s['first_loss']:.4f} → {s['final_loss']:.4f}. "
              f"Mean coefficients: {means}.\n\n"
              "The weight sliders show each adapter's mean coefficient; the mix that chat, compare and save use is "
              f"the fitted adapter itself, with its {per} coefficients below. Moving a slider, the method or the "
              "adapters goes back to the plain weighted sum.")
    if clamped:
        status += f" (A mean outside {WEIGHT_RANGE[0]:g}..{WEIGHT_RANGE[1]:g} shows at the slider's end.)"
    # Names come from the store (anyone may have written them): shown as literal text, never as Markdown or HTML.
    groups = len(s["coefficients"])
    plot = fitting.coefficients_plot(s)
    # Names come from the store: inside a code block they are literal text, never Markdown or HTML.
    plot = plot.replace("`", "'")
    return status, (f"**Fitted coefficients ({per}: {groups * len(s['adapters'])} numbers)**, mean per layer\n\n"
                    f"```text\n{plot}\n```\n\nEvery coefficient is in the recipe (`hub show` once saved).")
