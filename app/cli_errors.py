"""The command line's error table: which errors are the user's (one line on stderr, exit 1) and which are bugs
(a traceback), and the one debug switch, ``HUB_DEBUG``. Shared by ``hub`` (:mod:`app.cli`) and ``hub train``
(:mod:`app.train`), as huggingface_hub keeps its CLI's in ``cli/_errors.py``."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator

DEBUG_ENV = "HUB_DEBUG"


class UsageError(Exception):
    """A command line that cannot work (raised by handlers; argparse handles the rest)."""


def _safe(text: str, *, message: bool = False) -> str:
    """Names from folders, cards and stores, shown and never obeyed: each line's control characters escaped
    (a name holding ESC[2K or a newline could otherwise clear or forge lines of the user's terminal).

    ``message``: an error message, whose further lines are indented (an expression and its caret), and any
    other line too, so that no line but the first can start with "Error:" whatever a name smuggled in. A
    command's own output (``hub show``, ``hub diff``) keeps its lines as built: the names in it are escaped
    where they are put in (``shown``), so a newline in one cannot start a line."""
    from hub.text import shown

    first, *rest = str(text).split("\n")
    if not message:
        return "\n".join(shown(line) for line in [first, *rest])
    return "\n".join([shown(first)] + [shown(line if line[:1].isspace() or not line else "  " + line)
                                        for line in rest])


def _err(msg: str) -> None:
    print(_safe(msg, message=True), file=sys.stderr)


def _message(e: BaseException) -> str:
    return str(e).strip() or type(e).__name__


def _os_message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.strerror}: {e.filename}"
    return _message(e)


def _formatters() -> dict[type[BaseException], Callable[[BaseException], str]]:
    """Known error types -> how to print them (the most specific class in an error's MRO wins). Errors of
    other types are bugs: they keep their traceback."""
    from composer.errors import ComposerError
    from hub.errors import HubError

    from .errors import AppError

    return {HubError: _message, ComposerError: _message, AppError: _message, UsageError: _message,
            OSError: _os_message}  # a full disk, a read-only mount, a missing file: the environment, not a bug


FORMATTERS = _formatters()


def debug() -> bool:
    """Whether ``HUB_DEBUG`` asks for tracebacks (the one debug switch of ``hub`` and ``hub train``)."""
    from composer.env import env_flag

    return env_flag(DEBUG_ENV)


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Warnings as one ``warning: ...`` line each on stderr, as errors are (Python's own format names a
    source file and quotes a line of it, which says nothing to a user); the libraries' deprecation notices are
    for their developers and show only with ``HUB_DEBUG``, in Python's format."""
    if debug():
        yield
        return
    with warnings.catch_warnings():
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)
        warnings.showwarning = lambda message, *args, **kw: _err(f"warning: {message}")
        yield


def report_error(e: BaseException) -> int:
    """Print a known error's whole message on stderr and return 1; re-raise unknown errors (and every error
    when ``HUB_DEBUG`` is set) so their traceback shows."""
    fmt = next((FORMATTERS[c] for c in type(e).__mro__ if c in FORMATTERS), None)
    if fmt is None or debug():
        raise e
    text = fmt(e)
    hint = f"(set {DEBUG_ENV}=1 for the traceback)"
    text = _safe(text, message=True)
    print(f"Error: {text} {hint}" if "\n" not in text else f"Error: {text}\n{hint}", file=sys.stderr)
    return 1
