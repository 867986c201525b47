"""`hub serve` as a user runs it: GET / answers, model info without a revision works, writes are refused,
and SIGTERM stops the olah child too (a restart finds the port free)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import hub
from tests.helpers import env, folder, free_port, running, wait_for

pytest.importorskip("olah")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_serve_gateway_answers_and_sigterm_stops_olah(tmp_path, sig):
    """SIGTERM stops `hub serve` and its olah child; SIGKILL, which `hub serve` cannot catch, too: the child dies
    with its parent (PR_SET_PDEATHSIG)."""
    root = tmp_path / "server"
    sha = hub.push(folder(tmp_path, "a"), "alice/math", root=root).sha
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port)]
    with running(cmd, f"{base}/api/models/alice/math", log=tmp_path / "serve.log", timeout=120,
                 env=env(ADAPTER_HUB_HOME=str(root)), cwd=tmp_path) as proc:
        with urllib.request.urlopen(f"{base}/api/models/alice/math", timeout=5) as r:
            info = json.loads(r.read())
        assert info["sha"] == sha  # model info without a revision: main
        with urllib.request.urlopen(f"{base}/", timeout=5) as r:
            assert r.status == 200 and b"HF_ENDPOINT" in r.read()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/repos/create", data=b"{}", method="POST"),
                                   timeout=5)
        assert e.value.code == 405
        children = _children(proc.pid)
        assert children, "olah child not found"
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        deadline = time.monotonic() + 15
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(c) for c in children), "olah outlived 'hub serve'"
        with socket.socket() as s:  # the port is free again (as a restart binds it: SO_REUSEADDR)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))


def test_a_silent_client_is_dropped_after_the_read_timeout():
    """Idle sockets held a gateway thread each, forever; now each is closed after its read timeout."""
    from hub.gateway import Gateway

    port = free_port()
    gw = Gateway("127.0.0.1", port, ("127.0.0.1", free_port()), read_timeout=0.5).start()
    try:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
        for s in idle:
            assert s.recv(1) == b""  # the server closed it (an empty read, not a timeout on our side)
            s.close()
        wait_for(lambda: threading.active_count() < 20, "no gateway thread left waiting on them")
    finally:
        gw.close()
