"""Pulling from a hostile Hub-compatible server: a real local HTTP server, written here, that speaks the few
routes a pull uses (model info, paths-info, refs, resolve) and lies or stalls in one way per test.

What a careful user expects each time: the pull ends within its deadline with one of our errors (never a
traceback, never a hang), the staging folder never holds more than the server's own record allows, and the
store is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import composer
import hub
from hub.remote import git_blob_sha1
from hub.store import Store
from tests.helpers import files, folder, free_port

SHA = "a" * 40
GiB = 2**30


class Hostile:
    """What the server serves (``files``) and how it misbehaves (``mode``)."""

    def __init__(self, files: dict[str, bytes], mode: str = "honest") -> None:
        self.files = dict(files)
        self.mode = mode
        self.sent: dict[str, int] = {}  # bytes of each file actually sent
        self.lfs = False

    def record(self, name: str) -> dict:
        data = self.files[name]
        size = GiB if self.mode == "declares 1 GiB" and name == "adapter_model.safetensors" else len(data)
        out = {"type": "file", "path": name, "size": size, "oid": git_blob_sha1(data)}
        if self.lfs and name.endswith(".safetensors"):
            out["lfs"] = {"size": size, "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 130}
        return out


def _handler(h: Hostile) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _json(self, obj, status: int = 200) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            if re.fullmatch(r"/api/models/[^/]+/[^/]+/revision/[^/]+", path):
                if h.mode == "model info not JSON":
                    body = b"<html>hello</html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if h.mode == "model info trickles":
                    body = json.dumps({"id": "x", "sha": SHA}).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    for b in body:
                        self.wfile.write(bytes([b]))
                        self.wfile.flush()
                        time.sleep(0.5)
                    return
                siblings = [{"rfilename": n} for n in h.files]
                return self._json({"id": "alice/x", "modelId": "alice/x", "sha": SHA, "siblings": siblings})
            if re.fullmatch(r"/api/models/[^/]+/[^/]+/refs", path):
                return self._json({"branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": SHA}],
                                   "tags": [], "converts": []})
            m = re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", path)
            if m and m.group(1) in h.files:
                return self._file(m.group(1))
            self._json({"error": "not found"}, 404)

        def _file(self, name: str) -> None:
            data = h.files[name]
            big = name == "adapter_model.safetensors"
            self.send_response(200)
            if h.mode == "announces 1 GiB" and big:
                self.send_header("Content-Length", str(GiB))
            elif h.mode == "sends 1 GiB unannounced" and big:
                self.send_header("Connection", "close")
            else:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            h.sent[name] = 0
            try:
                if big and h.mode in ("announces 1 GiB", "sends 1 GiB unannounced", "declares 1 GiB"):
                    block = b"\0" * 65536
                    while h.sent[name] < GiB:
                        self.wfile.write(block)
                        h.sent[name] += len(block)
                elif big and h.mode == "trickles":
                    for b in data:
                        self.wfile.write(bytes([b]))
                        self.wfile.flush()
                        h.sent[name] += 1
                        time.sleep(0.5)
                else:
                    self.wfile.write(data)
                    h.sent[name] = len(data)
            except OSError:
                pass  # the client hung up: what a careful client does

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode()
            if re.fullmatch(r"/api/models/[^/]+/[^/]+/paths-info/[^/]+", self.path):
                from urllib.parse import parse_qs
                paths = parse_qs(body).get("paths", [])
                return self._json([h.record(p) for p in paths if p in h.files])
            self._json({"error": "not found"}, 404)

    return Handler


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Start a hostile server over a real adapter's files; yields (Hostile, HfApi pointed at it)."""
    from huggingface_hub import HfApi, constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    h = Hostile(files(folder(tmp_path, "src")))
    port = free_port()
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(h))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield h, HfApi(endpoint=f"http://127.0.0.1:{port}", token=False)
    finally:
        httpd.shutdown()
        httpd.server_close()


def _staged(root: Path) -> int:
    """Bytes under the store root right now (staging folders included)."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def _pull_fails(api, error, tmp_path, *, within: float):
    store = Store()
    t0 = time.monotonic()
    with pytest.raises(error) as e:
        hub.pull("alice/x", remote="hf", api=api, to=tmp_path / "out")
    assert time.monotonic() - t0 < within
    assert not store.exists("alice/x") and not (tmp_path / "out").exists()
    assert not [p for p in store.root.glob(".stage-*")] if store.root.exists() else True
    return str(e.value)


@pytest.mark.parametrize("lfs", [False, True])
def test_an_honest_server_is_pulled(server, tmp_path, lfs):
    h, api = server
    h.lfs = lfs
    out = hub.pull("alice/x", remote="hf", api=api, to=tmp_path / "out")
    assert files(out) == h.files
    assert hub.resolve(f"alice/x@{SHA}").sha


def test_a_declared_size_over_the_limit_is_refused_before_any_download(server, tmp_path):
    h, api = server
    h.mode = "declares 1 GiB"
    msg = _pull_fails(api, composer.LimitExceededError, tmp_path, within=30)
    assert "ADAPTER_HUB_MAX_ADAPTER_BYTES" in msg and "adapter_model.safetensors" in msg
    assert h.sent.get("adapter_model.safetensors") is None  # not one byte asked for


@pytest.mark.parametrize("mode", ["announces 1 GiB", "sends 1 GiB unannounced"])
def test_a_file_larger_than_its_record_is_cut_off(server, tmp_path, mode):
    h, api = server
    h.mode = mode
    msg = _pull_fails(api, hub.IntegrityError, tmp_path, within=60)
    assert "own record says" in msg
    assert _staged(Store().root) < 2**20


def test_a_trickling_download_ends_at_the_deadline(server, tmp_path, monkeypatch):
    h, api = server
    h.mode = "trickles"
    monkeypatch.setenv("ADAPTER_HUB_REMOTE_DEADLINE", "3")
    msg = _pull_fails(api, hub.RemoteUnavailableError, tmp_path, within=20)
    assert "ADAPTER_HUB_REMOTE_DEADLINE" in msg


def test_trickling_model_info_ends_at_the_deadline(server, tmp_path, monkeypatch):
    h, api = server
    h.mode = "model info trickles"
    monkeypatch.setenv("ADAPTER_HUB_REMOTE_DEADLINE", "2")
    msg = _pull_fails(api, hub.RemoteUnavailableError, tmp_path, within=10)
    assert "took longer than 2 s" in msg


def test_model_info_that_is_not_json_is_one_error(server, tmp_path):
    h, api = server
    h.mode = "model info not JSON"
    msg = _pull_fails(api, hub.IntegrityError, tmp_path, within=30)
    assert "not a Hugging Face Hub answer" in msg


def test_files_that_are_not_adapter_files_are_not_downloaded(server, tmp_path):
    h, api = server
    h.files["training_log.txt"] = b"x" * 100
    h.files["checkpoint/notes.md"] = b"x"
    out = hub.pull("alice/x", remote="hf", api=api, to=tmp_path / "out")
    assert sorted(files(out)) == sorted(n for n in h.files if "/" not in n and n != "training_log.txt")
    assert "training_log.txt" not in h.sent and "checkpoint/notes.md" not in h.sent


def test_a_pickle_is_refused(server, tmp_path):
    h, api = server
    h.files["adapter_model.bin"] = b"\x80\x04K\x01."
    msg = _pull_fails(api, hub.UnsafeFolderError, tmp_path, within=30)
    assert "adapter_model.bin" in msg and "pickle" in msg
    assert not h.sent  # refused before any download
