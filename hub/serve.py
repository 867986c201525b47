"""``hub serve``: the store, read-only, over the Hugging Face Hub HTTP API, with ``olah``.

olah's ``mirrors-path`` serves ``<path>/models/<namespace>/<name>/`` git repositories — exactly the store's
layout — so ``mirrors-path`` is the store root. ``offline = true`` keeps olah from asking huggingface.co first.
Cards are checked on push (see :mod:`composer.card`) because olah reads them with an unsafe YAML loader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import HubError
from .store import Store


class ServeUnavailableError(HubError, ImportError):
    """olah is not installed."""


def write_config(store: Store, host: str, port: int) -> Path:
    """Write olah's TOML config under ``<root>/serve/`` and return its path."""
    serve = store.root / "serve"
    (serve / "repos").mkdir(parents=True, exist_ok=True)
    store.models.mkdir(parents=True, exist_ok=True)
    q = json.dumps  # TOML basic strings accept JSON string escapes
    text = "\n".join([
        "[basic]",
        f"host = {q(host)}",
        f"port = {int(port)}",
        f"repos-path = {q(str(serve / 'repos'))}",
        f"mirror-netloc = {q(f'{host}:{port}')}",
        f"mirror-lfs-netloc = {q(f'{host}:{port}')}",
        f"mirrors-path = [{q(str(store.root))}]",
        "",
        "[accessibility]",
        "offline = true",
        "",
    ])
    path = serve / "olah.toml"
    path.write_text(text, encoding="utf-8")
    return path


def command(store: Store, host: str, port: int) -> list[str]:
    """The olah command line (a separate process: olah configures global server state on start)."""
    try:
        import olah  # noqa: F401
    except ImportError as e:
        raise ServeUnavailableError("'hub serve' needs olah: pip install 'adapter-hub-composer[serve]' "
                                    "(or pip install olah).") from e
    config = write_config(store, host, port)
    return [sys.executable, "-m", "olah.server", "-c", str(config), "--log-path", str(store.root / "serve" / "logs")]


def serve(*, host: str = "127.0.0.1", port: int = 8090, root: str | os.PathLike | None = None,
          announce: Callable[[str], None] | None = None) -> int:
    """Run olah in the foreground until interrupted; returns its exit code.

    Args:
        announce: called once with a line saying where the store is served (the CLI prints it on stderr;
            the library itself never prints).
    """
    store = Store(root)
    cmd = command(store, host, port)
    if announce is not None:
        announce(f"Serving {store.models} read-only at http://{host}:{port} — clients: "
                 f"HF_ENDPOINT=http://{host}:{port}")
    # olah prints its own banner on stdout; keep our stdout for data.
    proc = subprocess.Popen(cmd, stdout=sys.stderr)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
