"""Text that reaches a terminal: :func:`composer.text.shown` owns the rule; re-exported for the hub's messages."""

from __future__ import annotations

from composer.text import shown

__all__ = ["shown"]
