"""Where an export goes: a folder that appears whole or not at all.

    check(to, force)                  before any work: refuse a non-empty folder without ``force`` (or a file)
    with staged(to, force) as tmp:    write into a hidden sibling  DIR/../.DIR.export-XXXX/
        ...                           renamed onto DIR at the end; an old DIR (with force) goes only then
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ExportError


def check(to: str | os.PathLike, force: bool) -> Path:
    """The target folder, checked before any work: absent, empty, or (with ``force``) any folder.

    Raises:
        ExportError: ``to`` is a file, or a non-empty folder and ``force`` is not set.
    """
    path = Path(to)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ExportError(f"'{path}' exists and is not a folder; pass another --to.", reason="target")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise ExportError(f"'{path}' is not empty; pass --force to replace it, or another --to.", reason="target")
    return path


@contextmanager
def staged(to: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Yield a fresh folder beside ``to``; on success it becomes ``to`` (a replaced folder is removed last), on
    failure it is removed and ``to`` is left as it was."""
    path = check(to, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.export-"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # not mkdtemp's 0700: what any new folder would get
        check(path, force)  # again: something may have appeared meanwhile
        old = None
        if path.is_dir() and any(path.iterdir()):
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / "old")
        try:
            os.replace(tmp, path)  # onto a missing or empty folder: one rename
        except BaseException:
            if old is not None:
                os.replace(old / "old", path)  # put the replaced folder back
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
