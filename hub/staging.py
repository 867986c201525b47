"""What a push reads from the user's folder, and how: plain files only, never through a symbolic link.

A folder handed to ``hub push`` may come from anywhere (a download, a colleague's archive). If its
``README.md`` were a link to ``~/.aws/credentials``, following it would copy that file into the store, and
``hub serve`` would then hand it to anyone who asks. So:

- the folder itself must not be a symbolic link, and no entry in it may be one (file or subfolder);
- each adapter file is opened relative to the folder's descriptor with ``O_NOFOLLOW`` and checked to be a
  regular file *after* opening (a link swapped in between the check and the copy is still refused, and a
  FIFO never blocks the push), with one name only (a *hard* link to ``~/.aws/credentials`` is a regular file
  that ``O_NOFOLLOW`` cannot see: its link count can), and within the size limit before a byte is copied (a
  sparse 3 GB ``README.md`` is refused, not written into the staging folder);
- the copy is what gets validated and stored, so the folder changing under us cannot slip anything in.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from composer import limits

from .errors import UnsafeFolderError
from .text import shown

SMALL_FILES = ("adapter_config.json", "recipe.json", "README.md")  # held to the config/card size limit

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def _link_error(path: Path) -> UnsafeFolderError:
    return UnsafeFolderError(
        f"'{shown(path)}' is a symbolic link; a push never follows links (it could copy a file from "
        "elsewhere on this machine into the store). Replace it with a regular copy "
        "(e.g. 'cp -L' into a fresh folder) and push again.", path=path)


def check_folder(folder: Path) -> None:
    """Refuse a folder that is, or holds, a symbolic link (or something other than files and folders).

    Raises:
        UnsafeFolderError: naming the first offending entry.
    """
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return  # the caller's "is not a folder" error says it better
    if stat.S_ISLNK(st.st_mode):
        raise _link_error(folder)
    if not stat.S_ISDIR(st.st_mode):
        return
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_symlink():
            raise _link_error(folder / entry.name)


def copy_files(folder: Path, staging: Path, names: tuple[str, ...]) -> tuple[str, ...]:
    """Copy the entries of ``folder`` named in ``names`` into ``staging``; return the names left out.

    Raises:
        UnsafeFolderError: a symbolic link, or an adapter file that is not a regular file.
    """
    check_folder(folder)
    dfd = os.open(folder, os.O_RDONLY | _DIRECTORY | _NOFOLLOW)
    skipped = []
    try:
        for name in sorted(os.listdir(dfd)):
            if name not in names:
                if not name.startswith("."):
                    skipped.append(name)
                continue
            try:
                fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _NONBLOCK, dir_fd=dfd)
            except OSError as e:
                if os.path.islink(folder / name):
                    raise _link_error(folder / name) from e
                if os.path.isdir(folder / name):
                    raise UnsafeFolderError(f"'{shown(folder / name)}' is a folder, not a file.",
                                            path=folder / name) from e
                raise
            st = os.fstat(fd)  # before wrapping it: os.fdopen of a folder fails with "Is a directory: 4"
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise UnsafeFolderError(
                    f"'{shown(folder / name)}' is not a regular file (a folder, device or pipe); "
                    "only plain files are pushed. Remove it or replace it with the file.", path=folder / name)
            with os.fdopen(fd, "rb") as src:
                if st.st_nlink > 1:
                    raise UnsafeFolderError(
                        f"'{shown(folder / name)}' is a hard link ({st.st_nlink} names for one file); a push never "
                        "copies a file that has another name elsewhere (it could be a secret linked in). Replace it "
                        "with a plain copy (e.g. 'cp' it into a fresh folder) and push again.", path=folder / name)
                limits.check("config_bytes" if name in SMALL_FILES else "adapter_bytes", st.st_size,
                             f"'{shown(folder / name)}'")
                with open(staging / name, "xb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    finally:
        os.close(dfd)
    return tuple(skipped)
