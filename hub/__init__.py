"""hub: versioned storage for adapters — a local git-backed store and the Hugging Face Hub as a remote.

A library: it imports :mod:`composer` and nothing above it. The ``hub`` command line lives at the top of the
house, in :mod:`app.cli`.

Python API (same semantics as the CLI)::

    hub.push("out/math", "alice/math")                 # -> PushResult(sha=..., tag="v1")
    hub.pull("alice/math@v1", to="math-v1")            # -> Path
    hub.log("alice/math")                              # -> [{"sha", "tags", "message", "date"}, ...]
    hub.resolve("alice/math@v1")                       # -> Resolved(ref, sha)
    hub.load("alice/math@v1")                          # -> composer adapter, source pinned to the sha
    hub.compose("0.5*alice/math + 0.5*bob/code", "team/mix")

Not to be confused with Activeloop's ``hub`` package on PyPI, which uses the same import name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import composer

from .errors import (
    FolderNotEmptyError,
    HubError,
    IntegrityError,
    InvalidCardError,
    InvalidIdError,
    LockTimeoutError,
    PushConflictError,
    RemoteAccessError,
    RemoteUnavailableError,
    RepositoryNotFoundError,
    ReservedTagError,
    RevisionNotFoundError,
    StoreAccessError,
    StoreError,
    TagExistsError,
    UnsafeFolderError,
)
from .ids import RepoRef, parse_id
from .store import PushResult, Resolved, Store, default_root

__all__ = [
    "push", "pull", "log", "resolve", "load", "compose", "composition_notes", "training_record", "tag",
    "list_adapters",
    "Store", "Resolved", "PushResult", "RepoRef", "parse_id", "default_root",
    "HubError", "InvalidIdError", "InvalidCardError", "RepositoryNotFoundError", "RevisionNotFoundError",
    "TagExistsError", "ReservedTagError", "UnsafeFolderError", "PushConflictError", "IntegrityError",
    "RemoteAccessError", "RemoteUnavailableError", "StoreError", "StoreAccessError", "FolderNotEmptyError",
    "LockTimeoutError",
]

REMOTES = ("hf",)


def _remote(remote: str | None, api: Any, store: Store):
    if remote is None:
        return None
    if remote not in REMOTES:
        raise ValueError(f"Unknown remote {remote!r}; use one of: {', '.join(REMOTES)} "
                         "(the server comes from HF_ENDPOINT).")
    from .remote import HfRemote
    return HfRemote(api, store=store)


def push(folder: str | os.PathLike, repo_id: str, *, tag: str | None = None, message: str | None = None,
         force: bool = False, allow_empty: bool = False, remote: str | None = None, api: Any = None,
         root: str | os.PathLike | None = None, on_commit: Callable[[PushResult], None] | None = None):
    """Validate ``folder`` and store it as a new version of ``repo_id``.

    Args:
        folder: a PEFT adapter folder (RoAd or task prompt vector).
        repo_id: ``namespace/name``.
        tag: tag instead of the next ``vN``; an existing tag is an error unless ``force``.
        message: commit message.
        force: move an existing ``tag``, or take a tag shaped like an automatic version (``v7``).
        allow_empty: make a new version even if the content equals the latest one (local store only; by
            default such a push returns ``unchanged=True`` and makes none).
        remote: ``None`` for the local store, ``"hf"`` for the Hugging Face Hub (``HF_ENDPOINT``).
        api: an ``HfApi``-like object for the remote (tests inject one).
        root: store root (default ``$ADAPTER_HUB_HOME``).
        on_commit: local store only: called with the result the moment the version is recorded, before a
            Ctrl-C held meanwhile is raised (:mod:`hub.interrupts`).

    Returns:
        :class:`PushResult` (local) or ``hub.remote.RemotePushResult``, each with ``sha``, ``tag``, ``pinned``.

    Raises:
        InvalidIdError, composer.ComposerError, InvalidCardError, TagExistsError, ReservedTagError, and for
        the remote
        PushConflictError, RemoteAccessError, RemoteUnavailableError.
    """
    store = Store(root)
    r = _remote(remote, api, store)
    if r is not None:
        return r.push(folder, repo_id, tag=tag, message=message, force=force)
    return store.push(folder, repo_id, tag=tag, message=message, force=force, allow_empty=allow_empty,
                      on_commit=on_commit)


def pull(repo_id: str, *, to: str | os.PathLike | None = None, remote: str | None = None, api: Any = None,
         root: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Materialise ``ns/name[@rev]`` as a validated PEFT folder.

    Returns:
        ``to`` when given, else the store's read-only snapshot folder for that commit. A ``to`` folder that
        holds adapter files not pulled there (or changed since) is replaced only with ``force``.

    Raises:
        InvalidIdError, RepositoryNotFoundError, RevisionNotFoundError, composer.ComposerError, and for the
        remote IntegrityError, RemoteAccessError, RemoteUnavailableError.
    """
    store = Store(root)
    r = _remote(remote, api, store)
    if r is not None:
        path = r.pull(repo_id, to=to, force=force)
    else:
        resolved = store.resolve(repo_id)
        path = store.pull_to(resolved, to, force=force) if to is not None else store.snapshot(resolved)
    from composer import precheck

    if precheck.check(path) is None:  # a RoAd, LoRA or prompt-vector folder is checked without torch or PEFT
        composer.load_any(path)
    return Path(path)


