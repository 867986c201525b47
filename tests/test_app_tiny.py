"""Unit tests of the app's pure parts: expressions, truncation, the batcher (the tiny chat model, the store
with two small adapters and the served app they use are in tests/tiny.py and tests/helpers.py)."""

from __future__ import annotations

import pytest
import torch

import composer
import hub
from app.batcher import Batcher, fit_messages
from app.engine import Engine
from app.ui import Mixer, MixInputError, build_expression
from tests.helpers import chat_tokenizer, in_threads, populate_store
from tests.tiny import random_prompt, random_road, tiny_chat_model


@pytest.mark.parametrize("selected,weights,method,expected", [
    ([], [], "task_arithmetic", ""),
    (["alice/math@v2"], [0.5], "task_arithmetic", "0.5*alice/math@v2"),
    (["a/x", "b/y", "c/z"], [0.7, 1.0, -0.3], "task_arithmetic", "0.7*a/x + b/y - 0.3*c/z"),
    (["a/x", "b/y"], [-1.0, 0.25], "task_arithmetic", "-a/x + 0.25*b/y"),
    (["a/x", "b/y"], [1, 1], "interp", "interp(a/x, b/y, 0.25)"),
    (["a/x", "b/y"], [0.6, -0.4], "ties", "merge(ties, 0.6*a/x, -0.4*b/y, density=0.5)"),
    (["a/x", "b/y"], [0.6, 0.4], "dare_linear", "merge(dare_linear, 0.6*a/x, 0.4*b/y, density=0.5)"),
])
def test_expression_from_the_page_parses_back(selected, weights, method, expected):
    text = build_expression(selected, weights, method, t=0.25, density=0.5)
    assert text == expected
    if text:
        tree = composer.parse(text)
        assert composer.expr.names(tree) == selected


@pytest.mark.parametrize("weights,method,needle", [
    ([float("nan"), 1.0], "task_arithmetic", "not a finite number"),
    ([float("inf"), 1.0], "ties", "not a finite number"),
    ([3.0, 1.0], "task_arithmetic", "outside"),
    (["x", 1.0], "task_arithmetic", "not a number"),
])
def test_bad_weights_are_explained(weights, method, needle):
    with pytest.raises(MixInputError, match=needle):
        build_expression(["a/x", "b/y"], weights, method)


def test_interpolation_needs_two_adapters():
    with pytest.raises(MixInputError, match="exactly two"):
        build_expression(["a/x", "b/y", "c/z"], [1, 1, 1], "interp")


def test_fit_messages_cuts_old_turns_then_the_last_message():
    tok = chat_tokenizer()
    msgs = [{"role": "user", "content": "a" * 50}, {"role": "assistant", "content": "b" * 50},
            {"role": "user", "content": "c" * 500}]
    fitted, note = fit_messages(tok, msgs, 100)
    assert len(fitted) == 1 and fitted[0]["content"].startswith("c")
    assert len(tok.apply_chat_template(fitted, add_generation_prompt=True)) <= 100
    assert "dropped the 2 oldest messages" in note and "kept the first" in note
    same, none = fit_messages(tok, msgs[:1], 100)
    assert same == msgs[:1] and none is None


def test_batcher_rows_match_the_engine_alone_and_share_a_batch(tmp_path):
    model, tok = tiny_chat_model()
    a, b = random_road(model, seed=1, scale=0.8), random_road(model, seed=2, scale=0.8)
    engine = Engine(model, tok)
    prompts = ["hi", "what is 2+2?", "tell me", "code"]
    mixes = [None, a, b, composer.add(a, b)]
    expected = [engine.generate([{"messages": [{"role": "user", "content": p}], "mix": m}], max_new_tokens=10)[0]
                for p, m in zip(prompts, mixes)]
    assert len(set(expected)) > 1
    batcher = Batcher(engine, max_batch=8, wait_ms=200)
    try:
        results = [None] * 4

        def run(i):
            s = batcher.submit([{"role": "user", "content": prompts[i]}], mixes[i], max_new_tokens=10)
            for results[i] in s:
                pass

        in_threads(run, 4)
        assert results == expected
        assert max(batcher.batches) > 1  # at least two sessions shared a batch
    finally:
        batcher.close()


def test_a_bad_mix_in_a_batch_fails_only_its_own_session():
    model, tok = tiny_chat_model()
    good = random_road(model, seed=1)
    wrong = random_prompt(n=2, dim=16)  # token_dim does not fit the model
    engine = Engine(model, tok)
    batcher = Batcher(engine, wait_ms=200)
    try:
        s_bad = batcher.submit([{"role": "user", "content": "x"}], wrong, max_new_tokens=4)
        s_good = batcher.submit([{"role": "user", "content": "y"}], good, max_new_tokens=4)
        with pytest.raises(Exception, match="token_dim"):
            list(s_bad)
        assert list(s_good)[-1] == engine.generate(
            [{"messages": [{"role": "user", "content": "y"}], "mix": good}], max_new_tokens=4)[0]
    finally:
        batcher.close()


def test_mixer_lists_evaluates_and_saves(tmp_path):
    model, _ = tiny_chat_model()
    populate_store(tmp_path, model)
    mixer = Mixer(tmp_path)
    rows = {r["id"]: r for r in mixer.rows()}
    assert rows["alice/math"]["kind"].startswith("road") and rows["carol/style"]["kind"] == "prompt"
    assert rows["alice/math"]["base_model"] == "tiny-llama" and rows["alice/math"]["latest"] == "v1"
    adapter, _ = mixer.evaluate("0.7*alice/math@v1 - 0.3*bob/code")
    assert adapter.recipe.exact
    with pytest.raises(MixInputError, match="cannot be mixed"):
        mixer.evaluate("alice/math + carol/style")
    local, _ = mixer.save(adapter, "me/mix", expression="0.7*alice/math@v1 - 0.3*bob/code")
    assert local.tag == "v1" and "me/mix" in {r["id"] for r in mixer.rows()}
    assert hub.load("me/mix@v1", root=tmp_path).recipe.expression == "0.7*alice/math@v1 - 0.3*bob/code"


