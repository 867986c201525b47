"""Fitting the mix outside composer: ``hub fit`` on a tiny base folder, and the app's fit panel on its engine."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import composer
import hub
from app.cli import build_parser, main
from tests.test_train import char_tokenizer, learner
from tests.tiny import random_prompt, random_road


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
            "--base", s["base"], "--steps", "12", "--lr", "0.1", *extra]


def test_parser_defaults_are_composer_fits():
    sig = inspect.signature(composer.fit).parameters
    a = build_parser().parse_args(["fit", "x/y", "--data", "d.jsonl", "-o", "out"])
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
    from app.train import default_resolve

    again = composer.rebuild(r, default_resolve)
    for m in fitted.theta:
        assert torch.equal(again.theta[m], fitted.theta[m]) and torch.equal(again.alpha[m], fitted.alpha[m])
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
