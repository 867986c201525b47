"""The command line's rough edges, tried as a new user would (issue 19, item 9); each test failed before its
fix."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

import hub
from app import cli
from app.cli import main
from tests.helpers import env, folder


def _push_interrupted_at(stage: str, tmp_path) -> subprocess.CompletedProcess:
    """``hub push`` stopped at ``stage`` (hub.store's test hook), sent Ctrl-C's SIGINT there, let run on."""
    flag = tmp_path / "paused"
    src = folder(tmp_path, "src")
    p = subprocess.Popen([sys.executable, "-m", "app.cli", "push", str(src), "alice/math"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env(HUB_TEST_PAUSE_AFTER=stage, HUB_TEST_PAUSE_SIGNAL=str(flag),
                                 HUB_TEST_PAUSE_SECONDS="1"))
    deadline = time.monotonic() + 240
    while not flag.exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=240)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_ctrl_c_once_the_version_is_recorded_is_not_a_failure(tmp_path):
    p = _push_interrupted_at("refs", tmp_path)  # just after the ref transaction
    assert p.returncode == 0, p.stderr
    assert p.stdout == "alice/math@v1\n"
    assert "Pushed alice/math v1" in p.stderr and "Ctrl-C came after the version was recorded" in p.stderr
    assert "Traceback" not in p.stderr
    assert [e["tags"] for e in hub.log("alice/math")] == [["v1"]]


def test_ctrl_c_before_the_version_is_recorded_records_nothing_and_says_so(tmp_path):
    p = _push_interrupted_at("commit", tmp_path)  # the commit object is written, no ref moved yet
    assert p.returncode == 130
    assert p.stdout == "" and p.stderr.strip().splitlines()[-1] == "Interrupted; no version was recorded."
    assert hub.log("alice/math") == []


def test_ctrl_c_just_after_the_pushed_line_still_exits_0(tmp_path, monkeypatch, capsys):
    """The Ctrl-C lands while the "Pushed ..." line is written, in process."""
    said = cli._err

    def err_then_interrupt(msg: str) -> None:
        said(msg)
        if msg.startswith("Pushed"):
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(cli, "_err", err_then_interrupt)
    assert main(["push", str(folder(tmp_path, "src")), "alice/math"]) == 0
    out = capsys.readouterr()
    assert out.out == "alice/math@v1\n" and "Ctrl-C came after" in out.err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


def test_ctrl_c_during_a_read_only_command_still_interrupts(monkeypatch, capsys):
    def interrupted(a):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.HANDLERS, "list", interrupted)
    assert main(["list"]) == 130
    assert capsys.readouterr().err == "Interrupted.\n"



# ------------------------------------------------------------------------------------------- names and ids

def test_a_dash_between_two_ids_suggests_spaces(tmp_path, capsys):
    for name, seed in (("alice/math", 0), ("alice/code", 1)):
        assert main(["push", str(folder(tmp_path, name.replace("/", "-"), seed=seed)), name]) == 0
    capsys.readouterr()
    assert main(["compose", "alice/math-alice/code", "-o", "team/mix"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: Cannot resolve 'alice/math-alice/code': "
                          "did you mean 'alice/math - alice/code'?")
    assert "put spaces around it to subtract" in err
    assert main(["compose", "alice/math - alice/code", "-o", "team/mix"]) == 0  # what it suggested works


@pytest.mark.parametrize("argv, close", [
    (["log", "alice/mth"], "'alice/math'"),
    (["show", "alcie/math@v1"], "'alice/math'"),
    (["pull", "alice/maths"], "'alice/math'"),
    (["compose", "alice/mth + alice/math", "-o", "team/mix"], "'alice/math'"),
    (["log", "alice/zzzzzz"], None),
    (["log", "bob/math-old"], None),  # a shared name in another namespace is no typo
])
def test_unknown_ids_suggest_close_ones_from_the_store(argv, close, tmp_path, capsys):
    assert main(["push", str(folder(tmp_path, "src")), "alice/math"]) == 0
    assert main(["push", str(folder(tmp_path, "src2", seed=2)), "team/other"]) == 0
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "No adapter '" in err
    assert (f"Did you mean {close}?" in err) if close else "Did you mean" not in err


# ------------------------------------------------------------------------------------------- base models

def _push(adapter, name: str, tmp_path) -> None:
    assert main(["push", str(folder(tmp_path, name.replace("/", "-"), adapter)), name]) == 0


def test_adapters_of_different_base_models_lead_with_the_base_models(tmp_path, capsys):
    from tests.helpers import road
    from tests.tiny import random_road, tiny_model

    _push(road(0), "alice/small", tmp_path)
    _push(random_road(tiny_model(hidden=64), group_size=16, targets=("q_proj",), base="org/big"), "bob/big",
          tmp_path)
    capsys.readouterr()
    assert main(["compose", "alice/small + bob/big", "-o", "team/mix"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: Different base models: 'tiny-llama' (alice/small@"), err
    assert "'org/big' (bob/big@" in err and "do not fit together: group sizes differ" in err


def test_same_shapes_of_different_base_models_warn_in_one_line(tmp_path, capsys):
    import dataclasses

    from tests.helpers import road

    other = road(1)
    _push(road(0), "alice/small", tmp_path)
    twin = dataclasses.replace(other, config={**other.config, "base_model_name_or_path": "org/twin"})
    _push(twin, "bob/twin", tmp_path)
    capsys.readouterr()
    assert main(["compose", "alice/small + bob/twin", "-o", "team/mix"]) == 0
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if "Different base models" in line]
    assert len(warned) == 1
    assert warned[0].startswith("warning: Different base models: 'tiny-llama' (alice/small@")
    assert not any("Warning:" in line or ".py:" in line or line.startswith("  ") for line in err), err


# ------------------------------------------------------------------------------------ train and fit inputs

@pytest.fixture
def no_model(monkeypatch):
    """The base model must not load: each input below is wrong, and saying so must not cost the load."""
    import app.engine

    def load_base(*args, **kw):
        raise AssertionError("the base model was loaded before the inputs were checked")

    monkeypatch.setattr(app.engine, "load_base", load_base)


@pytest.mark.parametrize("data, said", [
    (None, "is not a file"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": \n', "data.jsonl:2 is not valid JSON"),
    ("\n\n", "holds no examples"),
    ("".join('{"prompt": "a", "completion": "b"}\n' for _ in range(33)), "at most 32"),
])
def test_fit_checks_its_inputs_before_loading_the_model(data, said, no_model, tmp_path, capsys):
    for name, seed in (("alice/a", 0), ("alice/b", 1)):
        assert main(["push", str(folder(tmp_path, name.replace("/", "-"), seed=seed)), name]) == 0
    path = tmp_path / "data.jsonl"
    if data is not None:
        path.write_text(data)
    capsys.readouterr()
    assert main(["fit", "alice/a", "alice/b", "--data", str(path), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and said in err, err


@pytest.mark.parametrize("data, extra, said", [
    ('{"prompt": "a", "completion": \n', [], "data.jsonl:1 is not valid JSON"),
    ('{"prompt": "a", "completion": "b"}\n', ["--with", "examples/x=missing.jsonl"], "missing.jsonl"),
    ('{"prompt": "a", "completion": "b"}\n', ["--init", "0.5*a/x + * b/y"], "Error: "),
])
def test_train_checks_its_inputs_before_loading_the_model(data, extra, said, no_model, tmp_path, capsys):
    (tmp_path / "data.jsonl").write_text(data)
    code = main(["train", str(tmp_path / "data.jsonl"), "-o", str(tmp_path / "out"), *extra])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and said in err, err



@pytest.mark.parametrize("kind, said", [("lora", "--kind lora trains with LoRA companions; got a road companion"),
                                        ("prompt", "--with applies to RoAd and LoRA training")])
def test_train_refuses_a_companion_it_cannot_train_over_before_loading_the_model(kind, said, no_model, tmp_path,
                                                                                   capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    mate = folder(tmp_path, "mate", seed=0)
    code = main(["train", str(data), "-o", str(tmp_path / "out"), "--kind", kind, "--with", f"{mate}={data}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("hub train: error: ") and said in err, err
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------------- diff

def test_diff_summarises_by_default_and_lists_every_module_with_all(tmp_path, capsys):
    import json

    from tests.tiny import random_road, tiny_model

    model = tiny_model(num_hidden_layers=4)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")  # 16 modules
    for seed in (0, 1):
        _push(random_road(model, seed=seed, targets=targets), "alice/math", tmp_path)
    capsys.readouterr()
    assert main(["diff", "alice/math@v1", "alice/math@v2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "modules: 16, 16 of them differ" in out
    assert "largest differences (10 of 16 modules; --all for all 16, in layer order):" in out
    rows = [line.split() for line in out if line.startswith("  model.")]
    norms = [float(r[1].removeprefix("diff_norm=")) for r in rows]
    assert len(rows) == 10 and norms == sorted(norms, reverse=True)
    assert main(["diff", "alice/math@v1", "alice/math@v2", "--json"]) == 0
    every = json.loads(capsys.readouterr().out)["modules"]
    assert len(every) == 16 and f"{max(v['diff_norm'] for v in every.values()):.6g}" == rows[0][1][10:]
    assert main(["diff", "alice/math@v1", "alice/math@v2", "--all"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  model.")]
    assert len(rows) == 16 and rows == sorted(rows, key=cli.natural_key)