def log(repo_id: str, *, root: str | os.PathLike | None = None) -> list[dict]:
    """Versions of ``repo_id`` on ``main``, newest first (``sha``, ``tags``, ``message``, ``date``, ``author``)."""
    return Store(root).log(repo_id)


def resolve(repo_id: str, *, root: str | os.PathLike | None = None) -> Resolved:
    """Pin ``ns/name[@tag|branch|sha]`` to a commit sha."""
    return Store(root).resolve(repo_id)


def load(repo_id: str, *, root: str | os.PathLike | None = None) -> composer.Adapter | composer.Parts:
    """Load ``ns/name[@rev]`` from the store with ``source`` = ``ns/name@<commit sha>``; a recipe of parts (``hub
    compose "a ; b"``) as a :class:`composer.Parts`, which the engine serves as its parts on one row."""
    return Store(root).load(repo_id)


def tag(repo_id: str, name: str, *, force: bool = False, root: str | os.PathLike | None = None) -> Resolved:
    """Tag ``ns/name@rev`` as ``name``; existing tags move, and ``v<digits>`` names are taken, only with
    ``force``."""
    return Store(root).tag(repo_id, name, force=force)


def list_adapters(*, root: str | os.PathLike | None = None) -> list[dict]:
    """Every adapter in the store: ``id``, ``latest``, ``sha``, ``versions``."""
    return Store(root).list()


def training_record(repo_id: str, *, root: str | os.PathLike | None = None) -> dict | None:
    """The ``training`` record of a stored adapter's card (``hub train`` writes it), or ``None``."""
    store = Store(root)
    try:
        return _training(store, store.resolve(repo_id))
    except (HubError, composer.ComposerError, OSError):
        return None


def _training(store: Store, resolved: Resolved) -> dict | None:
    """The card's ``training`` record at ``resolved`` (``None`` when there is none, or the card cannot be read)."""
    try:
        rec = store.front_matter(resolved).get("training")
    except (HubError, composer.ComposerError, OSError):
        return None
    return rec if isinstance(rec, dict) else None


def composition_notes(expression: str, *, root: str | os.PathLike | None = None) -> list[str]:
    """Sentences saying why the adapters an expression names may not compose well in behaviour, and what to
    do (:func:`composer.advice.notes`); empty when nothing is known against them."""
    from composer.advice import notes
    from composer.expr import names, parse

    store = Store(root)
    inputs = []
    for name in dict.fromkeys(names(parse(expression))):
        resolved = store.resolve(name)  # once per name: the adapter and its card from the same commit
        adapter = composer.load_any(store.snapshot(resolved))
        if not isinstance(adapter, composer.Parts):  # composed already: its parts were noted then
            inputs.append((name, adapter, _training(store, resolved)))
    return notes(inputs)


def compose(expression: str, repo_id: str, *, message: str | None = None, tag: str | None = None,
            force: bool = False, root: str | os.PathLike | None = None,
            on_commit: Callable[[PushResult], None] | None = None) -> PushResult:
    """Evaluate a :mod:`composer` expression over store ids and push the result with its recipe.

    Every input is pinned to the commit it resolved to (``ns/name@<sha>``) in ``recipe.json`` and the card. Sides
    joined by ``;`` (``"a/lora + b/lora ; c/road ; d/prompt"``: adapters of several kinds applied together on one
    row) are stored as a recipe of parts (:mod:`composer.parts`), one PEFT folder per side. ``on_commit`` as in
    :func:`push`.
    """
    store = Store(root)
    adapter = composer.evaluate(expression, resolve=store.load)
    store.root.mkdir(parents=True, exist_ok=True)
    with store.staging_dir("compose") as tmp:
        composer.save(adapter, tmp)
        return store.push(tmp, repo_id, tag=tag, force=force, on_commit=on_commit,
                          message=message or f"Compose {expression.strip()}")
