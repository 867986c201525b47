"""The Hugging Face Hub remote at its client boundary: an injected HfApi-like object records every call.

A ``live`` test runs the same push/pull against the real Hub when ``HF_TOKEN`` is set.
"""

from __future__ import annotations

import os
import uuid

import httpx2
import pytest

import hub
from hub.remote import HfRemote
from hub.store import Store
from tests.fake_hub import FakeHub, _http_error
from tests.helpers import files, folder


def test_push_is_one_commit_with_parent_and_one_tag(tmp_path, fake):
    a, b = folder(tmp_path, "a", seed=0), folder(tmp_path, "b", seed=1)
    initial = None
    r = hub.push(a, "alice/math", remote="hf", api=fake)
    assert fake.count("create_commit") == 1 and fake.count("create_tag") == 1
    commit = next(kw for c, kw in fake.calls if c == "create_commit")
    initial = fake.commits[r.sha]["parent"]
    assert commit["parent_commit"] == initial is not None
    assert commit["paths"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert fake.tags == {"v1": r.sha} and r.tag == "v1"
    assert fake.commits[r.sha]["tree"]["adapter_model.safetensors"] == files(a)["adapter_model.safetensors"]
    assert b"library_name: peft" in fake.commits[r.sha]["tree"]["README.md"]
    fake.calls.clear()
    r2 = hub.push(b, "alice/math", remote="hf", api=fake)
    assert [c for c, _ in fake.calls].count("create_commit") == 1
    assert next(kw for c, kw in fake.calls if c == "create_commit")["parent_commit"] == r.sha
    assert fake.tags == {"v1": r.sha, "v2": r2.sha}


def test_conflict_becomes_our_error_and_no_tag(tmp_path, fake):
    a = folder(tmp_path, "a")
    hub.push(a, "alice/math", remote="hf", api=fake)
    fake.calls.clear()
    fake.fail_commit = [("before", _http_error(412))]
    with pytest.raises(hub.PushConflictError) as e:
        hub.push(a, "alice/math", remote="hf", api=fake)
    assert "someone else pushed first" in str(e.value)
    assert fake.count("create_commit") == 1 and fake.count("create_tag") == 0
    assert list(fake.tags) == ["v1"]


def test_lost_response_after_commit_is_not_retried(tmp_path, fake):
    a = folder(tmp_path, "a")
    fake.fail_commit = [("after", httpx2.ReadTimeout("lost"))]
    r = hub.push(a, "alice/math", remote="hf", api=fake)
    assert fake.count("create_commit") == 1  # landed: found by its push id, never sent twice
    assert fake.tags == {"v1": r.sha} and r.sha == fake.head
    assert len([c for c in fake.commits.values() if c["message"] == "Push v1"]) == 1


def test_lost_request_before_commit_is_retried_once(tmp_path, fake):
    a = folder(tmp_path, "a")
    fake.fail_commit = [("before", httpx2.ConnectError("down"))]
    r = hub.push(a, "alice/math", remote="hf", api=fake)
    assert fake.count("create_commit") == 2
    assert len([c for c in fake.commits.values() if c["message"] == "Push v1"]) == 1
    assert fake.tags == {"v1": r.sha}


def test_lost_response_and_someone_else_pushed(tmp_path, fake):
    a = folder(tmp_path, "a")
    hub.push(a, "alice/math", remote="hf", api=fake)

    def raise_after_foreign_commit():
        fake._commit({"x": b"theirs"}, "their push", "", fake.head)
        return httpx2.ReadTimeout("lost")

    fake.fail_commit = [("before", raise_after_foreign_commit)]
    with pytest.raises(hub.PushConflictError):
        hub.push(a, "alice/math", remote="hf", api=fake)
    assert fake.count("create_tag") == 1  # only the first push's


def test_existing_remote_tag_needs_force(tmp_path, fake):
    a = folder(tmp_path, "a")
    hub.push(a, "alice/math", remote="hf", api=fake, tag="stable")
    fake.calls.clear()
    with pytest.raises(hub.TagExistsError):
        hub.push(a, "alice/math", remote="hf", api=fake, tag="stable")
    assert fake.count("create_commit") == 0
    r = hub.push(a, "alice/math", remote="hf", api=fake, tag="stable", force=True)
    assert fake.tags["stable"] == r.sha


@pytest.mark.parametrize("status,error", [(401, hub.RemoteAccessError), (403, hub.RemoteAccessError),
                                          (409, hub.PushConflictError)])
def test_http_errors_become_ours(tmp_path, fake, status, error):
    fake.fail_commit = [("before", _http_error(status))]
    with pytest.raises(error):
        hub.push(folder(tmp_path, "a"), "alice/math", remote="hf", api=fake)


@pytest.mark.parametrize("lfs", [False, True])
def test_pull_verifies_records_and_works_offline(tmp_path, fake, lfs):
    fake.lfs = lfs
    src = folder(tmp_path, "a")
    r = hub.push(src, "alice/math", remote="hf", api=fake)
    out = hub.pull("alice/math@v1", remote="hf", api=fake, to=tmp_path / "out")
    assert files(out)["adapter_model.safetensors"] == files(src)["adapter_model.safetensors"]
    assert files(out)["README.md"] == fake.commits[r.sha]["tree"]["README.md"]  # card byte for byte
    # recorded: the local store resolves the tag and the remote sha without the remote
    local = hub.resolve("alice/math@v1")
    assert hub.resolve(f"alice/math@{r.sha}").sha == local.sha
    assert files(hub.pull("alice/math@v1"))["adapter_model.safetensors"] == files(src)["adapter_model.safetensors"]


@pytest.mark.parametrize("lfs", [False, True])
def test_pull_refuses_checksum_mismatch_and_stores_nothing(tmp_path, fake, lfs):
    fake.lfs = lfs
    src = folder(tmp_path, "a")
    hub.push(src, "alice/math", remote="hf", api=fake)
    data = bytearray(files(src)["adapter_model.safetensors"])
    data[-1] ^= 1  # same size: huggingface_hub's own size check would pass
    fake.tamper["adapter_model.safetensors"] = bytes(data)
    with pytest.raises(hub.IntegrityError) as e:
        hub.pull("alice/math@v1", remote="hf", api=fake, to=tmp_path / "out")
    assert "adapter_model.safetensors" in str(e.value)
    assert not Store().exists("alice/math")
    assert not (tmp_path / "out").exists()


def test_pull_missing_repo_is_our_error(fake):
    with pytest.raises(hub.RepositoryNotFoundError) as e:
        hub.pull("alice/nothing", remote="hf", api=fake)
    assert "hf auth login" in str(e.value)


def test_network_down_is_our_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    class Down(FakeHub):
        def create_repo(self, *a, **k):
            raise httpx2.ConnectError("connection refused")

    with pytest.raises(hub.RemoteUnavailableError) as e:
        hub.push(folder(tmp_path, "a"), "alice/math", remote="hf", api=Down())
    assert "local store still works" in str(e.value)


@pytest.mark.live
@pytest.mark.skipif(not os.environ.get("HF_TOKEN"), reason="needs HF_TOKEN and network")
def test_live_push_and_pull(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    api = HfApi(token=os.environ["HF_TOKEN"])
    user = api.whoami()["name"]
    repo_id = f"{user}/adapter-hub-test-{uuid.uuid4().hex[:8]}"
    from tests.helpers import road
    a = road(0)
    # the Hub checks base_model in the card against existing repos
    a = type(a)(**{**a.__dict__,
                   "config": {**a.config, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}})
    try:
        r = HfRemote(api).push(folder(tmp_path, "a", a), repo_id, tag=None)
        out = HfRemote(api).pull(f"{repo_id}@{r.tag}", to=tmp_path / "out")
        assert files(out)["adapter_model.safetensors"] == files(tmp_path / "a")["adapter_model.safetensors"]
    finally:
        api.delete_repo(repo_id, missing_ok=True)
