"""The example adapters that ship in the repository's ``adapters/`` folder, imported into the store once.

This is the top of the house's job: :mod:`hub` is a library that knows no repository folders; the ``hub``
command (:mod:`app.cli`) and the app call :func:`import_examples`.

On first use of a store (``hub`` commands that read it, and the app), each shipped PEFT folder is pushed as
``examples/<folder name>``. A marker file records that the import ran, so an example deleted later stays
deleted. Set ``ADAPTER_HUB_NO_EXAMPLES=1`` to skip the import (the test suite does).
"""

from __future__ import annotations

import os
from pathlib import Path

from hub import Store

SHIPPED = Path(__file__).resolve().parents[1] / "adapters"
NAMESPACE = "examples"
MARKER = ".examples-imported"


def shipped_folders(folder: Path = SHIPPED) -> list[Path]:
    """The shipped adapter folders (those holding an ``adapter_config.json``), sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (p / "adapter_config.json").is_file())


def import_examples(store: Store | None = None, *, folder: Path = SHIPPED, force: bool = False) -> list[str]:
    """Push each shipped adapter as ``examples/<name>`` unless the store already has that repository.

    Args:
        store: the store (default: ``$ADAPTER_HUB_HOME``).
        folder: where the shipped adapters are.
        force: import even if the marker says it ran before, or ``ADAPTER_HUB_NO_EXAMPLES`` is set.

    Returns:
        The ids added.
    """
    store = store or Store()
    marker = store.root / MARKER
    if not force and (marker.exists() or os.environ.get("ADAPTER_HUB_NO_EXAMPLES")):
        return []
    added = []
    for sub in shipped_folders(folder):
        repo_id = f"{NAMESPACE}/{sub.name}"
        if not store.exists(repo_id):
            store.push(sub, repo_id, message="Shipped example adapter")
            added.append(repo_id)
    store.root.mkdir(parents=True, exist_ok=True)
    marker.write_text("\n".join(added) + "\n", encoding="utf-8")
    return added
