"""The app under hostile requests: long histories cost few renders and are capped, sampling settings that
sampling cannot use are refused, and text from folders and stores reaches the page as text, never HTML."""

from __future__ import annotations

import math

import pytest

from app.batcher import check_history, fit_messages
from app.engine.sampling import check_sampling
from app.errors import RequestError
from app.ui.mixer import deviation_text, plain
from tests.helpers import chat_tokenizer


def _tokens(tok, messages) -> int:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return len(ids if isinstance(ids, list) else ids["input_ids"])


class CountingTokenizer:
    """Wraps the character tokenizer and counts whole-conversation renders."""

    def __init__(self) -> None:
        self.tok = chat_tokenizer()
        self.renders = 0

    def apply_chat_template(self, messages, **kw):
        self.renders += 1
        return self.tok.apply_chat_template(messages, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_history_trimming_renders_logarithmically_many_times():
    tok = CountingTokenizer()
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "x" * 20}
            for i in range(800)]
    fitted, note = fit_messages(tok, msgs, 200)
    assert tok.renders <= 2 * math.ceil(math.log2(len(msgs))) + 4
    assert fitted[-1] == msgs[-1] and _tokens(tok.tok, fitted) <= 200
    # the fewest messages were dropped: keeping one more would not fit
    start = len(msgs) - len(fitted)
    assert _tokens(tok.tok, msgs[start - 1:]) > 200
    assert f"dropped the {start} oldest" in note


def test_total_history_is_capped_with_the_variable_named(monkeypatch):
    check_history([{"role": "user", "content": "hi"}] * 10)
    with pytest.raises(RequestError, match="ADAPTER_HUB_MAX_HISTORY_TURNS"):
        check_history([{"role": "user", "content": "hi"}] * 1001)
    monkeypatch.setenv("ADAPTER_HUB_MAX_HISTORY_CHARS", "100")
    with pytest.raises(RequestError, match="ADAPTER_HUB_MAX_HISTORY_CHARS"):
        check_history([{"role": "user", "content": "x" * 60}, {"role": "assistant", "content": "y" * 60}])


@pytest.mark.parametrize("temperature, top_p", [(math.nan, 1.0), (math.inf, 1.0), (-1, 1.0), (0.7, math.nan),
                                                (0.7, 0.0), (0.7, 1.5), ("hot", 1.0), (None, 1.0)])
def test_sampling_settings_sampling_cannot_use_are_refused(temperature, top_p):
    with pytest.raises(RequestError):
        check_sampling(temperature, top_p)


def test_sampling_settings_that_work():
    assert check_sampling(0, 1) == (0.0, 1.0)
    assert check_sampling("0.5", 0.9) == (0.5, 0.9)


@pytest.mark.parametrize("text", ["<img src=http://example.invalid/x.png>", "**bold** [link](http://x)",
                                  "`code` <script>alert(1)</script>", "![i](http://x/y.png)"])
def test_plain_leaves_no_markup(text):
    out = plain(text)
    assert "<" not in out and ">" not in out
    for c in "*[]()`!":
        assert all(out[i - 1] == "\\" for i, ch in enumerate(out) if ch == c)


def test_recipe_fields_render_as_text(tmp_path):
    import dataclasses

    import composer
    from tests.helpers import road

    mixed = composer.scale(road(0), 0.5)
    evil = dataclasses.replace(mixed, recipe=dataclasses.replace(mixed.recipe, method="<img src=http://x/y>"))
    assert "<img" not in deviation_text(evil)


@pytest.mark.parametrize("t", [1e-45, 1e-300, 5e-324])
def test_a_tiny_temperature_is_greedy_not_garbage(t):
    """temperature=1e-45 (finite, > 0, inside the slider's range) overflowed logits / t to inf, and the softmax
    of inf - inf sampled garbage: it is the t -> 0 limit, the greedy choice."""
    import torch

    from app.engine.sampling import check_sampling, pick_rows

    t, p = check_sampling(t, 1.0)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 10
    temps = torch.tensor([t, 0.0, t])
    gens = [torch.Generator().manual_seed(i) if temps[i] > 0 else None for i in range(3)]
    out = pick_rows(logits, temps, torch.tensor([p, p, 0.5]), gens)
    assert out.tolist() == logits.argmax(-1).tolist()


def test_an_enormous_scale_is_refused_not_an_empty_reply():
    """A RoAd adapter with finite but enormous scales (α = 1e30) overflowed the activations and every reply came
    out empty with no message; the engine refuses the mix with the reason, and a mix within the bound still runs."""
    from dataclasses import replace

    import torch

    from app.engine import Engine
    from app.engine.road import MAX_SCALE
    from app.errors import MixError
    from tests.tiny import random_road, tiny_chat_model

    model, tok = tiny_chat_model()
    a = random_road(model, seed=1)
    engine = Engine(model, tok)
    msg = [{"role": "user", "content": "hi"}]
    for scale in (1e30, 10 * MAX_SCALE):
        big = replace(a, alpha={m: torch.full_like(v, scale) for m, v in a.alpha.items()})
        with pytest.raises(MixError, match="overflow"):
            engine.generate([{"messages": msg, "mix": big}], max_new_tokens=4)
    assert engine.generate([{"messages": msg, "mix": a}], max_new_tokens=4) != [""]