def test_mixer_resolves_each_name_once_and_serves_the_pinned_commits(tmp_path, monkeypatch):
    model, _ = tiny_chat_model()
    populate_store(tmp_path, model)
    mixer = Mixer(tmp_path)
    mixer.rows()  # the page lists the adapters first, which loads each version once (cached per commit)
    calls = []
    real = mixer.store.resolve
    v1 = real("alice/math@v1").sha

    def resolve(name, *a, **k):
        calls.append(name)
        return real(name, *a, **k)

    monkeypatch.setattr(mixer.store, "resolve", resolve)
    expression, adapter, _ = mixer.compose(["alice/math", "bob/code"], [0.7, -0.3])
    assert sorted(calls) == ["alice/math", "bob/code"]  # once each per change (was 4-5 git lookups per name)
    # A version pushed while a mix is evaluated cannot enter it: the mix loads the commits resolved first.
    pushed = []

    def racing(name, *a, **k):
        r = real(name, *a, **k)
        if name == "alice/math" and not pushed:
            new = composer.save(random_road(model, seed=9, scale=0.8), tmp_path / "new")
            pushed.append(hub.Store(tmp_path).push(new, "alice/math"))
        return r

    monkeypatch.setattr(mixer.store, "resolve", racing)
    mixer._mixes.clear()
    _, again, _ = mixer.compose(["alice/math", "bob/code"], [0.7, -0.3])
    assert pushed and real("alice/math").sha != v1
    assert torch.equal(composer.adapters.task_vector(again), composer.adapters.task_vector(adapter))


def test_what_the_page_shows_as_an_expression_parses_back(tmp_path):
    """Every mix the page can build is shown as an expression `hub compose` reads back, adapters of several kinds on
    one row (`road ; prompt`) included, except the form the box's label names: a fitted mix (`fit(...)`)."""
    from app.ui.page import EXPRESSION_INFO
    from composer.expr import short_shas

    model, _ = tiny_chat_model()
    populate_store(tmp_path, model)
    mixer = Mixer(tmp_path)
    shown = []
    for method in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "interp"):
        for selected in (["alice/math"], ["alice/math", "bob/code"], ["alice/math", "carol/style"]):
            try:
                expression, adapter, _ = mixer.compose(selected, [0.5, -0.25], method, 0.3, 0.6)
            except MixInputError:
                continue
            shown.append((short_shas(expression), isinstance(adapter, composer.Parts)))
    fitted = composer.fit([mixer.load("alice/math"), mixer.load("bob/code")],
                          [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
                          model=model, tokenizer=tiny_chat_model()[1], steps=1, granularity="adapter")
    fit_text = short_shas(fitted.recipe.expression)
    assert fit_text.startswith("fit(") and "`fit(a, b)`" in EXPRESSION_INFO and " ; " in EXPRESSION_INFO
    pairs = [text for text, pair in shown if pair]
    assert pairs and all(" ; " in text for text in pairs)
    plain = [text for text, pair in shown if not pair]
    assert len(plain) >= 8
    for text in plain:
        composer.evaluate(text, resolve=mixer.load)  # parses and resolves, pinned shas included
    for text in pairs:  # the parts, each side's recipe its own text
        parts = composer.evaluate(text, resolve=mixer.load)
        assert [p.kind for p in parts] == ["road", "prompt"] and parts.recipe.expression == text
    with pytest.raises(composer.ExpressionError):
        composer.parse(fit_text)


def test_app_command_has_help_and_checks_auth(capsys):
    from app.ui import _auth, main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--port" in out and "--share" in out and "Examples:" in out
    assert _auth("alice:s3cret:x") == ("alice", "s3cret:x")
    with pytest.raises(SystemExit, match="USER:PASS"):
        _auth("alice")


def test_hub_app_reaches_the_app_parser(capsys):
    from app.cli import main

    with pytest.raises(SystemExit) as e:
        main(["app", "--", "--help"])
    assert e.value.code == 0 and "--max-batch" in capsys.readouterr().out


def test_a_weight_of_zero_is_left_out_of_the_expression():
    assert build_expression(["a/x", "b/y"], [0.0, 0.5]) == "0.5*b/y"
    assert build_expression(["a/x", "b/y"], [0.6, 0.0], "ties") == "merge(ties, 0.6*a/x, density=0.5)"
    assert build_expression(["a/x"], [0.0]) == ""  # all at 0: the base model


def test_card_descriptions():
    from composer.card import describe

    assert describe("---\ndescription: Answers in upper case.\n---\n# T\n\nOther text.\n") == "Answers in upper case."
    assert describe("---\nbase_model: x\n---\n# Title\n\n- a list\n\nTurns replies into JSON.\nAlways.\n") == \
        "Turns replies into JSON. Always."
    assert describe("---\ntraining:\n  data_file: style_upper.jsonl\n  examples: 160\n---\n# T\n") == \
        "Trained on style_upper.jsonl (160 examples)."
    assert describe("# only a title\n") == "" and describe(b"\xff\xfe") == ""
    assert describe("x" * 500).endswith("…") and len(describe("x" * 500)) == 300
