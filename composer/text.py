"""Text that reaches a terminal: names from folders, cards, expressions and remotes are shown, never obeyed.

A file or tag name can hold a newline or an escape sequence (``\\x1b[2K`` clears a line); echoed raw it could
forge or erase lines of the user's terminal. :func:`shown` escapes everything that is not printable.
"""

from __future__ import annotations


def shown(value: object) -> str:
    """``value`` as text with control, format and other non-printable characters escaped (``\\n``, ``\\x1b``)."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
