"""Fitting the mix outside composer: ``hub fit`` on a tiny base folder, and the app's fit panel on its engine."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import composer
import hub
from app.cli import build_parser, main
from tests.helpers import char_tokenizer
from tests.tiny import learner, random_prompt, random_road


def next_letter_rows(n: int = 12) -> list[dict]:
    """'c' -> 'd': a task the tiny learner's adapters do not already do."""
    return [{"prompt": c, "completion": chr(ord(c) + 1)} for c in "abcdefghijklmnopqrstuvwxyzabcdefghijklmnop"[:n]]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def setup(tmp_path):
    """A tiny base folder, one adapter in the store (examples/a) and one in a folder, and the data file."""
    base = tmp_path / "base"
    model = learner()
    model.save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    composer.save(random_road(model, seed=1, scale=0.3), tmp_path / "a")
    hub.push(tmp_path / "a", "alice/a")
    composer.save(random_road(model, seed=2, scale=0.3), tmp_path / "b")
    data = write_jsonl(tmp_path / "pair.jsonl", next_letter_rows())
    return {"base": str(base), "b": str(tmp_path / "b"), "data": data, "tmp": tmp_path}


def fit_argv(s, *extra, adapters=None):
    return ["fit", *(adapters or ["alice/a", s["b"]]), "--data", s["data"], "-o", str(s["tmp"] / "out"),
            "--base", s["base"], "--steps", "12", "--lr", "0.1", "--granularity", "layer", *extra]


def test_parser_defaults_are_composer_fits():

    sig = inspect.signature(composer.fit).parameters
    p = build_parser()
    a = p.parse_args(["fit", "x/y", "--data", "d.jsonl", "-o", "out"])
    sub = next(x for x in p._actions if x.dest == "command").choices["fit"]
    choices = next(x for x in sub._actions if x.dest == "granularity").choices
    # (the module is composer.mixfit; composer.fit is the function)
    assert set(choices) == set(composer.mixfit.GRANULARITIES)
    for flag, param in (("granularity", "granularity"), ("steps", "steps"), ("lr", "lr"),
                        ("batch_size", "batch_size"), ("seed", "seed")):
        assert getattr(a, flag) == sig[param].default, flag


