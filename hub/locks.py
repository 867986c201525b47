"""Writer locks and the leftovers of writers that died: what a push waits for, and what it may clean.

- **The repository lock** is an ``flock`` on ``locks/<ns>/<name>.lock``: the kernel releases it when its
  holder dies, so it is never stale. Its holder writes ``pid host start-time`` into the file, so a waiter can
  say whom it waits for (logged after :data:`ANNOUNCE_AFTER` seconds) and gives up with
  :class:`LockTimeoutError` after ``ADAPTER_HUB_LOCK_TIMEOUT`` seconds (:mod:`composer.limits`).
- **git's own lock files** (``.git/refs/heads/main.lock`` ...) are created and removed within one git command.
  One left behind by a writer killed mid-command blocks every later push. Only writers holding the
  repository lock touch a repository, so once we hold it, a git lock file that has not changed for
  :data:`GIT_LOCK_GRACE` seconds belongs to a dead writer and is removed.
- **Staging folders** (``.stage-<host>-<pid>-*`` under the root) are named after their owner and removed by
  a later push only when that owner is a process on this host that no longer exists. A folder from another
  host is left alone: we cannot tell whether its owner lives.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from composer import limits

from .errors import LockTimeoutError, StoreError

log = logging.getLogger("hub")

ANNOUNCE_AFTER = 1.0
GIT_LOCK_GRACE = 5.0
_POLL = 0.05


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "localhost"


def owner_tag() -> str:
    """``<host>-<pid>``: embedded in staging folder names so leftovers can be traced to their owner."""
    return f"{_host()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _describe(path: Path) -> str:
    try:
        pid, host, since = path.read_text(encoding="utf-8", errors="replace").split()[:3]
        age = max(0.0, time.time() - float(since))
        return f"process {pid} on {host} (writing for {age:.0f} s)"
    except (OSError, ValueError):
        return "another process"


@contextlib.contextmanager
def repo_lock(path: Path, what: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the exclusive lock at ``path``; say whom we wait for after a second, give up after ``timeout``.

    Raises:
        LockTimeoutError: still held after ``timeout`` (default ``ADAPTER_HUB_LOCK_TIMEOUT``) seconds.
        StoreError: the lock path cannot be opened as a file.
    """
    timeout = limits.get("lock_timeout") if timeout is None else timeout
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+", encoding="utf-8")
    except OSError as e:
        raise StoreError(f"Cannot open the lock file {path} ({e.strerror or e}); if it is not a plain file, "
                         "remove it (no push can be running while it is not a file).") from e
    with fh:
        start = time.monotonic()
        announced = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise StoreError(f"Cannot lock {path}: {e.strerror or e}.") from e
            waited = time.monotonic() - start
            if waited >= timeout:
                holder = _describe(path)
                raise LockTimeoutError(
                    f"Gave up after {waited:.0f} s waiting for {holder} to finish writing {what}. If it is "
                    f"stuck, stop it; to wait longer set ADAPTER_HUB_LOCK_TIMEOUT=<seconds>.",
                    path=path, owner=holder, waited=waited)
            if not announced and waited >= ANNOUNCE_AFTER:
                log.warning("Waiting for %s to finish writing %s (lock %s) ...", _describe(path), what, path)
                announced = True
            time.sleep(_POLL)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()} {_host()} {time.time():.0f}\n")
            fh.flush()
        except OSError:
            pass  # the owner record is a courtesy for waiters; the flock is what counts
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fh.seek(0)
                fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def clear_stale_git_locks(repo: Path, grace: float = GIT_LOCK_GRACE) -> list[Path]:
    """Remove git lock files in ``repo/.git`` left by dead writers. Call only while holding the repo lock."""
    git = repo / ".git"
    candidates = [git / n for n in ("index.lock", "HEAD.lock", "config.lock", "packed-refs.lock")]
    candidates += list((git / "refs").rglob("*.lock"))
    removed = []
    now = time.time()
    for p in candidates:
        try:
            st = p.lstat()
        except OSError:
            continue
        if now - st.st_mtime < grace:
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
            log.warning("Removed %s, left by a writer that died.", p)
    return removed


def clear_dead_staging(root: Path, prefixes: tuple[str, ...] = (".stage-", ".compose-", ".pull-")) -> list[Path]:
    """Remove staging folders under ``root`` whose owner (named in the folder) is a dead process here."""
    removed = []
    host = _host()
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None or not entry.is_dir(follow_symlinks=False):
            continue
        parts = entry.name[len(prefix):].split("-")
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
            continue  # another host's, or an old unnamed one: its owner may live
        if _alive(int(parts[1])):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed
