"""Adapter ids: ``namespace/name[@revision]``, validated before they touch a path or a git command."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidIdError

_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?\Z")
_REV = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}\Z")
_VERSION = re.compile(r"v(\d+)\Z")
ID_HELP = ("ids look like 'namespace/name' (e.g. 'alice/math'): two parts of 1-96 letters, digits, '_', '-' or "
           "'.', not starting or ending with '.' or '-', no '..' or '--', not ending in '.git', case ignored (the "
           "Hugging Face Hub's rules); add '@v2', '@main' or '@<commit sha>' to pick a version")


@dataclass(frozen=True)
class RepoRef:
    """A parsed id. ``revision`` is ``None`` when the id names no version (meaning the latest)."""

    namespace: str
    name: str
    revision: str | None = None

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def _text(value: object) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidIdError(f"Invalid adapter id {value!r}: it is not UTF-8 text; {ID_HELP}.",
                                 value=value) from e
    if not isinstance(value, str):
        raise InvalidIdError(f"Invalid adapter id {value!r}: expected a string; {ID_HELP}.", value=value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # surrogate-escaped bytes from a non-UTF-8 argv
        raise InvalidIdError(f"Invalid adapter id {value!r}: it holds bytes that are not UTF-8; {ID_HELP}.",
                             value=value) from e
    return value


def _reason(repo_id: str) -> str | None:
    if not repo_id:
        return "it is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in repo_id):
        return "it holds a control character"
    if repo_id.startswith("/") or re.match(r"[A-Za-z]:[\\/]", repo_id):
        return "it is an absolute path"
    if "\\" in repo_id:
        return "it holds a backslash"
    parts = repo_id.split("/")
    if any(p in (".", "..") for p in parts) or ".." in repo_id:
        return "it holds '..'"
    if any(p == "" for p in parts):
        return "it has an empty part"
    if len(parts) != 2:
        return f"it has {len(parts)} part{'s' if len(parts) != 1 else ''}, not 2"
    for p in parts:
        if not _PART.match(p):
            return f"part {p!r} is not allowed"
    if "--" in repo_id:
        return "it holds '--'"
    if repo_id.endswith(".git"):
        return "it ends in '.git'"
    return None


def parse_id(value: object, *, allow_revision: bool = True) -> RepoRef:
    """Parse and validate ``namespace/name[@rev]``.

    Raises:
        InvalidIdError: with what is wrong and what a valid id looks like.
    """
    text = _text(value)
    repo_id, sep, rev = text.partition("@")
    reason = _reason(repo_id)
    if reason is None and sep:
        if not allow_revision:
            reason = "a version ('@...') is not allowed here"
        else:
            reason = revision_reason(rev)
    if reason:
        raise InvalidIdError(f"Invalid adapter id {text!r}: {reason}; {ID_HELP}.", value=value)
    ns, name = repo_id.split("/")
    return RepoRef(ns, name, rev if sep else None)


def revision_reason(rev: str) -> str | None:
    if not rev:
        return "the version after '@' is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in rev):
        return "the version holds a control character"
    if not _REV.match(rev) or ".." in rev or "//" in rev or rev.endswith(("/", ".", ".lock")):
        return f"version {rev!r} is not a valid tag, branch or commit sha"
    return None


# Names a tag may not take: a revision is looked up as a tag first, so a tag called like a branch or a commit
# would make Hugging Face clients (which default to the branch) and `hub pull` disagree on what it means.
RESERVED_TAGS = frozenset(("main", "HEAD"))
_FULL_SHA = re.compile(r"[0-9a-fA-F]{40}\Z")


def check_tag(tag: object, *, branches: frozenset[str] | set[str] = frozenset()) -> str:
    """Validate a tag name (``v3``, ``stable``, ``2024-06``).

    Args:
        tag: the proposed name.
        branches: the repository's branch names, which a tag may not shadow.

    Raises:
        InvalidIdError: a malformed name, or one that is a branch's name or looks like a commit sha.
    """
    text = _text(tag)
    if not _TAG.match(text) or ".." in text or text.endswith((".", ".lock")):
        raise InvalidIdError(
            f"Invalid tag {text!r}: tags are 1-100 letters, digits, '_', '-' or '.', starting with a letter, "
            "digit or '_' (e.g. 'v3', 'stable').", value=tag)
    if text in RESERVED_TAGS or text in branches:
        raise InvalidIdError(
            f"Invalid tag {text!r}: it is the name of a branch, so 'name@{text}' would mean two versions "
            "(Hugging Face clients read the branch, 'hub pull' the tag). Pick another tag, e.g. 'stable'.",
            value=tag)
    if _FULL_SHA.match(text):
        raise InvalidIdError(f"Invalid tag {text!r}: it looks like a commit sha, so 'name@{text}' would be "
                             "ambiguous. Pick another tag, e.g. 'stable'.", value=tag)
    return text


def version_number(tag: str) -> int | None:
    """``N`` for an automatic version tag ``vN``, else ``None``."""
    m = _VERSION.match(tag)
    return int(m.group(1)) if m else None


def next_version(tags) -> str:
    """The next automatic version after ``tags`` (any iterable of tag names): ``v1``, ``v2``, ..."""
    nums = [n for t in tags if (n := version_number(t)) is not None]
    return f"v{max(nums, default=0) + 1}"


def sort_tags(names) -> list[str]:
    """Versions first in numeric order (v1, v2, v10), then other tags by name."""
    def key(t: str):
        n = version_number(t)
        return (0, n, "") if n is not None else (1, 0, t)
    return sorted(names, key=key)
