"""A hostile-input corpus, generated: each case builds a hostile folder, id, expression or environment, runs
the ``hub`` command in-process against a store that ``hub serve`` is serving, and checks what a careful
user expects: the exit code (1, or 2 for usage), one ``Error:`` line that says what to do, no traceback,
the store unchanged (every repository's refs and objects), and the server still answering.

Add a case by adding a function to ``CASES``: it gets the scratch folder and returns the argv (and may set
variables through ``monkeypatch``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import composer
import hub
from app.cli import main
from tests.helpers import answers, env, files, folder, free_port, git, hub_cmd, running
from tests.prompt_learning import p_tuning, prefix_folder, started
from tests.tiny import peft_lora

SECRET = "aws_secret_access_key = DO-NOT-LEAK"


# ------------------------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A store with alice/math v1 and v2 (RoAd), alice/lora, alice/dora, alice/parts (a recipe of parts: the LoRA
    and the RoAd v1), alice/ptuning and alice/prefix (no recorded origin), served by `hub serve` for the whole
    module."""
    tmp = tmp_path_factory.mktemp("corpus")
    root = tmp / "store"
    hub.push(folder(tmp, "a", seed=0), "alice/math", root=root)
    hub.push(folder(tmp, "b", seed=1), "alice/math", root=root)
    hub.push(peft_lora(tmp / "lora", seed=0), "alice/lora", root=root)
    hub.push(peft_lora(tmp / "dora", seed=1, use_dora=True), "alice/dora", root=root)
    hub.compose("alice/lora ; alice/math@v1", "alice/parts", root=root)  # a recipe of parts
    # prompt-learning adapters as PEFT saves them: served, but with no recorded origin to compose from
    hub.push(p_tuning(tmp / "ptuning", seed=1)[0], "alice/ptuning", root=root)
    hub.push(prefix_folder(tmp / "prefix", 1), "alice/prefix", root=root)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # A module fixture is set up before the per-test isolation (conftest), so isolate the server here.
    server_env = env(ADAPTER_HUB_HOME=str(root), ADAPTER_HUB_NO_EXAMPLES="1", HF_HUB_OFFLINE="1",
                     HF_HOME=str(tmp / "hf-home"), XDG_CACHE_HOME=str(tmp / "cache"))
    url, ready = _probe(base)
    with running([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], url, ready=ready,
                 log=tmp / "serve.log", env=server_env, cwd=tmp):
        yield root, base


def _probe(base: str):
    return f"{base}/api/models/alice/math/revision/v1", lambda body: "sha" in json.loads(body)


def _answers(base: str) -> bool:
    return answers(*_probe(base))


def state(root: Path) -> dict:
    """Every repository's refs and objects, and the names at the root (staging leftovers show up here)."""
    out: dict = {"root": sorted(p.name for p in root.iterdir() if p.name not in ("snapshots", "serve", "locks"))}
    models = root / "models"
    for repo in sorted(models.glob("*/*")):
        if (repo / ".git").is_dir():
            out[str(repo.relative_to(models))] = (
                git(repo, "for-each-ref", "--format=%(refname) %(objectname)").stdout,
                git(repo, "cat-file", "--batch-all-objects", "--batch-check").stdout)
        else:
            out[str(repo.relative_to(models))] = "not a repository"
    return out


# ------------------------------------------------------------------------------------- the hostile cases

def _cfg(path: Path, **changes) -> Path:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def _secret(tmp: Path) -> Path:
    p = tmp / "elsewhere" / "credentials"
    p.parent.mkdir(exist_ok=True)
    p.write_text(SECRET)
    return p


def _linked(name: str):
    def case(tmp: Path, mp) -> list[str]:
        src = folder(tmp, "src")
        (src / name).unlink(missing_ok=True)
        (src / name).symlink_to(_secret(tmp))
        return ["push", str(src), "alice/math"]
    return case


def _folder_link(tmp, mp):
    link = tmp / "link"
    link.symlink_to(folder(tmp, "src"), target_is_directory=True)
    return ["push", str(link), "alice/math"]


def _subfolder_link(tmp, mp):
    src = folder(tmp, "src")
    (src / "checkpoint").symlink_to(_secret(tmp).parent, target_is_directory=True)
    return ["push", str(src), "alice/math"]


def _fifo_card(tmp, mp):
    src = folder(tmp, "src")
    (src / "README.md").unlink()
    os.mkfifo(src / "README.md")
    return ["push", str(src), "alice/math"]


def _config(**changes):
    def case(tmp, mp):
        return ["push", str(_cfg(folder(tmp, "src"), **changes)), "alice/math"]
    return case


def _raw_config(text: str):
    def case(tmp, mp):
        src = folder(tmp, "src")
        (src / "adapter_config.json").write_text(text)
        return ["push", str(src), "alice/math"]
    return case


def _recipe(data: object):
    def case(tmp, mp):
        src = folder(tmp, "src")
        (src / "recipe.json").write_text(json.dumps(data))
        return ["push", str(src), "alice/math"]
    return case


def _card(text: str | bytes):
    def case(tmp, mp):
        src = folder(tmp, "src")
        (src / "README.md").write_bytes(text.encode() if isinstance(text, str) else text)
        return ["push", str(src), "alice/math"]
    return case


def _weights(transform: Callable[[dict], dict] | None = None, raw: bytes | None = None):
    def case(tmp, mp):
        src = folder(tmp, "src")
        path = src / "adapter_model.safetensors"
        if raw is not None:
            path.write_bytes(raw)
        else:
            save_file(transform(composer.load(src).tensors()), path)
        return ["push", str(src), "alice/math"]
    return case


