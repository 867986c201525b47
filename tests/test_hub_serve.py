"""The served read path against a real server: olah over a test store, any HF client pulling from it."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest

import hub
from hub.serve import command
from hub.store import Store
from tests.helpers import free_port
from tests.test_hub_helpers import ROOT, env, files, folder, hub_cmd

pytest.importorskip("olah")


@pytest.fixture
def served(tmp_path):
    """A store with alice/math v1, v2 served by olah; yields (endpoint, server store, {tag: sha})."""
    root = tmp_path / "server"
    a, b = folder(tmp_path, "a", seed=0), folder(tmp_path, "b", seed=1)
    shas = {"v1": hub.push(a, "alice/math", root=root).sha, "v2": hub.push(b, "alice/math", root=root).sha}
    port = free_port()
    log = open(tmp_path / "olah.log", "wb")
    proc = subprocess.Popen(command(Store(root), "127.0.0.1", port), stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path, env=env())
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, (tmp_path / "olah.log").read_text()
            try:
                with urllib.request.urlopen(f"{endpoint}/api/models/alice/math/revision/v1", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "olah did not start"
            time.sleep(0.2)
        yield endpoint, Store(root), shas
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _client_env(tmp_path, endpoint: str, offline: str = "0") -> dict[str, str]:
    return dict(ADAPTER_HUB_HOME=str(tmp_path / "client"), HF_HOME=str(tmp_path / "client-hf"),
                HF_ENDPOINT=endpoint, HF_HUB_OFFLINE=offline, NO_PROXY="127.0.0.1,localhost",
                no_proxy="127.0.0.1,localhost", HF_HUB_DISABLE_PROGRESS_BARS="1")


PEFT_SCRIPT = """
import sys, torch
from peft import PeftModel
from tests.test_hub_helpers import tiny_base
import composer
model = PeftModel.from_pretrained(tiny_base(), "alice/math", revision="v1")
theta = model.base_model.model.model.layers[0].self_attn.q_proj.road_theta["default"].detach()
want = composer.load(sys.argv[1]).theta["model.layers.0.self_attn.q_proj"]
assert torch.equal(theta, want), "loaded weights differ from v1"
print("peft-ok")
"""


def test_served_store_pull_and_peft(tmp_path, served):
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

    # recorded in the client's store: works with the server gone and the Hub unreachable
    dead = _client_env(tmp_path, "http://127.0.0.1:9", offline="1")
    p = hub_cmd("pull", "alice/math@v1", **dead)
    assert p.returncode == 0, p.stderr
    assert files(p.stdout.strip())["adapter_model.safetensors"] == files(v1)["adapter_model.safetensors"]
    p = hub_cmd("pull", "--remote", "hf", "alice/math@v1", **dead)
    assert p.returncode == 0, p.stderr
    p = hub_cmd("show", f"alice/math@{shas['v1'][:10]}", **dead)  # the server's sha resolves locally too
    assert p.returncode == 0 and "variant: road_1" in p.stdout, p.stderr


def test_served_missing_things_are_clear_errors(tmp_path, served):
    endpoint, _, _ = served
    cenv = _client_env(tmp_path, endpoint)
    p = hub_cmd("pull", "--remote", "hf", "alice/nothing@v1", **cenv)
    assert p.returncode == 1 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr


LORA_SCRIPT = """
import sys, torch
from peft import PeftModel
from tests.test_hub_helpers import tiny_base
import composer
model = PeftModel.from_pretrained(tiny_base(), "bob/lora", revision="stable")
layer = model.base_model.model.model.layers[0].self_attn.q_proj
want = composer.load(sys.argv[1]).delta("model.layers.0.self_attn.q_proj")
assert torch.allclose(layer.get_delta_weight("default").double(), want, rtol=1e-6, atol=1e-7), "ΔW differs"
print("peft-lora-ok")
"""


def test_served_lora_tagged_version_loads_in_peft(tmp_path, served):
    """A LoRA pushed and tagged in the served store: log, tag, diff work, and PEFT loads it over HTTP."""
    from tests.tiny import peft_lora

    endpoint, server, _ = served
    root = str(server.root)
    hub.push(peft_lora(tmp_path / "l1", seed=1), "bob/lora", root=root)
    hub.push(peft_lora(tmp_path / "l2", seed=2, r=2, use_rslora=True), "bob/lora", root=root)
    senv = dict(ADAPTER_HUB_HOME=root, ADAPTER_HUB_NO_EXAMPLES="1")
    assert hub_cmd("tag", "bob/lora@v2", "stable", **senv).returncode == 0
    p = hub_cmd("log", "bob/lora", **senv)
    assert p.returncode == 0 and "v2" in p.stdout and "stable" in p.stdout, p.stderr
    p = hub_cmd("diff", "bob/lora@v1", "bob/lora@v2", **senv)
    assert p.returncode == 0 and "cosine=" in p.stdout, p.stderr
    v2 = server.snapshot(server.resolve("bob/lora@v2"))
    p = subprocess.run([sys.executable, "-c", LORA_SCRIPT, str(v2)], capture_output=True, text=True, cwd=ROOT,
                       env=env(**_client_env(tmp_path, endpoint)), timeout=300)
    assert p.returncode == 0 and "peft-lora-ok" in p.stdout, p.stderr[-3000:]
