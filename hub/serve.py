"""``hub serve``: the store, read-only, over the Hugging Face Hub HTTP API, with ``olah``.

olah's ``mirrors-path`` serves ``<path>/models/<namespace>/<name>/`` git repositories — exactly the store's
layout — so ``mirrors-path`` is the store root. ``offline = true`` keeps olah from asking huggingface.co first.
Cards are checked on push (see :mod:`composer.card`) because olah reads them with an unsafe YAML loader.

:func:`serve` runs olah as a child on a private loopback port behind :mod:`hub.gateway` (read-only, sane
answers for ``/`` and for model info without a revision). SIGTERM or Ctrl-C stops both, and the child also
gets SIGTERM if this process dies (``PR_SET_PDEATHSIG``), so a restart never finds the port taken.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from .errors import HubError, StoreError
from .ids import parse_id
from .store import Store


class ServeUnavailableError(HubError, ImportError):
    """olah is not installed."""


def write_config(store: Store, host: str, port: int, public: str | None = None) -> Path:
    """Write olah's TOML config under ``<root>/serve/`` (a temporary folder if the store is read-only) and
    return its path. ``public`` (``host:port``) is the address clients use, when a gateway fronts olah."""
    serve = store.root / "serve"
    try:
        store.models.mkdir(parents=True, exist_ok=True)
        (serve / "repos").mkdir(parents=True, exist_ok=True)
        probe = serve / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError:
        serve = Path(tempfile.mkdtemp(prefix="adapter-hub-serve-"))
        (serve / "repos").mkdir()
    q = json.dumps  # TOML basic strings accept JSON string escapes
    text = "\n".join([
        "[basic]",
        f"host = {q(host)}",
        f"port = {int(port)}",
        f"repos-path = {q(str(serve / 'repos'))}",
        f"mirror-netloc = {q(public or f'{host}:{port}')}",
        f"mirror-lfs-netloc = {q(public or f'{host}:{port}')}",
        f"mirrors-path = [{q(str(store.root))}]",
        "",
        "[accessibility]",
        "offline = true",
        "",
    ])
    path = serve / "olah.toml"
    path.write_text(text, encoding="utf-8")
    return path


def command(store: Store, host: str, port: int, public: str | None = None) -> list[str]:
    """The olah command line (a separate process: olah configures global server state on start)."""
    try:
        import olah  # noqa: F401
    except ImportError as e:
        raise ServeUnavailableError("'hub serve' needs olah: pip install 'adapter-hub-composer[serve]' "
                                    "(or pip install olah).") from e
    config = write_config(store, host, port, public)
    return [sys.executable, "-m", "olah.server", "-c", str(config), "--log-path", str(config.parent / "logs")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Stop(Exception):
    pass


def serve(*, host: str = "127.0.0.1", port: int = 8090, root: str | os.PathLike | None = None,
          announce: Callable[[str], None] | None = None) -> int:
    """Serve the store read-only until SIGTERM or Ctrl-C; returns olah's exit code (0 when stopped by us).

    Args:
        announce: called once with a line saying where the store is served (the CLI prints it on stderr;
            the library itself never prints).

    Raises:
        ServeUnavailableError: olah is not installed.
        StoreError: ``host:port`` cannot be bound (e.g. another server holds it), or git cannot read a repository
            of the store (:class:`StoreAccessError`: another user owns it).
    """
    from .gateway import Gateway

    store = Store(root)
    # olah reads the repositories with git too, and a repository git refuses (another user's) would be served as
    # "not found": refuse to start instead, with the reason (StoreAccessError) and what to do.
    store.list()
    private = _free_port()
    cmd = command(store, "127.0.0.1", private, public=f"{host}:{port}")
    try:
        gateway = Gateway(host, port, ("127.0.0.1", private), canonical=lambda repo_id: store.canonical(
            parse_id(repo_id, allow_revision=False)).repo_id)
    except OSError as e:
        raise StoreError(f"Cannot listen on {host}:{port}: {e.strerror or e}. Pick another port with --port."
                         ) from e
    if announce is not None:
        announce(f"Serving {store.models} read-only at http://{host}:{port} — clients: "
                 f"HF_ENDPOINT=http://{host}:{port}")

    def stop(signum, frame):
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() \
        else None
    # olah prints its own banner on stdout; keep our stdout for data.
    proc = subprocess.Popen(cmd, stdout=sys.stderr, preexec_fn=_die_with_parent)  # noqa: PLW1509
    code = 0
    try:
        gateway.start()
        code = proc.wait()
    except (_Stop, KeyboardInterrupt):
        code = 0
    finally:
        gateway.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return code
