"""Lock waits say whom they wait for and give up; leftovers of dead writers are recovered, live ones never."""

from __future__ import annotations

import logging
import os
import time

import pytest

import composer
import hub
from hub.locks import _host, clear_dead_staging
from hub.store import Store
from tests.helpers import folder, git


def test_push_behind_a_stalled_writer_says_so_and_gives_up(tmp_path, monkeypatch, caplog):
    src = folder(tmp_path, "a")
    hub.push(src, "alice/math")
    store = Store()
    monkeypatch.setenv("ADAPTER_HUB_LOCK_TIMEOUT", "1.5")
    caplog.set_level(logging.WARNING, logger="hub")
    before = git(store.models / "alice" / "math", "for-each-ref").stdout
    with store.lock(hub.parse_id("alice/math")):
        t0 = time.monotonic()
        with pytest.raises(hub.LockTimeoutError) as e:
            hub.push(folder(tmp_path, "b", seed=1), "alice/math")
        waited = time.monotonic() - t0
    assert 1.4 < waited < 10
    msg = str(e.value)
    assert "\n" not in msg and f"process {os.getpid()}" in msg and "ADAPTER_HUB_LOCK_TIMEOUT" in msg
    assert any("Waiting for" in r.getMessage() and "alice/math" in r.getMessage() for r in caplog.records)
    assert git(store.models / "alice" / "math", "for-each-ref").stdout == before


def test_bad_timeout_value_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTER_HUB_LOCK_TIMEOUT", "soon")
    with pytest.raises(composer.LimitExceededError, match="ADAPTER_HUB_LOCK_TIMEOUT"):
        hub.push(folder(tmp_path, "a"), "alice/math")


def test_stale_ref_lock_of_a_dead_writer_is_recovered(tmp_path):
    hub.push(folder(tmp_path, "a"), "alice/math")
    repo = Store().models / "alice" / "math"
    lock = repo / ".git" / "refs" / "heads" / "main.lock"
    lock.write_text("")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert hub.push(folder(tmp_path, "b", seed=1), "alice/math").tag == "v2"
    assert not lock.exists()


def test_fresh_ref_lock_is_left_alone_and_the_push_fails_cleanly(tmp_path):
    hub.push(folder(tmp_path, "a"), "alice/math")
    repo = Store().models / "alice" / "math"
    lock = repo / ".git" / "refs" / "heads" / "main.lock"
    lock.write_text("")  # could be a live git command: too young to be called stale
    before = git(repo, "for-each-ref").stdout
    with pytest.raises(hub.StoreError) as e:
        hub.push(folder(tmp_path, "b", seed=1), "alice/math")
    assert "main.lock" in str(e.value) and "Nothing was changed" in str(e.value)
    assert lock.exists()
    assert git(repo, "for-each-ref").stdout == before


def test_staging_folders_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    root = Store().root
    root.mkdir(parents=True)
    dead = root / f".stage-{_host()}-{2**22 + 12345}-abc"    # no such pid (above pid_max's default)
    mine = root / f".stage-{_host()}-{os.getpid()}-abc"
    remote = root / ".stage-otherhost-1-abc"
    legacy = root / ".stage-x1y2z3"
    for d in (dead, mine, remote, legacy):
        d.mkdir()
    removed = clear_dead_staging(root)
    assert removed == [dead]
    assert mine.exists() and remote.exists() and legacy.exists()
    hub.push(folder(tmp_path, "a"), "alice/math")  # a push cleans up too, and leaves nothing of its own
    assert sorted(p.name for p in root.glob(".stage-*")) == sorted(p.name for p in (mine, remote, legacy))


def test_lock_path_that_is_not_a_file(tmp_path):
    root = Store().root
    (root / "locks" / "alice" / "math.lock").mkdir(parents=True)
    with pytest.raises(hub.StoreError, match="not a plain file"):
        hub.push(folder(tmp_path, "a"), "alice/math")
    assert not (root / "models" / "alice" / "math" / ".git").exists()


def test_reads_work_when_the_store_cannot_be_written(tmp_path, monkeypatch):
    """A shared, read-only store: snapshots go to the user's cache; nothing is written into the store."""
    hub.push(folder(tmp_path, "a"), "alice/math")
    root = Store().root
    (root / "snapshots").write_text("not a folder: stands in for a read-only mount (tests run as root)")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    path = hub.pull("alice/math@v1")
    assert str(path).startswith(str(tmp_path / "user-cache"))
    assert hub.load("alice/math").source.startswith("alice/math@")
    assert [e["tags"] for e in hub.log("alice/math")] == [["v1"]]