def _pickles_only(tmp, mp):
    src = folder(tmp, "src")
    (src / "adapter_model.safetensors").unlink()
    (src / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    return ["push", str(src), "alice/math"]


def _limit(var: str, value: str, argv: Callable):
    def case(tmp, mp):
        mp.setenv(var, value)
        return argv(tmp)
    return case


def _pull_to_foreign(tmp, mp):
    out = tmp / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    return ["pull", "alice/math@v1", "--to", str(out)]


def _pull_to_file(tmp, mp):
    (tmp / "file").write_text("x")
    return ["pull", "alice/math@v1", "--to", str(tmp / "file")]


def _lock_dir(tmp, mp):
    root = Path(os.environ["ADAPTER_HUB_HOME"])
    (root / "locks" / "alice" / "zzz.lock").mkdir(parents=True, exist_ok=True)
    return ["push", str(folder(tmp, "src")), "alice/zzz"]


def _compose(expr: str):
    return lambda tmp, mp: ["compose", "-o", "team/mix", "--", expr]


def _deep_json(depth: int) -> str:
    return json.dumps({"peft_type": "ROAD"})[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"


def _header(n: int) -> bytes:
    return struct.pack("<Q", n) + b"{"


def _f8(ts):
    return {k: v.to(torch.float8_e4m3fn) for k, v in ts.items()}


def _cplx(ts):
    return {k: v.to(torch.complex64) for k, v in ts.items()}


def _nan(ts):
    return {k: v.clone().fill_(float("nan")) for k, v in ts.items()}


def _lora(transform: Callable[[dict], dict] | None = None, **changes):
    """A LoRA folder PEFT wrote, its tensors transformed and its config changed, pushed as alice/lora2."""
    def case(tmp, mp):
        src = peft_lora(tmp / "lora")
        if transform is not None:
            from safetensors.torch import load_file
            path = src / "adapter_model.safetensors"
            save_file(transform(load_file(str(path))), path)
        return ["push", str(_cfg(src, **changes) if changes else src), "alice/lora2"]
    return case


def _edit(suffix: str, fn: Callable):
    """Apply ``fn`` to the tensors whose name ends with ``suffix``."""
    return lambda ts: {k: fn(v) if k.endswith(suffix) else v for k, v in ts.items()}


def _add_key(name: str, shape: tuple):
    return lambda ts: {**ts, f"base_model.model.model.layers.0.self_attn.q_proj.{name}": torch.zeros(shape)}


def _prompt_learning(kind: str, origin: Callable[[dict], dict] | None = None,
                     weights: Callable[[dict], dict] | None = None, **changes):
    """A prefix-tuning or p-tuning folder saved with its recorded origin, its origin file (``init``, ``vector``) and
    weights passed through ``origin`` and ``weights`` and its config changed, pushed as alice/prompt2."""
    def case(tmp, mp):
        from safetensors.torch import load_file

        src = (started(tmp / "src", 7, 1) if kind == "prefix" else p_tuning(tmp / "src", 1, origin=True))[0]
        for name, fn in (("prompt_vector.safetensors", origin), ("adapter_model.safetensors", weights)):
            if fn is not None:
                save_file({k: v.contiguous() for k, v in fn(load_file(str(src / name))).items()}, src / name)
        return ["push", str(_cfg(src, **changes) if changes else src), "alice/prompt2"]
    return case


def _card_folder(tmp, mp):
    src = folder(tmp, "src")
    (src / "README.md").unlink(missing_ok=True)
    (src / "README.md").mkdir()
    return ["push", str(src), "alice/math"]


def _newline_folder(tmp, mp):
    src = folder(tmp, "x\nError: forged")
    (src / "adapter_config.json").write_text("{")
    return ["push", str(src), "alice/math"]


def _parts(change: Callable[[Path, Path], None]):
    """A recipe of parts (a LoRA and a RoAd part) changed by ``change(folder, scratch)`` before it is pushed."""
    def case(tmp: Path, mp) -> list[str]:
        src = tmp / "parts"
        road, lora = composer.load(folder(tmp, "road")), composer.load(peft_lora(tmp / "lora", seed=0))
        composer.save(composer.Parts((lora, road)), src)
        change(src, tmp)
        return ["push", str(src), "alice/parts"]
    return case


def _part_folder_link(src: Path, tmp: Path) -> None:
    secret = _secret(tmp).parent
    shutil.copytree(src / "part-2-road", secret, dirs_exist_ok=True)  # a valid part beside the secret
    shutil.rmtree(src / "part-2-road")
    (src / "part-2-road").symlink_to(secret, target_is_directory=True)


def _part_file_link(src: Path, tmp: Path) -> None:
    (src / "part-1-lora" / "recipe.json").symlink_to(_secret(tmp))


def _manifest(**changes) -> Callable[[Path, Path], None]:
    def change(src: Path, tmp: Path) -> None:
        m = json.loads((src / "parts.json").read_text())
        m["parts"][1].update(changes)
        if changes.get("folder") == "../elsewhere":
            shutil.copytree(src / "part-2-road", tmp / "elsewhere")
        (src / "parts.json").write_text(json.dumps(m))
    return change


def foreign_store(tmp: Path, mp) -> Path:
    """A store of three versions of alice/math that another user owns: git refuses it ("dubious ownership").
    As root the store is really given to ``nobody``; otherwise git's own switch for that check makes it see
    another owner (``GIT_TEST_ASSUME_DIFFERENT_OWNER``, the hook git's test suite uses)."""
    root = tmp / "foreign"
    for seed in range(3):
        hub.push(folder(tmp, f"v{seed}", seed=seed), "alice/math", root=root)
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "nobody", str(root)], check=True)
    else:
        mp.setenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")
    mp.setenv("ADAPTER_HUB_HOME", str(root))
    return root


