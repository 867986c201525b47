"""The local store: one real git repository per adapter, versions as tags.

Layout under ``$ADAPTER_HUB_HOME`` (default ``~/.cache/adapter-hub``)::

    $ADAPTER_HUB_HOME/
    ├── models/                              what `hub serve` (olah's mirrors-path) exposes
    │   └── <namespace>/
    │       └── <name>/                      a git repository (non-bare), branch `main`
    │           ├── .git/                    refs/heads/main, refs/tags/v1, v2, ...
    │           │                            refs/hf/<remote sha> -> local commit (pulled from a remote)
    │           ├── adapter_config.json      working tree = main, refreshed after each push
    │           ├── adapter_model.safetensors
    │           ├── prompt_vector.safetensors   (prompt vectors only)
    │           ├── adapter.safetensors      (the adapters library's bottleneck adapters, instead of adapter_model)
    │           ├── recipe.json              (composed adapters only)
    │           ├── parts.json               (a recipe of parts, instead of adapter_config.json: composer.parts)
    │           ├── part-1-lora/ …           (its parts: one PEFT folder each, adapter files only)
    │           └── README.md                model card, YAML front matter
    ├── snapshots/<namespace>/<name>/<commit sha>/   read-only exports, what `hub pull` prints
    ├── locks/<namespace>/<name>.lock        flock: one writer per repository
    └── serve/                               olah config, cache and logs for `hub serve`

A push is atomic: the folder is copied to a staging dir and validated (by :func:`composer.precheck.check`,
without torch or PEFT, where it can decide, else by :func:`composer.load`), its blobs, tree and commit are
written as git objects (unreferenced until the end), then ``main`` and the version tag move together in one
``git update-ref --stdin`` transaction that checks ``main``'s old value. A push killed before that transaction
leaves at most unreferenced objects (``git fsck`` stays clean, ``git gc`` drops them); after it, the push is
complete. The working tree is refreshed last and only for people browsing it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import composer
from composer.card import build_card, parse_card
from composer.data import FILE_MODE

from .errors import (
    FolderNotEmptyError,
    HubError,
    InvalidIdError,
    RepositoryNotFoundError,
    ReservedTagError,
    RevisionNotFoundError,
    StoreAccessError,
    StoreError,
    TagExistsError,
    UnsafeFolderError,
)
from .ids import RepoRef, check_tag, next_version, parse_id, sort_tags, version_number
from .interrupts import held
from .locks import clear_dead_staging, clear_stale_git_locks, owner_tag, repo_lock
from .staging import check_folder, copy_files
from .text import shown

if TYPE_CHECKING:
    from composer.precheck import Checked

# Only these files enter the store; anything else in a folder (optimizer states, training_args.bin
# pickles, checkpoints) is left behind and reported.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "prompt_vector.safetensors",
                 "adapter.safetensors", "recipe.json", "README.md",  # adapter.safetensors: the adapters library's
                 "parts.json")  # a recipe of parts, whose part folders (composer.parts.PART_FILES each) sit beside it
BRANCH = "main"
PULL_MARKER = ".hub-pull"  # in a --to folder: what was pulled there, and each file's sha256
_ZERO = "0" * 40
_SHA = re.compile(r"[0-9a-f]{4,40}\Z")
_SCRUB = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
          "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_NAMESPACE", "GIT_CEILING_DIRECTORIES", "GIT_COMMON_DIR")


def stored(name: str) -> bool:
    """Whether ``name`` (a path in a commit's tree, ``/``-separated) is one the store keeps: an adapter file at the
    top, or an adapter file in a part folder of a recipe of parts (one level down, a plain part name). Nothing else
    is ever exported, so no tree can make a pull write outside its folder."""
    if name in ADAPTER_FILES:
        return True
    from composer.parts import PART_FILES, PART_NAME  # torch: only where adapter files are read or written

    part, _, file = name.partition("/")
    return bool(PART_NAME.match(part)) and file in PART_FILES


def listing(folder: Path) -> list[str]:
    """The files of an exported folder as :func:`stored` names (part folders one level down), dot-files aside."""
    out = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            out += [f"{name}/{n}" for n in sorted(os.listdir(path)) if not n.startswith(".")]
        else:
            out.append(name)
    return out


def default_root() -> Path:
    """The store root, the one place it is decided: ``$ADAPTER_HUB_HOME``, else ``$XDG_CACHE_HOME/adapter-hub``,
    else ``~/.cache/adapter-hub``. (The converted base model is the app's, shared by every store:
    ``app.engine.base.cache_root``.)"""
    env = os.environ.get("ADAPTER_HUB_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "adapter-hub"


def _fallback_snapshots(root: Path) -> Path:
    """Where snapshots of a read-only store go: the user's cache, one folder per store root."""
    digest = hashlib.sha256(str(root.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    base = Path(cache) / "adapter-hub-readonly" / digest
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"adapter-hub-readonly-{os.getuid()}" / digest


def _pause(stage: str) -> None:
    """Test hook: ``HUB_TEST_PAUSE_AFTER=<stage>`` stops here so a test can SIGKILL a push mid-way."""
    if os.environ.get("HUB_TEST_PAUSE_AFTER") == stage:
        signal_file = os.environ.get("HUB_TEST_PAUSE_SIGNAL")
        if signal_file:
            Path(signal_file).write_text(stage)
        time.sleep(float(os.environ.get("HUB_TEST_PAUSE_SECONDS", "3600")))


@dataclass(frozen=True)
class Resolved:
    """An id pinned to a commit."""

    ref: RepoRef
    sha: str

    @property
    def pinned(self) -> str:
        return f"{self.ref.repo_id}@{self.sha}"


@dataclass(frozen=True)
class PushResult:
    """What a push did. ``unchanged``: the content equals the latest version's, so no version was made and
    ``sha``/``tag`` name that version."""

    repo_id: str
    sha: str
    tag: str | None
    parent: str | None
    skipped: tuple[str, ...] = ()
    unchanged: bool = False

    @property
    def pinned(self) -> str:
        return f"{self.repo_id}@{self.sha}"


class Store:
    """A local adapter store rooted at ``root`` (default :func:`default_root`)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.models = self.root / "models"

    # --- git plumbing -------------------------------------------------------------------------------

    def _git(self, repo: Path, *args: str, input: bytes | None = None, check: bool = True,
             env: dict[str, str] | None = None, detached: bool = False) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        base.update(GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0", LC_ALL="C")
        base.setdefault("GIT_AUTHOR_NAME", os.environ.get("HUB_AUTHOR", "adapter-hub"))
        base.setdefault("GIT_AUTHOR_EMAIL", os.environ.get("HUB_AUTHOR_EMAIL", "adapter-hub@localhost"))
        base.setdefault("GIT_COMMITTER_NAME", base["GIT_AUTHOR_NAME"])
        base.setdefault("GIT_COMMITTER_EMAIL", base["GIT_AUTHOR_EMAIL"])
        if env:
            base.update(env)
        # detached: a session of its own, out of reach of the terminal's Ctrl-C (hub.interrupts)
        p = subprocess.run(["git", "-C", str(repo), *args], input=input, capture_output=True, env=base,
                           start_new_session=detached)
        if p.returncode != 0:
            err = p.stderr.decode(errors="replace")
            if "dubious ownership" in err:  # whatever the caller expects: never read as "nothing there"
                raise StoreAccessError(_ownership_message(repo, self.root), path=repo)
            if check:
                raise StoreError(git_failure(args[0], repo, err))
        return p

    def _out(self, repo: Path, *args: str, **kw) -> str:
        return self._git(repo, *args, **kw).stdout.decode().strip()

    def _rev(self, repo: Path, rev: str) -> str | None:
        """The commit ``rev`` names, ``None`` when there is none; a git that fails otherwise (an unreadable
        repository) raises, so a failing read is never taken for "no versions"."""
        p = self._git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}",
                      check=False)
        if p.returncode == 0:
            return p.stdout.decode().strip()
        if p.returncode == 1 and not p.stderr.strip():  # --verify --quiet: no such revision, and nothing else
            return None
        raise StoreError(git_failure("rev-parse", repo, p.stderr.decode(errors="replace")))

    # --- paths and locks ----------------------------------------------------------------------------

    def repo_path(self, ref: RepoRef) -> Path:
        return self.models / ref.namespace / ref.name

    def _spellings(self, ref: RepoRef) -> list[RepoRef]:
        """The stored repositories whose id equals ``ref``'s but for case (the stored spelling, ``ref``'s
        revision kept)."""
        found = []
        with contextlib.suppress(OSError):
            for ns in sorted(os.listdir(self.models)):
                if ns.lower() != ref.namespace.lower():
                    continue
                with contextlib.suppress(OSError):
                    for name in sorted(os.listdir(self.models / ns)):
                        if name.lower() == ref.name.lower() and (self.models / ns / name / ".git").is_dir():
                            found.append(RepoRef(ns, name, ref.revision))
        return found

    def canonical(self, ref: RepoRef) -> RepoRef:
        """The stored repository ``ref`` names, spelled as stored: ids are case-insensitive, as on the Hugging Face
        Hub (``Alice/Math`` is ``alice/math``); ``ref`` itself when nothing is stored under it.

        Raises:
            InvalidIdError: several stored ids differ from ``ref`` only in case (made before this rule) and none
                is spelled exactly as ``ref``.
        """
        found = self._spellings(ref)
        if not found or any((f.namespace, f.name) == (ref.namespace, ref.name) for f in found):
            return ref
        if len(found) == 1:
            return found[0]
        raise InvalidIdError(
            f"'{ref.repo_id}' names no stored repository exactly, and {', '.join(repr(f.repo_id) for f in found)} "
            "differ from it only in case (one id on the Hugging Face Hub, which ignores case). Spell the one you "
            "mean exactly.", value=ref.repo_id)

    def lock(self, ref: RepoRef, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """Exclusive lock on one repository (see :mod:`hub.locks`): released by the kernel if the process dies,
        announced after a second of waiting, given up with :class:`LockTimeoutError` after ``timeout``. One lock
        for every spelling of an id (ids are case-insensitive), so two pushes of ``a/x`` and ``A/X`` take turns."""
        path = self.root / "locks" / ref.namespace.lower() / f"{ref.name.lower()}.lock"
        return repo_lock(path, f"'{ref.repo_id}'", timeout)

    def staging_dir(self, kind: str = "stage") -> tempfile.TemporaryDirectory:
        """A temporary folder under the root named after its owner (``.stage-<host>-<pid>-*``), so one left by a
        killed process can be recognised and removed by a later push (:func:`hub.locks.clear_dead_staging`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        clear_dead_staging(self.root)
        return tempfile.TemporaryDirectory(dir=self.root, prefix=f".{kind}-{owner_tag()}-")

    def _require(self, ref: RepoRef) -> Path:
        path = self.repo_path(self.canonical(ref))
        if not (path / ".git").is_dir():
            close = close_ids(ref.repo_id, self.ids())
            guess = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise RepositoryNotFoundError(
                f"No adapter '{ref.repo_id}' in the store at {self.root}.{guess} Run 'hub list' to see what "
                f"is there, or 'hub pull {ref.repo_id} --remote hf' to fetch it.", repo_id=ref.repo_id,
                suggestions=close)
        return path

    def ids(self) -> list[str]:
        """The ``namespace/name`` of every repository in the store (no git call: for suggestions)."""
        if not self.models.is_dir():
            return []
        return sorted(f"{ns.name}/{repo.name}" for ns in self.models.iterdir() if not ns.name.startswith(".")
                      and ns.is_dir() for repo in ns.iterdir() if (repo / ".git").is_dir())

    def _init(self, ref: RepoRef) -> Path:
        """Create the repository (caller holds the lock); built aside and renamed into place."""
        path = self.repo_path(ref)
        if (path / ".git").is_dir():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():  # a leftover that is not a repository: never delete user data silently
            raise StoreError(f"{path} exists but is not a git repository; move it away and push again.")
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{ref.name}.init-"))
        try:
            self._git(tmp, "init", "-q", "-b", BRANCH)
            self._git(tmp, "config", "core.autocrlf", "false")
            self._git(tmp, "config", "gc.auto", "0")
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    # --- reading ------------------------------------------------------------------------------------

    def exists(self, repo_id: str) -> bool:
        """Whether ``repo_id`` (any spelling of its case) is stored."""
        return bool(self._spellings(parse_id(repo_id, allow_revision=False)))

    def tags(self, ref: RepoRef) -> dict[str, str]:
        """Tag name -> commit sha."""
        path = self._require(ref)
        out = self._out(path, "for-each-ref", "--format=%(refname:strip=2) %(objectname) %(*objectname)",
                        "refs/tags")
        tags = {}
        for line in out.splitlines():
            name, sha, peeled = (line.split(" ") + ["", ""])[:3]
            tags[name] = peeled or sha
        return tags

    def branches(self, path: Path) -> set[str]:
        out = self._out(path, "for-each-ref", "--format=%(refname:strip=2)", "refs/heads")
        return set(out.splitlines()) | {BRANCH}

    def resolve(self, repo_id: str) -> Resolved:
        """Pin ``namespace/name[@rev]`` to a commit; ``rev`` is a tag, a branch or a (short) commit sha.

        Raises:
            InvalidIdError, RepositoryNotFoundError, RevisionNotFoundError.
        """
        ref = self.canonical(parse_id(repo_id))
        path = self._require(ref)
        rev = ref.revision
        candidates = [f"refs/heads/{BRANCH}"] if rev is None else [f"refs/tags/{rev}", f"refs/heads/{rev}"]
        if rev is not None and _SHA.match(rev):
            candidates.append(rev)
            candidates.append(f"refs/hf/{rev}")
        for c in candidates:
            sha = self._rev(path, c)
            if sha:
                return Resolved(ref, sha)
        if rev is not None and _SHA.match(rev):
            for line in self._out(path, "for-each-ref", "--format=%(refname:strip=2) %(objectname)",
                                  "refs/hf").splitlines():
                remote, local = line.split(" ")
                if remote.startswith(rev):
                    return Resolved(ref, local)
        avail = tuple(sort_tags(self.tags(ref)))
        if rev is None:
            raise RevisionNotFoundError(f"'{ref.repo_id}' has no versions yet. Push one with "
                                        f"'hub push DIR {ref.repo_id}'.", repo_id=ref.repo_id, available=avail)
        raise RevisionNotFoundError(
            f"Version '{rev}' of '{ref.repo_id}' not found. Available: {', '.join(avail) or 'none'}. "
            f"Run 'hub log {ref.repo_id}'.", repo_id=ref.repo_id, revision=rev, available=avail)

    def log(self, repo_id: str) -> list[dict]:
        """Commits on ``main``, newest first: ``sha``, ``tags``, ``message``, ``date``, ``author``."""
        ref = self.canonical(parse_id(repo_id, allow_revision=False))
        path = self._require(ref)
        if self._rev(path, f"refs/heads/{BRANCH}") is None:
            return []
        by_sha: dict[str, list[str]] = {}
        for name, sha in self.tags(ref).items():
            by_sha.setdefault(sha, []).append(name)
        out = self._git(path, "log", "--format=%H%x00%s%x00%b%x00%cI%x00%an%x1e", f"refs/heads/{BRANCH}",
                        "--").stdout.decode("utf-8", errors="replace")
        entries = []
        for rec in out.split("\x1e"):
            rec = rec.strip("\n")
            if not rec:
                continue
            sha, subject, body, date, author = rec.split("\x00")
            entries.append({"sha": sha, "tags": sort_tags(by_sha.get(sha, [])), "message": subject,
                            "description": body.strip(), "date": date, "author": author})
        return entries

    def list(self) -> list[dict]:
        """Every repository: ``id``, ``latest`` (newest tag), ``sha``, ``versions``."""
        rows = []
        if not self.models.is_dir():
            return rows
        for ns in sorted(p for p in self.models.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for repo in sorted(p for p in ns.iterdir() if (p / ".git").is_dir() and not p.name.startswith(".")):
                ref = RepoRef(ns.name, repo.name)
                head = self._rev(repo, f"refs/heads/{BRANCH}")
                tags = self.tags(ref)
                versions = sort_tags(tags)
                on_head = [t for t in versions if tags[t] == head]
                rows.append({"id": ref.repo_id, "latest": (on_head or versions or [None])[-1], "sha": head,
                             "versions": versions})
        return rows

    def files(self, resolved: Resolved) -> list[tuple[str, str]]:
        """(path, blob oid) of every file at the commit."""
        path = self._require(resolved.ref)
        out = self._git(path, "ls-tree", "-r", "-z", resolved.sha).stdout.decode()
        rows = []
        for rec in out.split("\0"):
            if rec:
                meta, name = rec.split("\t", 1)
                rows.append((name, meta.split()[2]))
        return rows

    def read(self, resolved: Resolved, name: str) -> bytes:
        path = self._require(resolved.ref)
        return self._git(path, "cat-file", "blob", f"{resolved.sha}:{name}").stdout

    def front_matter(self, resolved: Resolved) -> dict:
        """The YAML front matter of the commit's model card (``training``, ``base_model``, ``description``, ...).

        Raises:
            StoreError (no card at that commit), composer.InvalidCardError (an unsafe or malformed card).
        """
        return parse_card(self.read(resolved, "README.md"))[0]

    def export(self, resolved: Resolved, dest: str | os.PathLike) -> Path:
        """Write the files of a commit into ``dest`` (each file replaced atomically)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        path = self._require(resolved.ref)
        try:
            for name, oid in self.files(resolved):
                if not stored(name):  # the store holds nothing else; never write outside dest
                    continue
                data = self._git(path, "cat-file", "blob", oid).stdout
                target = dest / name
                target.parent.mkdir(exist_ok=True)  # a part folder of a recipe of parts
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
                try:
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(data)
                    os.chmod(tmp, FILE_MODE)  # not mkstemp's 0600: what any new file would get
                    os.replace(tmp, target)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
        except OSError as e:
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"Could not write {dest}: {e.strerror or e}. Free some space or pick another "
                             "folder with --to.") from e
        return dest

    def pull_to(self, resolved: Resolved, dest: str | os.PathLike, *, force: bool = False) -> Path:
        """Materialise a commit as exactly its files in ``dest``, never a mixture with what was there.

        A missing or empty ``dest`` is filled. One that holds an earlier pull, unchanged since (its
        ``.hub-pull`` marker records the files' sha256), is replaced as a whole (written aside, then swapped in);
        one holding adapter files that were not pulled there, or were changed since (a ``hub train -o`` output,
        an edit), only with ``force``; anything else is refused.

        Raises:
            FolderNotEmptyError, UnsafeFolderError, StoreError.
        """
        dest = Path(dest)
        if dest.is_symlink():
            raise UnsafeFolderError(f"'{dest}' is a symbolic link; pass the folder itself with --to.", path=dest)
        if dest.exists() and not dest.is_dir():
            raise FolderNotEmptyError(f"'{dest}' exists and is not a folder; pass a new or empty folder to --to.",
                                      path=dest)
        present = sorted(n for n in os.listdir(dest) if n != PULL_MARKER) if dest.is_dir() else []
        if not present:
            self.export(resolved, dest)
            _write_pull_marker(dest, resolved)
            return dest
        foreign = [n for n in present if not stored(n) and not (dest / n).is_dir()]
        foreign += [n for n in listing(dest) if "/" in n and not stored(n)]
        if foreign:
            raise FolderNotEmptyError(
                f"'{dest}' is not empty and holds files that are not adapter files ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}); pull into a new or empty folder, or remove them.",
                path=dest)
        if not force and not _pulled_unchanged(dest):
            raise FolderNotEmptyError(
                f"'{dest}' holds an adapter that was not pulled there, or was changed since (a 'hub train' output, "
                "an edit): a pull would replace it. Push it first ('hub push DIR ns/name'), pull into another "
                "folder, or pass --force to replace it.", path=dest)
        parent = dest.resolve().parent
        new = Path(tempfile.mkdtemp(dir=parent, prefix=f".{dest.name}.pull-"))
        old = parent / f".{dest.name}.old-{new.name.rsplit('-', 1)[-1]}"
        try:
            self.export(resolved, new)
            _write_pull_marker(new, resolved)
            os.rename(dest, old)
            try:
                os.rename(new, dest)
            except BaseException:
                os.rename(old, dest)
                raise
        except OSError as e:
            shutil.rmtree(new, ignore_errors=True)
            if isinstance(e, StoreError):
                raise
            raise StoreError(f"Could not replace {dest}: {e.strerror or e}. It is unchanged.") from e
        shutil.rmtree(old, ignore_errors=True)
        return dest

    def snapshot(self, resolved: Resolved) -> Path:
        """A read-only export at ``snapshots/<ns>/<name>/<sha>/``, created once and checked at every use against
        the commit (git blob ids): a snapshot edited since is rebuilt, never served as the pinned version.

        On a read-only store (a shared mount) the export goes to a per-user cache instead
        (:func:`_fallback_snapshots`), so reads never need write access to the store.
        """
        rel = Path(resolved.ref.namespace) / resolved.ref.name / resolved.sha
        first = self.root / "snapshots" / rel
        try:
            return self._snapshot_into(resolved, first)
        except OSError:
            pass  # read-only or otherwise unwritable here: export to the user's cache instead
        second = _fallback_snapshots(self.root) / rel
        try:
            return self._snapshot_into(resolved, second)
        except OSError as e:
            raise StoreError(f"Could not write a snapshot of {resolved.pinned} under {first.parent} or "
                             f"{second.parent}: {e.strerror or e}. Pass --to DIR to pull elsewhere.") from e

    def _intact(self, resolved: Resolved, folder: Path) -> bool:
        """Whether ``folder`` holds exactly the commit's adapter files, byte for byte (git blob ids compared)."""
        want = {n: oid for n, oid in self.files(resolved) if stored(n)}
        have = listing(folder)
        if have != sorted(want):
            return False
        for name, oid in want.items():
            f = folder / name
            if f.is_symlink() or not f.is_file():
                return False
            data = f.read_bytes()
            algo = hashlib.sha256 if len(oid) == 64 else hashlib.sha1
            if algo(b"blob %d\0" % len(data) + data).hexdigest() != oid:
                return False
        return True

    def _snapshot_into(self, resolved: Resolved, final: Path) -> Path:
        if final.is_dir():
            if self._intact(resolved, final):
                return final
            # Edited or damaged since it was written: never served under the commit's sha. Moved aside and rebuilt.
            stale = final.parent / f".{final.name}.stale-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{resolved.sha}."))
        try:
            self.export(resolved, tmp)
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.is_dir():
                raise
        return final

    def load(self, repo_id: str) -> composer.Adapter | composer.Parts:
        """Load ``ns/name[@rev]`` with its ``source`` pinned to ``ns/name@<commit sha>`` (a recipe of parts as a
        :class:`composer.Parts`)."""
        resolved = self.resolve(repo_id)
        adapter = composer.load_any(self.snapshot(resolved))
        return dataclasses.replace(adapter, source=resolved.pinned)

    # --- writing ------------------------------------------------------------------------------------

    def stage(self, folder: Path, staging: Path) -> tuple[composer.Adapter | Checked, tuple[str, ...]]:
        """Copy ``folder``'s adapter files into ``staging`` and validate both (the folder may change under us).

        Each is validated by the quick check (:func:`composer.precheck.check`: no torch, no PEFT) where it can
        decide, else by :func:`composer.load`, which also says what is wrong.

        Returns:
            What the card needs of the staged adapter (its kind, config and recipe), and the names of the
            files left out (not adapter files).
        """
        from composer import precheck  # here, not above: `hub --help` and `hub log` need none of it

        if not folder.is_dir() and not folder.is_symlink():
            raise composer.AdapterFormatError(f"'{shown(folder)}' is not a folder. Pass the folder that holds "
                                              "adapter_config.json.", path=folder)
        check_folder(folder)  # before anything reads through a link
        if composer.parts.is_parts(folder):
            for name, _ in composer.parts.read_manifest(folder):  # each a plain name inside the folder
                check_folder(folder / name)
            composer.load_any(folder)  # errors name the user's folder
            # the manifest, recipe and card here; each part in its own folder
            skipped = [n for n in copy_files(folder, staging, ("parts.json", "recipe.json", "README.md"))
                       if not (folder / n).is_dir()]
            skipped += self._stage_parts(folder, staging)
            # What is stored is the staged copy, so validate that too (the folder may change under us).
            adapter = composer.load_any(staging)
        else:
            if precheck.check(folder) is None:  # RoAd, LoRA, prompt vectors: decided without torch or PEFT
                composer.load(folder)  # errors name the user's folder
            skipped = list(copy_files(folder, staging, tuple(n for n in ADAPTER_FILES if n != "parts.json")))
            adapter = precheck.check(staging) or composer.load(staging)  # the staged copy too
        if (staging / "README.md").exists():
            parse_card((staging / "README.md").read_bytes())  # reject unsafe cards before taking any lock
        return adapter, tuple(skipped)

    @staticmethod
    def _stage_parts(folder: Path, staging: Path) -> list[str]:
        """Copy the part folders the staged ``parts.json`` lists, as :func:`hub.staging.copy_files` copies any
        folder (no links, plain files only, within the limits); returns what was left out (other folders too)."""
        from composer.parts import PART_FILES, read_manifest

        listed = [name for name, _ in read_manifest(staging)]  # names checked: one plain name each, never a path
        skipped = [n for n in sorted(os.listdir(folder)) if (folder / n).is_dir() and n not in listed
                   and not n.startswith(".")]
        for name in listed:
            check_folder(folder / name)  # the part folder itself a link, or a link inside it: refused
            (staging / name).mkdir()
            skipped += [f"{name}/{n}" for n in copy_files(folder / name, staging / name, PART_FILES)]
        return skipped

    def _tree(self, path: Path, staging: Path) -> str:
        """Write the staged files as git objects; returns the tree (part folders as subtrees)."""
        def tree_of(folder: Path, names: list[str], subtrees: dict[str, str]) -> str:
            oids = self._out(path, "hash-object", "-w", "--no-filters", "--stdin-paths",
                             input="".join(f"{folder / n}\n" for n in names).encode()).split() if names else []
            rows = [f"100644 blob {o}\t{n}\0" for n, o in zip(names, oids)]
            rows += [f"040000 tree {o}\t{n}\0" for n, o in subtrees.items()]
            return self._out(path, "mktree", "-z", input="".join(rows).encode())

        subtrees = {}
        if (staging / "parts.json").exists():  # only a recipe of parts is staged with one (stage)
            from composer.parts import PART_FILES, read_manifest

            for name, _ in read_manifest(staging):
                files = sorted(n for n in os.listdir(staging / name) if n in PART_FILES)
                subtrees[name] = tree_of(staging / name, files, {})
        return tree_of(staging, sorted(n for n in os.listdir(staging) if n in ADAPTER_FILES), subtrees)

    def push(self, folder: str | os.PathLike, repo_id: str, *, tag: str | None = None, message: str | None = None,
             force: bool = False, allow_empty: bool = False, extra_refs: dict[str, str] | None = None,
             extra_tags: tuple[str, ...] = (), auto_version: bool = True, keep_card: bool = False,
             on_commit: Callable[[PushResult], None] | None = None) -> PushResult:
        """Validate ``folder`` and store it as one new commit on ``main``, tagged ``vN`` (or ``tag``).

        Args:
            folder: a PEFT adapter folder.
            repo_id: ``namespace/name`` (no ``@rev``).
            tag: the tag to create instead of the next ``vN``; one that looks like an automatic version
                (``v<digits>``) needs ``force``, so the numbering stays the store's.
            message: commit message (default ``"Push vN"``).
            force: move ``tag`` if it already exists, or take a ``v<digits>`` name.
            allow_empty: make a new version even when the content equals the latest one (by default such a
                push changes nothing and returns ``unchanged=True``; with ``tag`` it only tags that version).
            extra_refs: further refs to point at the new commit (``refs/hf/<sha>`` after a remote pull).
            extra_tags: tags to create too where they do not exist yet (a remote's tags, on pull).
            auto_version: when ``tag`` is ``None``, tag the next ``vN`` (else leave the commit untagged
                unless ``extra_tags`` tag it).
            keep_card: store the folder's README.md byte for byte (after the safety check) instead of
                updating its front matter; used when recording a pull.
            on_commit: called with the result as soon as the version is recorded, while Ctrl-C is still held
                (:mod:`hub.interrupts`): a caller that must not report a recorded push as interrupted (the
                command line) learns it before any Ctrl-C can reach it.

        Returns:
            A :class:`PushResult` with the new commit sha and tag (or, when unchanged, the latest ones).

        Raises:
            InvalidIdError, composer.ComposerError (the folder is not a valid adapter, an unsafe card),
            TagExistsError, ReservedTagError.
        """
        ref = parse_id(repo_id, allow_revision=False)
        if tag is not None:
            tag = check_tag(tag)
        folder = Path(folder)
        with self.staging_dir() as staging_name:
            staging = Path(staging_name)
            adapter, skipped = self.stage(folder, staging)
            _pause("validate")
            with self.lock(ref):
                _pause("lock")
                spellings = [f.repo_id for f in self._spellings(ref)]
                new = not spellings
                taken = [f for f in spellings if f != ref.repo_id]
                if taken and ref.repo_id not in spellings:
                    raise InvalidIdError(
                        f"'{ref.repo_id}' is taken: the store holds '{taken[0]}', and ids that differ only in case "
                        "are one repository on the Hugging Face Hub. Push to "
                        f"'{taken[0]}' for a new version of it, or pick another name.", value=ref.repo_id)
                path = self._init(ref)
                clear_stale_git_locks(path)  # we hold the lock: git lock files here are a dead writer's
                parent = self._rev(path, f"refs/heads/{BRANCH}")
                tags = self.tags(ref)
                try:
                    if tag is not None:
                        check_tag(tag, branches=self.branches(path))
                    if tag is None and auto_version:
                        tag = next_version(tags)
                    elif tag is not None:
                        if tag in tags and not force:
                            raise TagExistsError(
                                f"Tag '{tag}' of '{ref.repo_id}' already points at {tags[tag][:12]}; tags never "
                                "move silently. Pick another tag, or pass --force to move it.",
                                repo_id=ref.repo_id, tag=tag, target=tags[tag])
                        check_reserved(ref.repo_id, tag, force=force)
                except HubError:
                    if new:  # a refused first push leaves no empty repository behind
                        shutil.rmtree(path, ignore_errors=True)
                    raise

                def previous() -> bytes | None:
                    if parent is None:
                        return None
                    p = self._git(path, "cat-file", "blob", f"{parent}:README.md", check=False)
                    if p.returncode == 0:
                        return p.stdout
                    if b"does not exist" in p.stderr:  # that version had no card
                        return None
                    raise StoreError(git_failure("cat-file", path, p.stderr.decode(errors="replace")))

                if not (keep_card and (staging / "README.md").exists()):
                    write_card(staging, adapter, previous, ref.repo_id)
                tree = self._tree(path, staging)
                if (parent is not None and auto_version and not allow_empty and not extra_refs
                        and tree == self._out(path, "rev-parse", f"{parent}^{{tree}}")):
                    return self._unchanged(path, ref, parent, tags, tag if tag not in (None, next_version(tags))
                                           else None, force, skipped)
                _pause("objects")
                msg = message or f"Push {tag or 'adapter'}"
                args = ["commit-tree", tree, "-F", "-"] + (["-p", parent] if parent else [])
                sha = self._out(path, *args, input=msg.encode("utf-8"))
                _pause("commit")
                lines = ["start", f"update refs/heads/{BRANCH} {sha} {parent or _ZERO}"]
                if tag is not None:
                    lines.append(f"update refs/tags/{tag} {sha}" if force and tag in tags
                                 else f"create refs/tags/{tag} {sha}")
                for t in extra_tags:
                    try:
                        check_tag(t, branches=self.branches(path))
                    except InvalidIdError:
                        continue  # a remote's tag we cannot mirror safely; the remote still resolves it
                    if t not in tags and t != tag:
                        lines.append(f"create refs/tags/{t} {sha}")
                for r, target in (extra_refs or {}).items():
                    lines.append(f"update {r} {target or sha}")
                lines += ["prepare", "commit", ""]
                with held():  # recorded whole or not at all, and a recorded push is reported as one
                    p = self._git(path, "update-ref", "--stdin", input="\n".join(lines).encode(), check=False,
                                  detached=True)
                    if p.returncode != 0:
                        raise StoreError(f"Could not record the push in {path}: "
                                         f"{_one_line(p.stderr.decode(errors='replace'))}. Nothing was changed.")
                    result = PushResult(ref.repo_id, sha, tag, parent, skipped)
                    if on_commit is not None:
                        on_commit(result)
                    _pause("refs")
                    self._refresh_worktree(path)
        return result

    def _unchanged(self, path: Path, ref: RepoRef, head: str, tags: dict[str, str], tag: str | None,
                   force: bool, skipped: tuple[str, ...]) -> PushResult:
        """A push whose content equals ``main``: no new version; an explicit ``tag`` tags the latest one."""
        if tag is not None:
            self._git(path, "update-ref", f"refs/tags/{tag}", head, tags.get(tag, _ZERO) if force else _ZERO)
            return PushResult(ref.repo_id, head, tag, head, skipped, unchanged=True)
        on_head = sort_tags(t for t, sha in tags.items() if sha == head)
        versions = [t for t in on_head if version_number(t) is not None]
        return PushResult(ref.repo_id, head, (versions or on_head or [None])[-1], head, skipped, unchanged=True)

    def _refresh_worktree(self, path: Path) -> None:
        # Holding our lock, a leftover index.lock can only come from a killed push of ours.
        (path / ".git" / "index.lock").unlink(missing_ok=True)
        self._git(path, "reset", "-q", "--hard", f"refs/heads/{BRANCH}", check=False)

    def tag(self, repo_id: str, tag: str, *, force: bool = False) -> Resolved:
        """Point ``tag`` at ``repo_id@rev``; an existing tag moves only with ``force``.

        Raises:
            TagExistsError: the tag exists. ReservedTagError: ``tag`` looks like an automatic version (``v3``)
            and ``force`` was not given (the next push would skip that number).
        """
        tag = check_tag(tag)
        resolved = self.resolve(repo_id)
        path = self._require(resolved.ref)
        with self.lock(resolved.ref):
            clear_stale_git_locks(path)
            check_tag(tag, branches=self.branches(path))
            tags = self.tags(resolved.ref)
            if tag in tags and not force:
                raise TagExistsError(
                    f"Tag '{tag}' of '{resolved.ref.repo_id}' already points at {tags[tag][:12]}. "
                    "Pass --force to move it.", repo_id=resolved.ref.repo_id, tag=tag, target=tags[tag])
            check_reserved(resolved.ref.repo_id, tag, force=force)
            old = tags.get(tag, _ZERO)
            self._git(path, "update-ref", f"refs/tags/{tag}", resolved.sha, old)
        return resolved

    def fsck(self, repo_id: str) -> subprocess.CompletedProcess:
        """``git fsck --full --strict`` of one repository (for checks and tests)."""
        return self._git(self._require(parse_id(repo_id, allow_revision=False)), "fsck", "--full", "--strict",
                         check=False)


def close_ids(wanted: str, ids: list[str], *, n: int = 3, cutoff: float = 0.7) -> tuple[str, ...]:
    """The ids in ``ids`` closest to ``wanted`` (a typo in the namespace or the name), best first: the product
    of the two parts' similarities (difflib), so that a shared namespace alone ('examples/...') suggests
    nothing."""
    ns, _, name = wanted.partition("/")
    scored = []
    for i in ids:
        ins, _, iname = i.partition("/")
        score = (difflib.SequenceMatcher(None, ns, ins).ratio()
                 * difflib.SequenceMatcher(None, name, iname).ratio())
        if score >= cutoff:
            scored.append((-score, i))
    return tuple(i for _, i in sorted(scored)[:n])


def _one_line(text: str, limit: int = 400) -> str:
    """git's stderr as one line (its hints span several), shortened to ``limit`` characters."""
    text = " ".join(line.strip() for line in text.splitlines() if line.strip()).rstrip(".")
    return text if len(text) <= limit else text[:limit] + " ..."


def git_failure(command: str, repo: Path, stderr: str) -> str:
    """The message for a git command that failed in ``repo``: what git said, on one line, and what to check."""
    return (f"git {command} failed in {repo}: {_one_line(stderr) or 'no message'}. Check that you can read the "
            f"store (ls -l {repo}) and that the repository is sound (git -C {repo} fsck).")


def _ownership_message(repo: Path, root: Path) -> str:
    """git refuses a repository that another user owns (since 2.35.2, "dubious ownership"): say whose it is and
    the three ways out, instead of git's three lines (and never an empty answer)."""
    import pwd

    def name(uid: int) -> str:
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return str(uid)

    def user(uid: int) -> str:
        return f"{name(uid)} (uid {uid})" if name(uid) != str(uid) else f"uid {uid}"

    me = os.geteuid()
    owner = None
    for p in (repo, repo / ".git"):
        with contextlib.suppress(OSError):
            if p.stat().st_uid != me:
                owner = p.stat().st_uid
                break
    whose = f"is owned by {user(owner)}, not by you ({name(me)})" if owner is not None else \
        "is owned by another user (git says so of it or of a folder above it)"
    return (f"The store's repository {repo} {whose}, and git refuses to read another user's repository "
            f"(\"dubious ownership\"). Run hub as its owner, take the store over with 'chown -R "
            f"{name(me)} {root}', or trust this repository with "
            f"'git config --global --add safe.directory {repo}'.")


def check_reserved(repo_id: str, tag: str, *, force: bool) -> None:
    """Refuse a hand-made tag shaped like an automatic version (``v<digits>``) unless ``force``."""
    if version_number(tag) is not None and not force:
        raise ReservedTagError(
            f"Tag '{tag}' looks like an automatic version; versions v1, v2, ... are numbered by 'hub push', and "
            f"taking one by hand makes the next push skip it. Pick a name such as 'stable' or 'release-{tag[1:]}', "
            "or pass --force to take it anyway.", repo_id=repo_id, tag=tag)


def write_card(staging: Path, adapter: composer.Adapter | Checked, previous: Callable[[], bytes | None],
               repo_id: str) -> None:
    """The card a push stores: the folder's own README.md (else the previous version's, from ``previous()``)
    with the required metadata merged in (:func:`composer.card.build_card`). Used by the store and the remote."""
    own = staging / "README.md"
    existing = own.read_bytes() if own.exists() else previous()
    own.write_text(build_card(adapter, existing, repo_id=repo_id), encoding="utf-8")


def _folder_digests(folder: Path) -> dict[str, str]:
    from composer.data import file_sha256

    return {n: file_sha256(folder / n) for n in listing(folder) if stored(n)}


def _write_pull_marker(folder: Path, resolved: Resolved) -> None:
    record = {"id": resolved.ref.repo_id, "sha": resolved.sha, "files": _folder_digests(folder)}
    (folder / PULL_MARKER).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def _pulled_unchanged(folder: Path) -> bool:
    """Whether ``folder`` holds exactly what a pull wrote there (its marker's files, byte for byte)."""
    marker = folder / PULL_MARKER
    try:
        if marker.is_symlink() or marker.stat().st_size > 1 << 16:
            return False
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("files") == _folder_digests(folder)
