"""The served read path against a real server: olah over a test store, any HF client pulling from it."""

from __future__ import annotations

import subprocess
import sys

import pytest

import hub
from app.cli import main
from hub.serve import command
from hub.store import Store
from tests.helpers import ROOT, env, files, folder, free_port, hub_cmd, running

pytest.importorskip("olah")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A store with alice/math v1, v2 served by olah for the module; yields (endpoint, server store,
    {tag: sha})."""
    tmp = tmp_path_factory.mktemp("served")
    root = tmp / "server"
    a, b = folder(tmp, "a", seed=0), folder(tmp, "b", seed=1)
    shas = {"v1": hub.push(a, "alice/math", root=root).sha, "v2": hub.push(b, "alice/math", root=root).sha}
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # A module fixture is set up before the per-test isolation (conftest): the server gets its own.
    server_env = env(ADAPTER_HUB_HOME=str(root), ADAPTER_HUB_NO_EXAMPLES="1", HF_HUB_OFFLINE="1",
                     HF_HOME=str(tmp / "hf-home"))
    with running(command(Store(root), "127.0.0.1", port), f"{endpoint}/api/models/alice/math/revision/v1",
                 log=tmp / "olah.log", timeout=120, cwd=tmp, env=server_env):
        yield endpoint, Store(root), shas


def _client_env(tmp_path, endpoint: str, offline: str = "0") -> dict[str, str]:
    return dict(ADAPTER_HUB_HOME=str(tmp_path / "client"), HF_HOME=str(tmp_path / "client-hf"),
                HF_ENDPOINT=endpoint, HF_HUB_OFFLINE=offline, NO_PROXY="127.0.0.1,localhost",
                no_proxy="127.0.0.1,localhost", HF_HUB_DISABLE_PROGRESS_BARS="1")


PEFT_SCRIPT = """
import sys, torch
from peft import PeftModel
from tests.tiny import tiny_model
import composer
model = PeftModel.from_pretrained(tiny_model(), "alice/math", revision="v1")
theta = model.base_model.model.model.layers[0].self_attn.q_proj.road_theta["default"].detach()
want = composer.load(sys.argv[1]).theta["model.layers.0.self_attn.q_proj"]
assert torch.equal(theta, want), "loaded weights differ from v1"
print("peft-ok")
"""


def test_served_store_pull_and_peft(tmp_path, served, monkeypatch, capsys):
    endpoint, server, shas = served
    v1 = server.snapshot(server.resolve("alice/math@v1"))
    cenv = _client_env(tmp_path, endpoint)

    p = hub_cmd("pull", "--remote", "hf", "alice/math@v1", "--to", str(tmp_path / "out"), **cenv)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(tmp_path / "out")
    assert files(tmp_path / "out") == files(v1)  # every file, the card included, bit for bit
    assert "alice/math" in (tmp_path / "out" / ".hub-pull").read_text()  # and the marker of what was pulled

    p = subprocess.run([sys.executable, "-c", PEFT_SCRIPT, str(v1)], capture_output=True, text=True, cwd=ROOT,
                       env=env(**cenv), timeout=300)
    assert p.returncode == 0 and "peft-ok" in p.stdout, p.stderr[-3000:]

    # recorded in the client's store: works with the server gone and the Hub unreachable (in this process:
    # offline, nothing reads the endpoint)
    for name, value in _client_env(tmp_path, "http://127.0.0.1:9", offline="1").items():
        monkeypatch.setenv(name, value)
    assert main(["pull", "alice/math@v1"]) == 0
    pulled = capsys.readouterr().out.strip()
    assert files(pulled)["adapter_model.safetensors"] == files(v1)["adapter_model.safetensors"]
    assert main(["pull", "--remote", "hf", "alice/math@v1"]) == 0
    assert main(["show", f"alice/math@{shas['v1'][:10]}"]) == 0  # the server's sha resolves locally too
    assert "variant: road_1" in capsys.readouterr().out


def test_served_missing_things_are_clear_errors(tmp_path, served):
    endpoint, _, _ = served
    cenv = _client_env(tmp_path, endpoint)
    p = hub_cmd("pull", "--remote", "hf", "alice/nothing@v1", **cenv)
    assert p.returncode == 1 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr


LORA_SCRIPT = """
import sys, torch
from peft import PeftModel
from tests.tiny import tiny_model
import composer
model = PeftModel.from_pretrained(tiny_model(), "bob/lora", revision="stable")
layer = model.base_model.model.model.layers[0].self_attn.q_proj
want = composer.load(sys.argv[1]).delta("model.layers.0.self_attn.q_proj")
assert torch.allclose(layer.get_delta_weight("default").double(), want, rtol=1e-6, atol=1e-7), "ΔW differs"
print("peft-lora-ok")
"""


def test_served_lora_tagged_version_loads_in_peft(tmp_path, served, monkeypatch, capsys):
    """A LoRA pushed and tagged in the served store: log, tag, diff work, and PEFT loads it over HTTP."""
    from tests.tiny import peft_lora

    endpoint, server, _ = served
    root = str(server.root)
    hub.push(peft_lora(tmp_path / "l1", seed=1), "bob/lora", root=root)
    hub.push(peft_lora(tmp_path / "l2", seed=2, r=2, use_rslora=True), "bob/lora", root=root)
    monkeypatch.setenv("ADAPTER_HUB_HOME", root)  # the server's store, in this process
    assert main(["tag", "bob/lora@v2", "stable"]) == 0
    assert main(["log", "bob/lora"]) == 0
    out = capsys.readouterr().out
    assert "v2" in out and "stable" in out
    assert main(["diff", "bob/lora@v1", "bob/lora@v2"]) == 0
    assert "cosine=" in capsys.readouterr().out
    v2 = server.snapshot(server.resolve("bob/lora@v2"))
    p = subprocess.run([sys.executable, "-c", LORA_SCRIPT, str(v2)], capture_output=True, text=True, cwd=ROOT,
                       env=env(**_client_env(tmp_path, endpoint)), timeout=300)
    assert p.returncode == 0 and "peft-lora-ok" in p.stdout, p.stderr[-3000:]
