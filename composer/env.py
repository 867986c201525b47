"""Boolean switches read from the environment: one rule for every ``ADAPTER_HUB_*`` / ``HUB_*`` flag."""

from __future__ import annotations

import os

TRUE = frozenset({"1", "true", "yes", "on"})


def env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to a true value (``1``, ``true``, ``yes``, ``on``, any
    case); unset, empty, ``0``, ``false``, ``no``, ``off`` and anything else read as false."""
    return os.environ.get(name, "").strip().lower() in TRUE
