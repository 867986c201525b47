"""The ``hub`` command surface: help with examples everywhere, stdout/stderr split, exit codes, --json."""

from __future__ import annotations

import json

import pytest

from app.cli import COMMANDS, build_parser, main
from tests.helpers import folder, hub_cmd


def test_every_subcommand_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS) >= {"push", "pull", "list", "log", "show", "diff", "tag", "compose",
                                                 "serve", "app", "train"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_has_summary_and_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    if command in ("app", "train"):  # delegated: the app's / trainer's own parser answers
        assert out.startswith(f"usage: hub {command}")
    else:
        assert COMMANDS[command][0] in out
    examples = out.split("Examples:\n", 1)[1]
    assert f"hub {command}" in examples


def test_top_level_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Examples:" in out and all(c in out for c in COMMANDS)


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["push"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["nonsense"])
    assert e.value.code == 2
    assert main([]) == 2


@pytest.mark.parametrize("argv", [["log", "--bogus"], ["push", "only-one-arg"], ["tag", "a/b@v1"]])
def test_usage_errors_print_the_subcommands_own_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: hub {argv[0]} ") and f"hub {argv[0]}: error:" in err


def test_known_errors_one_line_exit_1(capsys):
    assert main(["log", "alice/nothing"]) == 1
    cap = capsys.readouterr()
    assert cap.out == ""
    assert cap.err.count("\n") == 1 and "hub list" in cap.err and "HUB_DEBUG=1" in cap.err
    assert main(["pull", "alice/../x"]) == 1
    assert "namespace/name" in capsys.readouterr().err


def test_commands_data_on_stdout(tmp_path, capsys):
    a, b = folder(tmp_path, "a", seed=0), folder(tmp_path, "b", seed=1)
    assert main(["push", str(a), "alice/math"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "alice/math@v1\n" and "Pushed alice/math v1" in cap.err
    assert main(["push", str(b), "alice/math", "--tag", "stable"]) == 0
    capsys.readouterr()
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["id"] == "alice/math" and rows[0]["versions"] == ["v1", "stable"]
    assert main(["log", "alice/math", "--json"]) == 0
    assert [e["tags"] for e in json.loads(capsys.readouterr().out)] == [["stable"], ["v1"]]
    assert main(["show", "alice/math@v1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "road" and shown["variant"] == "road_1" and shown["group_size"] == 8
    assert shown["target_modules"] == ["q_proj"] and shown["parameters"] == 64
    assert set(shown["norms"]) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert shown["source"].startswith("alice/math@") and len(shown["source"].split("@")[1]) == 40
    assert main(["show", "alice/math"]) == 0
    text = capsys.readouterr().out
    assert "variant: road_1" in text and "base_model: tiny-llama" in text and "recipe: none" in text
    assert main(["diff", "alice/math@v1", "alice/math@stable", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["diff_norm"] > 0 and -1 <= d["cosine"] <= 1 and len(d["modules"]) == 2
    assert main(["diff", "alice/math@v1", "alice/math@v1", "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["diff_norm"] == 0 and same["cosine"] == pytest.approx(1.0)
    assert main(["tag", "alice/math@v1", "first"]) == 0
    assert capsys.readouterr().out == "alice/math@first\n"
    assert main(["tag", "alice/math@stable", "first"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["compose", "0.5*alice/math@v1 + 0.5*alice/math@stable", "-o", "team/mix", "-m", "half"]) == 0
    assert capsys.readouterr().out == "team/mix@v1\n"
    assert main(["show", "team/mix"]) == 0
    assert "recipe: 0.5*alice/math@v1 + 0.5*alice/math@stable" in capsys.readouterr().out
    assert main(["pull", "alice/math@v1", "--to", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'out'}\n"


def test_compose_unknown_input_shows_the_whole_message_with_its_caret(capsys):
    assert main(["compose", "alice/nothing + alice/else", "-o", "team/mix"]) == 1
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert cap.out == "" and lines[0].startswith("Error: Cannot resolve 'alice/nothing'")
    assert lines[1:] == ["  alice/nothing + alice/else", "  ^", "(set HUB_DEBUG=1 for the traceback)"]


def test_syntax_error_caret_on_the_command_line(capsys):
    assert main(["compose", "0.5*a/x + * b/y", "-o", "team/mix"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[1] == "  0.5*a/x + * b/y"
    assert lines[2] == "  " + " " * len("0.5*a/x + ") + "^"


def test_python_m_app_cli_works():
    p = hub_cmd("--help")
    assert p.returncode == 0 and "Examples:" in p.stdout


LIGHT = """
import contextlib, io, sys
from app.cli import main
for argv in (["--help"], ["list"], ["log", "alice/math"], ["tag", "alice/math@v1", "stable"], ["log", "--bogus"],
             ["push"], ["log", "alice/nothing"], ["export", "alice/math", "--to", "x", "--rank", "4"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
heavy = sorted(m for m in ("torch", "transformers", "peft", "gradio", "safetensors.torch") if m in sys.modules)
print(",".join(heavy) or "light")
"""


def test_read_only_commands_and_usage_errors_import_no_heavy_library(tmp_path):
    import subprocess
    import sys

    from tests.helpers import env

    assert main(["push", str(folder(tmp_path, "a")), "alice/math"]) == 0  # something to log and tag
    p = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True, env=env(), timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "light"