def _foreign(*argv: str):
    def case(tmp, mp):
        foreign_store(tmp, mp)
        return [a.replace("{tmp}", str(tmp)) for a in argv]
    return case


CASES: dict[str, tuple[Callable, int]] = {
    # a push never follows links, never blocks on a pipe
    "card link to a secret": (_linked("README.md"), 1),
    "recipe link to a secret": (_linked("recipe.json"), 1),
    "weights link": (_linked("adapter_model.safetensors"), 1),
    "config link": (_linked("adapter_config.json"), 1),
    "folder is a link": (_folder_link, 1),
    "subfolder is a link": (_subfolder_link, 1),
    "card is a FIFO": (_fifo_card, 1),
    # only what PEFT loads
    "target_modules match nothing": (_config(target_modules=["k_proj"]), 1),
    "target_modules list a module without tensors": (_config(target_modules=["q_proj", "v_proj"]), 1),
    "target_modules wrong type": (_config(target_modules={"q_proj": 1}), 1),
    "target_modules bad regex": (_config(target_modules="(("), 1),
    "group_size a string": (_config(group_size="8"), 1),
    "group_size overflows": (_config(group_size=10**30), 1),
    "group_size absurd": (_config(group_size=2**40), 1),
    "variant a list": (_config(variant=["road_1"]), 1),
    "peft_type unknown": (_config(peft_type="LORA_9000"), 1),
    "config nested 100 deep": (_raw_config(_deep_json(100)), 1),
    "config nested 100000 deep": (_raw_config(_deep_json(100_000)), 1),
    "config number of 5000 digits": (_raw_config('{"peft_type": "ROAD", "group_size": ' + "9" * 5000 + "}"), 1),
    "config 1e999": (_raw_config('{"peft_type": "ROAD", "group_size": 1e999}'), 1),
    "config not JSON": (_raw_config("{"), 1),
    "config a list": (_raw_config("[1, 2]"), 1),
    "config too big": (_raw_config('{"peft_type": "ROAD", "pad": "' + "x" * (2**20 + 10) + '"}'), 1),
    "recipe expression a dict": (_recipe({"expression": {"a": 1}}), 1),
    "recipe weights strings": (_recipe({"expression": "a", "weights": ["1"]}), 1),
    "recipe inputs with markup objects": (_recipe({"expression": "a", "inputs": [{"name": {"<img>": 1}}]}), 1),
    "recipe a list": (_recipe([1, 2, 3]), 1),
    "weights float8": (_weights(_f8), 1),
    "weights complex": (_weights(_cplx), 1),
    "weights NaN": (_weights(_nan), 1),
    "weights truncated": (_weights(raw=_header(10)), 1),
    "weights header claims 1 EiB": (_weights(raw=_header(2**60)), 1),
    "weights empty file": (_weights(raw=b""), 1),
    "pickles only": (_pickles_only, 1),
    "card python tag": (_card("---\nx: !!python/object/apply:os.system ['true']\n---\n"), 1),
    "card anchors": (_card("---\na: &x 1\nb: *x\n---\n"), 1),
    "card nested 100 deep": (_card("---\na: " + "[" * 100 + "]" * 100 + "\n---\n"), 1),
    "card nested 50000 deep": (_card("---\na: " + "[" * 50_000 + "]" * 50_000 + "\n---\n"), 1),
    "card not UTF-8": (_card(b"---\na: \xff\n---\n"), 1),
    "card bad YAML": (_card("---\na: [1\n---\n"), 1),
    "card too big": (_card("x" * (2**20 + 1)), 1),
    "adapter over the size limit": (_limit("ADAPTER_HUB_MAX_ADAPTER_BYTES", "100",
                                           lambda t: ["push", str(folder(t, "src")), "alice/math"]), 1),
    "limit variable not a number": (_limit("ADAPTER_HUB_LOCK_TIMEOUT", "soon",
                                           lambda t: ["push", str(folder(t, "src")), "alice/math"]), 1),
    # LoRA folders: ranks, shapes, values, keys
    "lora r disagrees with the tensors": (_lora(r=8), 1),
    "lora rank_pattern disagrees": (_lora(rank_pattern={"q_proj": 2}), 1),
    "lora A and B ranks differ": (_lora(_edit("lora_B.weight", lambda t: t[:, :2].contiguous())), 1),
    "lora A is 1-D": (_lora(_edit("lora_A.weight", lambda t: t.flatten())), 1),
    "lora A is 3-D": (_lora(_edit("lora_A.weight", lambda t: t[None])), 1),
    "lora NaN": (_lora(_edit("q_proj.lora_B.weight", lambda t: t.clone().fill_(float("nan")))), 1),
    "lora inf in A": (_lora(_edit("v_proj.lora_A.weight", lambda t: t.clone().fill_(float("inf")))), 1),
    "lora B missing": (_lora(lambda ts: {k: v for k, v in ts.items() if "q_proj.lora_B" not in k}), 1),
    "lora embedding key": (_lora(_add_key("lora_embedding_A", (4, 32))), 1),
    "lora unknown key": (_lora(_add_key("lora_C.weight", (4, 4))), 1),
    "lora DoRA magnitude without use_dora": (_lora(_add_key("lora_magnitude_vector", (32,))), 1),
    "lora use_dora without magnitudes": (_lora(use_dora=True), 1),
    "lora lora_alpha a string": (_lora(lora_alpha="8"), 1),
    "lora rank_pattern a list": (_lora(rank_pattern=[1]), 1),
    "lora r zero": (_lora(r=0), 1),
    "lora r absurd": (_lora(r=2**40), 1),
    "lora rank_pattern bad regex": (_lora(rank_pattern={"((": 4}), 1),
    "lora target_modules miss": (_lora(target_modules=["k_proj"]), 1),
    "lora plus road": (_compose("alice/lora + alice/math@v1"), 1),
    "lora plus dora": (_compose("alice/lora + alice/dora"), 1),
    "compress a road adapter": (_compose("compress(alice/math@v1, 2)"), 1),
    "compress to rank 0": (_compose("compress(alice/lora, 0)"), 1),
    # recipes of parts: never a link, never a folder outside, only what one row takes
    "parts: a part folder is a link": (_parts(_part_folder_link), 1),
    "parts: a part's file is a link to a secret": (_parts(_part_file_link), 1),
    "parts: the manifest names a folder outside": (_parts(_manifest(folder="../elsewhere")), 1),
    "parts: the manifest names an absolute path": (_parts(_manifest(folder="/etc")), 1),
    "parts: the manifest lists another kind": (_parts(_manifest(kind="lora")), 1),
    "parts: the manifest is not JSON": (_parts(lambda src, tmp: (src / "parts.json").write_text("[")), 1),
    "parts: a DoRA part": (_compose("alice/lora ; alice/dora"), 1),
    "parts: arithmetic on a recipe of parts": (_compose("0.5*alice/parts + alice/lora"), 1),
    "parts: ';' inside parentheses": (_compose("(alice/lora ; alice/math@v1)"), 1),
    # prefix tuning and p-tuning: their recorded origins, and arithmetic without one
    "prefix origin NaN": (_prompt_learning("prefix", _edit("init", lambda t: t.clone().fill_(float("nan")))), 1),
    "prefix origin of another shape": (_prompt_learning("prefix", lambda ts: {k: v[:2] for k, v in ts.items()}), 1),
    "prefix origin without its vector": (_prompt_learning("prefix", lambda ts: {"init": ts["init"]}), 1),
    "prefix zero start with another origin": (_prompt_learning("prefix", init_weights="zero"), 1),
    "prefix keys and values of another width": (_prompt_learning("prefix", weights=_edit(
        "prompt_embeddings", lambda t: t[:, :-1].contiguous())), 1),
    "p-tuning origin of another adapter": (_prompt_learning("ptuning", _edit("init", lambda t: t + 1)), 1),
    "p-tuning prompt NaN": (_prompt_learning("ptuning", weights=_nan), 1),
    "p-tuning origin float8": (_prompt_learning("ptuning", _f8), 1),
    "p-tuning without its origin composed": (_compose("alice/ptuning + alice/ptuning"), 1),
    "prefix without its origin composed": (_compose("0.5*alice/prefix"), 1),
    # ids, tags, revisions
    "id traversal": (lambda t, mp: ["push", str(folder(t, "src")), "alice/../../etc"], 1),
    "id absolute": (lambda t, mp: ["pull", "/etc/passwd"], 1),
    "id three parts": (lambda t, mp: ["log", "a/b/c"], 1),
    "id control character": (lambda t, mp: ["log", "alice/ma\x1b[2Kth"], 1),
    "id newline": (lambda t, mp: ["show", "alice/math\nError: forged"], 1),
    "revision traversal": (lambda t, mp: ["pull", "alice/math@../../HEAD"], 1),
    "revision missing": (lambda t, mp: ["pull", "alice/math@v99"], 1),
    "tag main": (lambda t, mp: ["tag", "alice/math@v1", "main"], 1),
    "tag HEAD": (lambda t, mp: ["tag", "alice/math@v1", "HEAD"], 1),
    "tag a sha": (lambda t, mp: ["tag", "alice/math@v1", "a" * 40], 1),
    "tag traversal": (lambda t, mp: ["tag", "alice/math@v1", "../x"], 1),
    # ids differing only in case are one repository (the Hub ignores case): a second spelling is not created
    "id differs only in case": (lambda t, mp: ["push", str(folder(t, "src", seed=5)), "Alice/MATH"], 1),
    "namespace differs only in case": (lambda t, mp: ["push", str(folder(t, "src", seed=5)), "ALICE/math"], 1),
    "push tag main": (lambda t, mp: ["push", str(folder(t, "src", seed=5)), "alice/math", "--tag", "main"], 1),
    # pulls
    "pull into a foreign folder": (_pull_to_foreign, 1),
    "pull onto a file": (_pull_to_file, 1),
    # locks
    "lock path is a folder": (_lock_dir, 1),
    # expressions
    "expression of 10000 terms": (_compose(" + ".join(["alice/math"] * 10_000)), 1),
    "expression 20000 characters": (_compose("alice/math" + " " * 20_000), 1),
    "expression nested 5000 deep": (_compose("(" * 5000 + "alice/math" + ")" * 5000), 1),
    "expression signs 5000 deep": (_compose("-" * 5000 + "alice/math"), 1),
    "weight overflows": (_compose("1e999*alice/math"), 1),
    "weights overflow the result": (_compose("1e300*alice/math@v1 + 1e300*alice/math@v2"), 1),
    "merge density 0": (_compose("merge(ties, alice/math@v1, alice/math@v2, density=0)"), 1),
    "merge seed 1e30": (_compose("merge(dare_linear, alice/math@v1, alice/math@v2, density=0.5, seed=1e30)"), 1),
    "merge unknown method": (_compose("merge(nope, alice/math@v1, alice/math@v2)"), 1),
    "expression unknown name": (_compose("alice/nothing + alice/math"), 1),
    "expression garbage": (_compose("+*)("), 1),
    # third round (issue 22): tracebacks and forged lines
    "card tags a number": (_card("---\ntags: 5\n---\nhi\n"), 1),
    "card is a folder": (_card_folder, 1),
    "folder name with a newline": (lambda t, mp: ["push", str(t / "x\nError: forged"), "alice/math"], 1),
    "existing folder name with a newline": (_newline_folder, 1),
    "expression name with a newline": (_compose("alice/math + `x\nError: forged`"), 1),
    "expression id with a newline": (_compose("`alice/no\nError: forged`"), 1),
    # a store git refuses (another user's): an error that says what to do, never an empty success
    "foreign store: log": (_foreign("log", "alice/math"), 1),
    "foreign store: list": (_foreign("list"), 1),
    "foreign store: show": (_foreign("show", "alice/math"), 1),
    "foreign store: pull": (_foreign("pull", "alice/math@v1", "--to", "{tmp}/out"), 1),
    "foreign store: tag": (_foreign("tag", "alice/math@v1", "stable"), 1),
    # usage
    "unknown flag": (lambda t, mp: ["push", "--frobnicate"], 2),
}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input(name, served, tmp_path, monkeypatch, capsys):
    root, base = served
    monkeypatch.setenv("ADAPTER_HUB_HOME", str(root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    build, want = CASES[name]
    argv = build(tmp_path, monkeypatch)
    before = state(root)
    code, out, err = _run(argv, capsys)
    assert code == want, (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    assert "\x1b" not in err and "\x1b" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    if want == 2:
        assert lines and lines[-1].startswith("usage:") or "error:" in lines[-1]
    else:
        assert lines and lines[0].startswith("Error: ")
        assert sum(line.startswith("Error: ") for line in lines) == 1
        # one line; an expression error adds the expression and a caret under the position
        assert len(lines) == 1 or (argv[0] == "compose" and len(lines) <= 4), err
    assert out == ""
    assert "forged" not in err or "\\nError: forged" in err  # a smuggled newline is shown escaped
    assert ": 4 " not in err  # no file descriptor for a name ("Is a directory: 4")
    assert SECRET not in err
    assert state(root) == before
    assert _answers(base), "the server stopped answering"


def test_hostile_names_are_escaped_when_left_out(served, tmp_path, monkeypatch, capsys):
    """A folder holding a file whose name forges a line and clears the terminal: pushed, name escaped."""
    root, _ = served
    monkeypatch.setenv("ADAPTER_HUB_HOME", str(tmp_path / "own-store"))
    src = folder(tmp_path, "src")
    (src / "notes\n\x1b[2KError: forged").write_text("x")
    code, out, err = _run(["push", str(src), "bob/notes"], capsys)
    assert code == 0, err
    assert "\x1b" not in err and "\\x1b[2K" in err and "\\n" in err
    assert not any(line.startswith("Error: forged") for line in err.splitlines())


def _tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``root`` (mode, owner, bytes): what a refused command must leave as it was."""
    return {str(p.relative_to(root)): (p.lstat().st_mode, p.lstat().st_uid, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("argv", [["log", "alice/math"], ["list"], ["show", "alice/math"], ["diff", "alice/math@v1",
                                  "alice/math@v3"], ["pull", "alice/math@v2"], ["tag", "alice/math@v1", "stable"],
                                  ["push", "{src}", "alice/math"], ["compose", "-o", "bob/mix", "alice/math"]])
def test_a_store_owned_by_another_user_is_an_error_not_an_empty_answer(tmp_path, monkeypatch, capsys, argv):
    """`hub log` on a store owned by another user printed nothing and exited 0, hiding 7 versions: git refused
    the repository ("dubious ownership") and its failing `rev-parse` was read as "no commits". Every command
    now says so on one line, with the ways out, and leaves the store as it was."""
    root = foreign_store(tmp_path, monkeypatch)
    src = folder(tmp_path, "new", seed=9)
    before = _tree(root)
    code, out, err = _run([a.replace("{src}", str(src)) for a in argv], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and out == "", (code, out, err)
    assert lines[0].startswith("Error: ") and "Traceback" not in err, err
    # one line; an expression error adds the expression and a caret under the name
    assert len(lines) == 1 or (argv[0] == "compose" and len(lines) <= 4), err
    assert sum(line.startswith("Error: ") for line in lines) == 1
    assert "dubious ownership" in err and "safe.directory" in err and str(root / "models/alice/math") in err
    if os.geteuid() == 0:
        assert "owned by nobody" in err
    assert _tree(root) == before
    # and once trusted (the way the message names), the same store answers in full
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    git(tmp_path, "config", "--global", "--add", "safe.directory", str(root / "models/alice/math"))
    monkeypatch.delenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", raising=False)
    assert [e["tags"] for e in hub.log("alice/math", root=root)] == [["v3"], ["v2"], ["v1"]]


def test_hub_serve_refuses_a_store_it_cannot_read(tmp_path, monkeypatch, capsys):
    """olah reads the repositories with git too: a store git refuses would be served as "repository not found".
    `hub serve` refuses to start instead, with the reason."""
    root = foreign_store(tmp_path, monkeypatch)
    before = _tree(root)
    code, out, err = _run(["serve", "--port", str(free_port())], capsys)
    assert code == 1 and out == "" and err.startswith("Error: ") and "safe.directory" in err, err
    assert len(err.strip().splitlines()) == 1
    assert _tree(root) == before


@pytest.mark.parametrize("path, method", [
    ("/api/models/../../../../etc/passwd", "GET"),
    ("/api/models/alice/math/resolve/v1/..%2f..%2f..%2fetc%2fpasswd", "GET"),
    ("/api/models/alice%2f..%2f..%2fmath/revision/v1", "GET"),
    ("/" + "a" * 10_000, "GET"),
    ("/api/models/alice/math/revision/%00", "GET"),
    ("/api/models/alice/math", "DELETE"),
    ("/api/repos/create", "POST"),
])
def test_hostile_requests_leave_the_server_serving(served, path, method):
    root, base = served
    req = urllib.request.Request(base + path, method=method, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        body = e.read()
        assert e.code != 200
    except OSError:
        body = b""
    assert b"root:" not in body
    assert _answers(base)


def test_pull_remote_hf_from_hub_serve_through_its_gateway(served, tmp_path):
    """`hub serve` (gateway in front of olah) as the endpoint of `hub pull --remote hf`: the gateway answered
    405 to the POST paths-info that the checksums need. Now it passes that one read-only POST."""
    root, base = served
    before = state(root)
    cenv = dict(ADAPTER_HUB_HOME=str(tmp_path / "client"), HF_HOME=str(tmp_path / "client-hf"), HF_ENDPOINT=base,
                HF_HUB_OFFLINE="0", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
                HF_HUB_DISABLE_PROGRESS_BARS="1")
    p = hub_cmd("pull", "--remote", "hf", "alice/math@v1", "--to", str(tmp_path / "out"), **cenv)
    assert p.returncode == 0, p.stderr
    want = hub.Store(root).snapshot(hub.Store(root).resolve("alice/math@v1"))
    assert files(tmp_path / "out") == files(want)
    assert state(root) == before
    # a POST elsewhere is still refused
    req = urllib.request.Request(f"{base}/api/models/alice/math/commit/main", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405


def test_ids_differing_only_in_case_name_one_repository(served, tmp_path, monkeypatch, capsys):
    """`Alice/X` and `alice/x` were two repositories (and olah served both) where the Hub has one: a push of a second
    spelling is refused naming the stored one (a corpus case above), and every lookup, local or through `hub serve`,
    finds the stored spelling."""
    from huggingface_hub import HfApi, constants, hf_hub_download

    root, base = served
    monkeypatch.setenv("ADAPTER_HUB_HOME", str(root))
    store = hub.Store(root)
    want = store.resolve("alice/math@v1")
    for spelling in ("Alice/Math", "ALICE/MATH", "alice/MATH"):
        got = store.resolve(f"{spelling}@v1")
        assert got.pinned == want.pinned  # pinned under the stored spelling
        assert [e["sha"] for e in store.log(spelling)] == [e["sha"] for e in store.log("alice/math")]
        assert store.exists(spelling)
    code, out, err = _run(["pull", "Alice/Math@v1", "--to", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert files(tmp_path / "out") == files(store.snapshot(want))
    code, out, err = _run(["push", str(folder(tmp_path, "src", seed=5)), "Alice/Math"], capsys)
    assert code == 1 and "'alice/math'" in err and "case" in err, err

    # through the server, as on the Hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    api = HfApi(endpoint=base, token=False)
    assert api.model_info("ALICE/Math", revision="v1").sha == want.sha
    kw = dict(endpoint=base, cache_dir=str(tmp_path / "hf"), token=False, revision="v1")
    assert Path(hf_hub_download("Alice/MATH", "README.md", **kw)).read_bytes() == store.read(want, "README.md")

    # `--remote hf` pulls of two spellings record one repository
    before = state(root)
    cenv = dict(ADAPTER_HUB_HOME=str(tmp_path / "client"), HF_HOME=str(tmp_path / "client-hf"), HF_ENDPOINT=base,
                HF_HUB_OFFLINE="0", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
                HF_HUB_DISABLE_PROGRESS_BARS="1")
    for spelling in ("Alice/Math@v1", "alice/math@v2"):
        p = hub_cmd("pull", "--remote", "hf", spelling, **cenv)
        assert p.returncode == 0, p.stderr
    client = hub.Store(tmp_path / "client")
    assert [r["id"] for r in client.list()] == ["alice/math"]  # the server's spelling
    assert len(client.log("alice/math")) == 2
    assert state(root) == before


def test_a_store_holding_two_spellings_finds_each_and_refuses_a_third(tmp_path):
    """A store made before the rule may hold `bob/x` and `Bob/X`: each exact spelling is its own repository still,
    and a third spelling, which could mean either, is one error naming both."""
    import shutil

    root = tmp_path / "store"
    hub.push(folder(tmp_path, "a", seed=0), "bob/x", root=root)
    hub.push(folder(tmp_path, "b", seed=1), "zed/y", root=root)
    (root / "models" / "Bob").mkdir()
    shutil.copytree(root / "models" / "zed" / "y", root / "models" / "Bob" / "X")
    store = hub.Store(root)
    assert store.resolve("bob/x").sha != store.resolve("Bob/X").sha
    assert store.resolve("Bob/X").sha == store.resolve("zed/y").sha
    with pytest.raises(hub.InvalidIdError, match="'Bob/X', 'bob/x'|'bob/x', 'Bob/X'"):
        store.resolve("BOB/x")


def test_hub_serve_answers_clients_as_the_hub_would(served, tmp_path, monkeypatch):
    """Unknown paths answered 200 with an empty body (clients failed parsing it), a missing revision 401
    RepoNotFound ("make sure you are authenticated"), a missing file 500, and commit listings lacked the
    authors' "user" field (KeyError in huggingface_hub). Each is now what the Hub answers."""
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub import errors as hf

    root, base = served
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for path in ("/v1/models", "/api/models", "/nonexistent/path"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + path, timeout=10)
        assert e.value.code == 404 and json.loads(e.value.read())["error"]
    api = HfApi(endpoint=base, token=False)
    with pytest.raises(hf.HfHubHTTPError) as e:
        list(api.list_models(limit=3))
    assert e.value.response.status_code == 404
    with pytest.raises(hf.RevisionNotFoundError):
        api.model_info("alice/math", revision="v9")
    kw = dict(endpoint=base, cache_dir=str(tmp_path / "hf"), token=False)
    with pytest.raises(hf.RevisionNotFoundError):
        hf_hub_download("alice/math", "README.md", revision="v9", **kw)
    with pytest.raises(hf.EntryNotFoundError):
        hf_hub_download("alice/math", "nothing.txt", revision="v1", **kw)
    with pytest.raises(hf.RepositoryNotFoundError):
        api.model_info("alice/nothing")
    assert [c.authors for c in api.list_repo_commits("alice/math")] == [["adapter-hub"]] * 2
    assert Path(hf_hub_download("alice/math", "README.md", revision="v1", **kw)).read_bytes()


@pytest.mark.parametrize("recipe, card", [
    ({"expression": "a\nError: forged", "method": "fit",
      "params": {"losses": {"first": "a", "final": "b"}}}, None),
    ({"expression": "a", "method": "fit", "params": {"losses": [1, 2], "coefficients": {"a": 5}}}, None),
    ({"expression": "a", "method": "fit", "params": {"coefficients": [1], "steps": {"x": 1}, "lr": "fast"}}, None),
    (None, "---\ntraining:\n  first_loss: abc\n  final_loss: [1]\n  steps: \"x\\nError: forged\"\n---\nhi\n"),
])
def test_show_of_odd_records_is_text_not_a_traceback(tmp_path, monkeypatch, capsys, recipe, card):
    """`hub show` of a fit recipe whose params have odd types, or a training record with non-numeric losses,
    raised (TypeError, AttributeError, ValueError); stored text with a newline forged a line."""
    monkeypatch.setenv("ADAPTER_HUB_HOME", str(tmp_path / "store"))
    src = folder(tmp_path, "src")
    if recipe is not None:
        (src / "recipe.json").write_text(json.dumps(recipe))
    if card is not None:
        (src / "README.md").write_text(card)
    code, _, err = _run(["push", str(src), "bob/odd"], capsys)
    assert code == 0, err
    code, out, err = _run(["show", "bob/odd"], capsys)
    assert code == 0, err
    assert not any(line.startswith("Error: forged") for line in out.splitlines())


@pytest.mark.parametrize("line", ["[" * 100_000 + "]" * 100_000, '{"messages": ' + "[" * 60 + "]" * 60 + "}"])
def test_deeply_nested_examples_are_one_error(tmp_path, line):
    """A deeply nested JSONL line raised RecursionError in `hub train`, `hub fit` and the app's Fit panel
    (which all read examples through composer.data.parse_jsonl)."""
    from composer.data import parse_jsonl

    with pytest.raises(composer.ComposerError) as e:
        parse_jsonl('{"prompt": "a", "completion": "b"}\n' + line, name="data.jsonl")
    assert "data.jsonl:2" in str(e.value)


def test_a_lora_with_enormous_factors_is_refused_not_an_empty_reply(tmp_path):
    """A LoRA whose B (or scaling) is enormous but finite is stored (every value is finite) and gave an empty or
    garbled reply with no message. The engine refuses it when it builds the mix, naming the layer and the ratio
    ‖s·B·A‖/‖W‖, just above the bound; just below it the mix still runs."""
    from dataclasses import replace

    from app.engine import Engine
    from app.engine.bounds import MAX_SCALE, lora_ratio
    from app.errors import MixError
    from tests.tiny import tiny_chat_model

    model, tok = tiny_chat_model()
    a = composer.load(peft_lora(tmp_path / "lora", seed=3, scale=0.05, model=tiny_chat_model()[0]))
    linears = dict(model.named_modules())
    worst = max(lora_ratio(a.lora_a[m], a.lora_b[m], a.scaling[m], linears[m].weight) for m in a.lora_a)
    assert 0 < worst < 10
    engine = Engine(model, tok)
    msg = [{"role": "user", "content": "hi"}]
    for k in (2 * MAX_SCALE / worst, 1e30):
        big = replace(a, lora_b={m: v * k for m, v in a.lora_b.items()})
        with pytest.raises(MixError, match="times its own weight") as e:
            engine.generate([{"messages": msg, "mix": big}], max_new_tokens=4)
        assert e.value.module in a.lora_a
    with pytest.raises(MixError, match="times its own weight"):  # the scaling, not the factors
        engine.generate([{"messages": msg, "mix": replace(a, scaling={m: 1e12 for m in a.scaling})}],
                        max_new_tokens=4)
    # the same refusal for a LoRA read from the store
    src = peft_lora(tmp_path / "huge", seed=3, model=tiny_chat_model()[0])
    from safetensors.torch import load_file
    path = src / "adapter_model.safetensors"
    save_file({k: v * 1e15 if "lora_B" in k else v for k, v in load_file(str(path)).items()}, path)
    hub.push(src, "alice/huge")
    with pytest.raises(MixError, match="times its own weight"):
        engine.generate([{"messages": msg, "mix": hub.load("alice/huge")}], max_new_tokens=4)
    half = replace(a, lora_b={m: v * (MAX_SCALE / worst / 2) for m, v in a.lora_b.items()})
    assert len(engine.generate([{"messages": msg, "mix": half}], max_new_tokens=4)) == 1  # served, not refused
    assert engine.generate([{"messages": msg, "mix": a}], max_new_tokens=4) != [""]


def test_shipped_loras_are_far_inside_the_bound(smol_home):
    """The bound leaves trained LoRAs a wide margin: the shipped ones change a SmolLM2 layer by at most a few
    hundredths of its weight (measured 0.059 and 0.048), at least a thousand times inside MAX_SCALE."""
    from app.engine import load_base
    from app.engine.bounds import MAX_SCALE, lora_ratio
    from tests.helpers import ROOT

    os.environ["ADAPTER_HUB_HOME"] = str(smol_home)  # the per-test store root; conftest restores it
    model, _ = load_base()
    linears = dict(model.named_modules())
    for name in ("lora_signoff", "lora_json"):
        a = composer.load(ROOT / "adapters" / name)
        worst = max(lora_ratio(a.lora_a[m], a.lora_b[m], a.scaling[m], linears[m].weight) for m in a.lora_a)
        assert 0 < worst * 1000 < MAX_SCALE, (name, worst)


def test_a_short_reply_is_not_held_behind_a_message_at_the_context_length(tmp_path):
    """One message of 195,000 characters (cut to the model's context) held every other session's short reply until
    its whole prompt was prefilled, in one forward pass of the worker that serves everyone (over a minute on one CPU
    thread, and gigabytes of attention scores). Now a long prompt is prefilled a chunk per decode step: here the big
    message arrives first and the worker is taking it when a short one comes in from another session, and the short
    reply is complete, and has left the batch, before the big message's first token (the batch records each join's
    size: the short one joined alone, and the big one joined after it had left)."""
    from gradio_client import Client

    from app.batcher import fit_messages
    from app.engine import Engine
    from app.ui import MAX_SLOTS
    from app.ui.page import reply_text
    from tests.helpers import Served
    from tests.tiny import CHAT_CONTEXT as CONTEXT

    s = Served(tmp_path / "store", prefill_chunk=24)
    try:
        def args(message, n):
            return (message, [], [], "task_arithmetic", 0.5, 0.5, n, 0.0, *([1.0] * MAX_SLOTS))

        big_client, small_client = Client(s.url, verbose=False), Client(s.url, verbose=False)
        with s.batcher.engine.exclusive():
            big = big_client.submit(*args("x" * 195_000, 4), api_name="/chat")
            while s.batcher.admitted < 1:  # the worker took the big one and waits for the engine
                time.sleep(0.01)
            small = small_client.submit(*args("hi", 4), api_name="/chat")
            while s.batcher.waiting < 1:  # the short one waits behind it
                time.sleep(0.01)
        small_out, big_out = small.result(timeout=300), big.result(timeout=300)
        assert s.batcher.batches == [1, 1]  # the big one joined when the short one had left: it was not held
        assert s.batcher.running.stats["prefill_passes"] >= (CONTEXT - 4) // 24  # prefilled in chunks
        assert reply_text(small_out[0][-1]["content"]) == s.alone("", "hi", max_new_tokens=4)
        assert "kept the first" in big_out[2]  # the note: the message was cut to the context
        cut, _ = fit_messages(s.tok, [{"role": "user", "content": "x" * 195_000}], CONTEXT - 4)
        solo = Engine(s.model, s.tok).generate([{"messages": cut, "mix": None}], max_new_tokens=4)[0]
        # prefilled in chunks, answered as in one pass
        assert reply_text(big_out[0][-1]["content"]).strip() == solo.strip()
    finally:
        s.close()


# ------------------------------------------------------------- promises of README's Security section, checked

def test_every_limit_is_the_readme_table_and_each_error_names_its_variable(monkeypatch):
    """The Limits table lists every limit with its default, and every limit's error names the variable that
    raises it; setting the variable raises the bound."""
    import re

    from composer import limits
    from tests.helpers import ROOT

    section = (ROOT / "README.md").read_text().split("## Security", 1)[1].split("\n## ", 1)[0]
    table = dict(re.findall(r"^\| `(ADAPTER_HUB_\w+)` \| (\d+)", section, re.M))
    assert table == {lim.env: str(int(lim.default)) for lim in limits.LIMITS.values()}
    for name, lim in limits.LIMITS.items():
        monkeypatch.delenv(lim.env, raising=False)
        with pytest.raises(composer.LimitExceededError, match=lim.env):
            limits.check(name, lim.default * 2)
        monkeypatch.setenv(lim.env, str(int(lim.default * 4)))
        limits.check(name, lim.default * 2)


def test_a_name_that_is_a_folder_and_a_store_id_is_refused_in_init(tmp_path, monkeypatch):
    """`hub train --init alice/math` with a folder alice/math here and alice/math in the store (in any case) picks
    neither: one error saying how to name each; './alice/math' is the folder."""
    from app.train import default_resolve

    hub.push(folder(tmp_path, "stored", seed=1), "alice/math")
    monkeypatch.chdir(tmp_path)
    folder(tmp_path, "alice/math", seed=2)
    folder(tmp_path, "Alice/Math", seed=3)
    for name in ("alice/math", "Alice/Math"):
        with pytest.raises(LookupError, match=f"'{name}' is both a folder here and an adapter in the store"):
            default_resolve(name)
    assert default_resolve("./alice/math").source.startswith(str(tmp_path / "alice" / "math"))
    assert default_resolve("alice/math@v1").source == hub.resolve("alice/math@v1").pinned


def test_heat_map_and_overlap_labels_are_text():
    from app.ui.mixer import heatmap_html, overlap_html

    names = ["<img src=x onerror=alert(1)>", "a/b'><script>alert(1)</script>"]
    pair = {"shared": 3, "overlap": 0.5}
    for out in (heatmap_html(names, [[1.0, 0.5], [0.5, 1.0]]), overlap_html(names, [[0.25, pair], [pair, 0.5]])):
        assert "<img" not in out and "<script" not in out and "&lt;img" in out


def test_app_errors_and_toasts_are_html_escaped(tmp_path):
    """An adapter name with markup sent to the chat through the API comes back in the error as text."""
    from gradio_client import Client

    from app.ui import MAX_SLOTS
    from tests.helpers import Served

    s = Served(tmp_path / "store")
    try:
        client = Client(s.url, verbose=False)
        with pytest.raises(Exception) as e:
            client.predict("hi", [], ["<img src=x onerror=alert(1)>"], "task_arithmetic", 0.5, 0.5, 4, 0.0,
                           *([1.0] * MAX_SLOTS), api_name="/chat")
        assert "&lt;img" in str(e.value) and "<img" not in str(e.value)
    finally:
        s.close()
