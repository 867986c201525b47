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
import struct
import sys
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
from tests.tiny import peft_lora

SECRET = "aws_secret_access_key = DO-NOT-LEAK"


# ------------------------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A store with alice/math v1 and v2 (RoAd), alice/lora and alice/dora, served by `hub serve` for the whole
    module."""
    tmp = tmp_path_factory.mktemp("corpus")
    root = tmp / "store"
    hub.push(folder(tmp, "a", seed=0), "alice/math", root=root)
    hub.push(folder(tmp, "b", seed=1), "alice/math", root=root)
    hub.push(peft_lora(tmp / "lora", seed=0), "alice/lora", root=root)
    hub.push(peft_lora(tmp / "dora", seed=1, use_dora=True), "alice/dora", root=root)
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


def _card_folder(tmp, mp):
    src = folder(tmp, "src")
    (src / "README.md").unlink(missing_ok=True)
    (src / "README.md").mkdir()
    return ["push", str(src), "alice/math"]


def _newline_folder(tmp, mp):
    src = folder(tmp, "x\nError: forged")
    (src / "adapter_config.json").write_text("{")
    return ["push", str(src), "alice/math"]


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
