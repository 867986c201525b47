"""The example adapters that ship in the repository's ``adapters/`` folder, imported into the store once.

This is the top of the house's job: :mod:`hub` is a library that knows no repository folders; the ``hub``
command (:mod:`app.cli`) and the app call :func:`import_examples`.

On first use of a store (``hub`` commands that read it, and the app), each shipped PEFT folder is pushed as
``examples/<folder name>``. A marker file records what was imported (each example's weights digest), so an
example deleted later stays deleted, and when the repository ships a retrained example the store gets it as a
new version of ``examples/<name>`` (the old one stays in its history). Checking costs a sha256 of each
shipped file. Set ``ADAPTER_HUB_NO_EXAMPLES=1`` to skip the import (the test suite does).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from composer.data import file_sha256
from composer.env import env_flag
from hub import Store

SHIPPED = Path(__file__).resolve().parents[1] / "adapters"
NAMESPACE = "examples"
MARKER = ".examples-imported"


def shipped_folders(folder: Path = SHIPPED) -> list[Path]:
    """The shipped adapter folders (those holding an ``adapter_config.json``), sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (p / "adapter_config.json").is_file())


def _digest(sub: Path) -> str:
    """One sha256 over the folder's files (names and contents): what a push of it would store."""
    h = hashlib.sha256()
    for f in sorted(p for p in sub.iterdir() if p.is_file()):
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


def _read_marker(marker: Path) -> dict[str, str] | None:
    """``{repo_id: digest}`` of what was imported; ``None`` if never; ``""`` digests for the first marker format
    (a line per id added), whose examples are checked once by content."""
    try:
        text = marker.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("imported"), dict):
            return {str(k): str(v) for k, v in data["imported"].items()}
    except ValueError:
        pass
    return {line.strip(): "" for line in text.splitlines() if line.strip()}


def import_examples(store: Store | None = None, *, folder: Path = SHIPPED, force: bool = False) -> list[str]:
    """Push each shipped adapter as ``examples/<name>``: once, and again as a new version when it is retrained.

    An example not imported before is added; one the user deleted after its import stays deleted. An example
    whose shipped weights changed since they were imported is pushed as the next version of its repository
    (an unchanged push makes none). An ``examples/<name>`` this import never made is left alone.

    Args:
        store: the store (default: ``$ADAPTER_HUB_HOME``).
        folder: where the shipped adapters are.
        force: push every example (deleted ones too), even if ``ADAPTER_HUB_NO_EXAMPLES`` is set.

    Returns:
        The ids added or updated (``examples/x@v2`` for an update).
    """
    if not force and env_flag("ADAPTER_HUB_NO_EXAMPLES"):
        return []
    store = store or Store()
    marker = store.root / MARKER
    seen = _read_marker(marker) or {}
    current = {f"{NAMESPACE}/{sub.name}": (sub, _digest(sub)) for sub in shipped_folders(folder)}
    todo = [(i, sub, d) for i, (sub, d) in current.items() if force or seen.get(i) != d]
    if not todo:
        return []  # the usual case: nothing new shipped
    if store.root.exists() and not os.access(store.root, os.W_OK):
        return []  # a read-only store (a shared mount) is read as it is
    changed = []
    for repo_id, sub, digest in todo:
        exists = store.exists(repo_id)
        if not exists and repo_id in seen and not force:
            continue  # imported once, deleted by the user since: stays deleted
        if not exists:
            store.push(sub, repo_id, message="Shipped example adapter")
            changed.append(repo_id)
        elif repo_id in seen or force:
            result = store.push(sub, repo_id, message="Shipped example adapter (retrained)")
            if not result.unchanged:
                changed.append(f"{repo_id}@{result.tag}" if result.tag else repo_id)
        else:
            continue  # an examples/<name> this import never made: not ours to update
        seen[repo_id] = digest
    store.root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"imported": seen}, indent=1) + "\n", encoding="utf-8")
    return changed