def test_hub_fit_lowers_the_loss_pins_store_ids_and_pushes(setup, capsys):
    s = setup
    assert main(fit_argv(s, "--push", "team/fitted", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adapters"] == ["alice/a", s["b"]] and len(out["weights"]) == 2
    assert out["final_loss"] < out["first_loss"]
    assert out["granularity"] == "layer" and set(out["coefficients"]) == {"layer.0", "layer.1"}
    assert out["pushed"] == "team/fitted@v1"
    folder = s["tmp"] / "out"
    assert out["path"] == str(folder) and (folder / "recipe.json").is_file()
    fitted = composer.load(folder)
    r = fitted.recipe
    sha = hub.resolve("alice/a").sha
    assert r.method == "fit" and r.inputs[0]["ref"] == f"alice/a@{sha}"  # the store id, pinned to its commit
    assert r.weights == pytest.approx(out["weights"])
    # the recipe rebuilds the same adapter from its pinned inputs, bit for bit
    assert r.inputs[1]["ref"].startswith(f"{s['b']}#sha256:")  # a folder, pinned by its weights' digest
    again = composer.rebuild(r, hub.load)  # rebuild checks and loads the pinned folder itself
    for m in fitted.theta:
        assert torch.equal(again.theta[m], fitted.theta[m]) and torch.equal(again.alpha[m], fitted.alpha[m])
    with pytest.raises(composer.FitError, match="input .* needs|not a pinned folder"):
        composer.rebuild(r)  # the store id needs a resolver
    # a pinned folder that changed since the fit is refused, not silently rebuilt into something else
    composer.save(random_road(learner(), seed=9, scale=0.3), s["b"])
    with pytest.raises(composer.FitError, match="was pinned at sha256:.*restore that version"):
        composer.rebuild(r, hub.load)
    stored = hub.load("team/fitted@v1")
    assert stored.recipe.params["coefficients"] == r.params["coefficients"]


def test_hub_fit_prints_weights_and_losses(setup, capsys):
    s = setup
    assert main(fit_argv(s, "--granularity", "adapter")) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == str(s["tmp"] / "out")  # data on stdout: the folder
    lines = cap.err.splitlines()
    assert any(line.strip().startswith("alice/a") and "mean weight" in line for line in lines), cap.err
    assert any(line.strip().startswith(s["b"]) and "mean weight" in line for line in lines)
    loss = next(line for line in lines if line.startswith("loss "))
    first, final = (float(x) for x in loss.split()[1:4:2])
    assert final < first and loss.endswith(" s")
    assert "fit mix" in cap.err  # the progress bar


@pytest.mark.parametrize("case,needle", [
    ("prompt", "fitting mix coefficients is for RoAd adapters"),
    ("unknown", "No adapter folder 'nobody-here'"),
    ("missing", "No adapter 'alice/none' in the store"),
    ("too-many", "fit takes at most 32"),
    ("bad-json", "pair.jsonl:2 is not valid JSON"),
])
def test_hub_fit_known_errors_one_line_exit_1(setup, capsys, case, needle):
    s = setup
    adapters = None
    if case == "prompt":
        composer.save(random_prompt(), s["tmp"] / "p")
        adapters = ["alice/a", str(s["tmp"] / "p")]
    elif case == "unknown":
        adapters = ["nobody-here"]
    elif case == "missing":
        adapters = ["alice/none"]
    elif case == "too-many":
        write_jsonl(s["tmp"] / "pair.jsonl", next_letter_rows(12) * 3)
    elif case == "bad-json":
        (s["tmp"] / "pair.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{nope\n', encoding="utf-8")
    capsys.readouterr()
    assert main(fit_argv(s, adapters=adapters)) == 1
    cap = capsys.readouterr()
    errors = [line for line in cap.err.splitlines() if "Error:" in line]
    assert len(errors) == 1 and needle in errors[0] and errors[0].endswith("(set HUB_DEBUG=1 for the traceback)")
    assert cap.out == "" and not (s["tmp"] / "out").exists()


def test_hub_show_spells_out_a_fit_recipe(setup, capsys):
    s = setup
    assert main(fit_argv(s, "--push", "team/fitted")) == 0
    capsys.readouterr()
    assert main(["show", "team/fitted"]) == 0
    out = capsys.readouterr().out
    assert "(method fit, exact=True)" in out and "  fit: per layer, 4 coefficients, mean weights " in out
    assert "  fitted on 12 examples (sha256 " in out and "12 steps, lr 0.1, loss " in out


# ------------------------------------------------------------------------------------------ the app's panel

import threading  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402

from app.batcher import Batcher  # noqa: E402
from app.engine import Engine  # noqa: E402
from app.ui import MAX_SLOTS, MixInputError  # noqa: E402
from app.ui.fitpanel import Fitted, current, examples_from, fit_steps  # noqa: E402
from tests.helpers import Served, chat_args, reply_of, wait_for  # noqa: E402
from tests.tiny import tiny_chat_model  # noqa: E402

PASTED = "\n".join(json.dumps(r) for r in next_letter_rows(10)) + "\n"
PAIR = ["alice/math@v1", "bob/code@v1"]


def answer(model, tok, adapter, message="Hello there", n=12) -> str:
    return Engine(model, tok).generate([{"messages": [{"role": "user", "content": message}], "mix": adapter}],
                                       max_new_tokens=n)[0]


def test_examples_come_from_the_file_or_the_pasted_text():
    assert examples_from(PASTED, None)[0] == {"messages": [{"role": "user", "content": "a"},
                                                           {"role": "assistant", "content": "b"}]}
    assert examples_from("ignored", "/tmp/x.jsonl") == "/tmp/x.jsonl"
    with pytest.raises(MixInputError, match="Paste a few examples"):
        examples_from("  \n", None)
    with pytest.raises(MixInputError, match="pasted examples:2 is not valid JSON"):
        examples_from('{"prompt": "a", "completion": "b"}\n{oops\n', None)
    with pytest.raises(MixInputError, match="pasted examples:1: expected"):
        examples_from('{"prompt": "a"}\n', None)


def test_the_fitted_mix_stays_current_until_the_page_moves_away():
    f = Fitted(selected=PAIR, weights=[1.07, 0.93], adapter="fitted", summary={})
    assert current(f, PAIR, "task_arithmetic", [1.07, 0.93, 1.0]) == "fitted"
    assert current(f, PAIR, "task_arithmetic", [1.05, 0.95]) == "fitted"  # a browser snapping to the step
    assert current(f, PAIR, "task_arithmetic", [1.12, 0.93]) is None  # one step moved
    assert current(f, PAIR[::-1], "task_arithmetic", [1.07, 0.93]) is None
    assert current(f, PAIR, "ties", [1.07, 0.93]) is None
    assert current(f, PAIR, "task_arithmetic", ["nan", 0.93]) is None
    assert current(None, PAIR, "task_arithmetic", [1.07, 0.93]) is None


class Gate:
    """The engine, with a fit that pauses inside ``exclusive`` until the test lets it go on."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    @contextmanager
    def exclusive(self):
        with self._engine.exclusive() as model:
            self.entered.set()
            self.release.wait(60)
            yield model


def test_chats_wait_for_a_fit_and_the_model_comes_back_unchanged():
    model, tok = tiny_chat_model()
    a, b = random_road(model, seed=1, scale=0.8), random_road(model, seed=2, scale=0.8)
    mixes = [None, a, composer.add(a, b)]
    expected = [answer(model, tok, m) for m in mixes]
    engine = Engine(model, tok)
    batcher = Batcher(engine, wait_ms=20)
    gate = Gate(engine)
    results, finished = {}, {}
    try:
        events = []
        fitter = threading.Thread(target=lambda: events.extend(
            fit_steps(gate, [("a", a), ("b", b)], examples_from(PASTED, None), granularity="layer", steps=4)))
        fitter.start()
        assert gate.entered.wait(60)

        def chat(i):
            for text in batcher.submit([{"role": "user", "content": "Hello there"}], mixes[i],
                                       max_new_tokens=12):
                results[i] = text
            finished[i] = time.monotonic()

        chats = [threading.Thread(target=chat, args=(i,)) for i in range(len(mixes))]
        for th in chats:
            th.start()
        # every chat reaches the batcher, whose worker takes them and waits for the model the fit holds
        wait_for(lambda: batcher.admitted + batcher.waiting == len(mixes) and batcher.admitted,
                 "the chats to reach the worker")
        assert results == {} and batcher.batches == []  # no batch ran while the fit holds the model
        released = time.monotonic()
        gate.release.set()
        fitter.join(120)
        for th in chats:
            th.join(120)
        assert [results[i] for i in range(len(mixes))] == expected
        assert min(finished.values()) > released
        assert [e[0] for e in events] == ["step"] * 4 + ["done"]
        fitted = events[-1][1]
        assert fitted.adapter.recipe.method == "fit" and fitted.selected == ["a", "b"]
        # the fit saw the plain base model: the same fit on a fresh copy of it gives the same coefficients
        fresh, fresh_tok = tiny_chat_model()
        again = composer.fit([a, b], examples_from(PASTED, None), model=fresh, tokenizer=fresh_tok, steps=4,
                             granularity="layer")
        assert again.recipe.params["coefficients"] == fitted.adapter.recipe.params["coefficients"]
        # and the engine's model is back: plain layers, eval mode, frozen, same answers as before
        assert not any("base_layer" in n for n, _ in model.named_modules()) and not model.training
        assert not any(p.requires_grad for p in model.parameters()) or all(
            p.requires_grad for p in model.parameters())
        assert [answer(model, tok, m) for m in mixes] == expected
    finally:
        gate.release.set()
        batcher.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("store"), max_batch=8)
    yield s
    s.close()


def fit_call(client, text=PASTED, file=None, selected=PAIR, steps=6, granularity="layer"):
    w = [1.0] * MAX_SLOTS
    return client.submit(text, file, granularity, steps, list(selected), *w, api_name="/fit")


def test_fit_through_the_api_moves_the_sliders_and_becomes_the_mix(served, tmp_path):
    from gradio_client import Client, handle_file


    client = Client(served.url, verbose=False)
    job = fit_call(client)
    final = job.result()
    seen = [o[0] for o in job.outputs()]
    assert any("step 1/6" in s for s in seen) and any("step 6/6" in s for s in seen)  # progress was streamed
    status, table, method = final[0], final[1], final[2]
    weights = [o["value"] if isinstance(o, dict) else o for o in final[3:3 + 2]]  # slider updates
    assert status.startswith("**Fitted** 2 adapters per layer on 10 examples") and "→" in status
    assert "per layer: 4 numbers" in table and "layers 0 .. 1, left to right" in table  # a plot, not a table
    assert table.count("alice/math@v1") == 1 and "mean" in table.split("alice/math@v1")[1].splitlines()[0]
    assert any("s left" in s for s in seen)  # an estimate of the time left
    assert method == "task_arithmetic"
    expression, mix_status = final[3 + MAX_SLOTS], final[4 + MAX_SLOTS]
    assert expression.startswith("fit(alice/math@") and "Fitted mix ready" in mix_status
    # chat with the sliders where the fit left them: the fitted adapter answers
    w = list(weights) + [1.0] * (MAX_SLOTS - 2)
    out = client.predict("me/fitted", False, PAIR, "task_arithmetic", 0.5, 0.5, *w, api_name="/save")
    assert "me/fitted@v1" in out[0]
    stored = hub.load("me/fitted@v1", root=served.root)
    assert stored.recipe.method == "fit" and set(stored.recipe.params["coefficients"]) == {"layer.0", "layer.1"}
    assert [round(x, 2) for x in stored.recipe.weights] == pytest.approx(weights)
    reply = reply_of(client.predict(*chat_args("Hello there", PAIR, weights), api_name="/chat"))
    # the chat trims the reply and shows a tab as spaces
    assert reply.split() == answer(served.model, served.tok, stored).split()
    assert reply.strip() != served.alone("alice/math@v1 + bob/code@v1", "Hello there", max_new_tokens=12).strip()
    # moving a slider goes back to the plain weighted sum; a client without the fit never sees it
    moved = [weights[0] + 0.05, weights[1]]
    mix = client.predict(PAIR, "task_arithmetic", 0.5, 0.5, *moved, *([1.0] * (MAX_SLOTS - 2)), api_name="/mix")
    assert not mix[0].startswith("fit(") and "Fitted" not in mix[1]
    other = Client(served.url, verbose=False)
    assert reply_of(other.predict(*chat_args("Hello there", PAIR, weights), api_name="/chat")).strip() == \
        served.alone(build_sum(weights), "Hello there", max_new_tokens=12).strip()
    # an uploaded file works as the pasted text does
    path = tmp_path / "ex.jsonl"
    path.write_text(PASTED, encoding="utf-8")
    by_file = fit_call(client, text="", file=handle_file(str(path)), granularity="adapter", steps=2).result()
    assert by_file[0].startswith("**Fitted** 2 adapters per adapter on 10 examples")


def build_sum(weights):
    from app.ui import build_expression

    return build_expression(PAIR, weights)


@pytest.mark.parametrize("kw,needle", [
    (dict(text=""), "Paste a few examples"),
    (dict(selected=[]), "Choose the RoAd adapters"),
    (dict(selected=["alice/math@v1", "carol/style@v1"]), "fitting mix coefficients is for RoAd adapters"),
    (dict(text="{bad\n"), "pasted examples:1 is not valid JSON"),
])
def test_fit_problems_are_explained_in_the_panel(served, kw, needle):
    from gradio_client import Client

    final = fit_call(Client(served.url, verbose=False), **kw).result()
    assert final[0].startswith("**Not fitted.**") and needle in final[0], final[0]
