"""Errors raised by :mod:`hub`.

Each subclasses :class:`HubError` and the builtin it resembles, and says what to do next. Format errors
in an adapter folder and unsafe model cards come from :mod:`composer` unchanged
(``composer.AdapterFormatError``, ``composer.InvalidCardError``, re-exported here as ``InvalidCardError``).

    HubError
    ├── InvalidIdError(ValueError)            'a/../b', '/abs', 'a//b', control characters
    ├── UnsafeFolderError(ValueError)         a pushed folder holds a symbolic link or a non-regular file
    ├── FolderNotEmptyError(FileExistsError)  'pull --to' a folder that holds something else
    ├── LockTimeoutError(TimeoutError)        another writer held the repository's lock too long
    ├── RepositoryNotFoundError(LookupError)  no such adapter in the store / on the remote
    ├── RevisionNotFoundError(LookupError)    no such tag, branch or commit
    ├── TagExistsError(ValueError)            a tag exists and --force was not given
    ├── ReservedTagError(ValueError)          a tag that looks like an automatic version (v7) without --force
    ├── PushConflictError(RuntimeError)       someone else pushed first (remote parent_commit moved)
    ├── IntegrityError(ValueError)            a downloaded file does not match the remote's checksum
    ├── RemoteAccessError(PermissionError)    unauthorised or gated on the remote
    ├── RemoteUnavailableError(ConnectionError) the remote cannot be reached
    └── StoreError(OSError)                   git failed underneath the store
        └── StoreAccessError                  git refuses the store's repository (another user owns it)
"""

from __future__ import annotations

from composer.errors import InvalidCardError  # noqa: F401 - the card rules are composer's (composer.card)


class HubError(Exception):
    """Base class of every error raised by :mod:`hub`."""


class InvalidIdError(HubError, ValueError):
    """A repository id or revision is malformed. Attributes: ``value`` (the offending input)."""

    def __init__(self, message: str, *, value: object = None) -> None:
        super().__init__(message)
        self.value = value


class UnsafeFolderError(HubError, ValueError):
    """A pushed folder is, or holds, a symbolic link or something that is not a plain file.

    Attributes: ``path`` (the offending entry).
    """

    def __init__(self, message: str, *, path: object = None) -> None:
        super().__init__(message)
        self.path = path


class FolderNotEmptyError(HubError, FileExistsError):
    """A pull's destination holds files that are not an earlier pull's. Attributes: ``path``."""

    def __init__(self, message: str, *, path: object = None) -> None:
        super().__init__(message)
        self.path = path


class LockTimeoutError(HubError, TimeoutError):
    """A lock stayed held by another process past the timeout. Attributes: ``path``, ``owner``, ``waited``."""

    def __init__(self, message: str, *, path: object = None, owner: str | None = None,
                 waited: float | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.owner = owner
        self.waited = waited


class RepositoryNotFoundError(HubError, LookupError):
    """No such adapter. Attributes: ``repo_id``, ``suggestions`` (close ids in the store, best first)."""

    def __init__(self, message: str, *, repo_id: str | None = None,
                 suggestions: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.suggestions = suggestions


class RevisionNotFoundError(HubError, LookupError):
    def __init__(self, message: str, *, repo_id: str | None = None, revision: str | None = None,
                 available: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.revision = revision
        self.available = available


class TagExistsError(HubError, ValueError):
    def __init__(self, message: str, *, repo_id: str | None = None, tag: str | None = None,
                 target: str | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.tag = tag
        self.target = target


class ReservedTagError(HubError, ValueError):
    """A hand-made tag that looks like an automatic version (``v<digits>``); pass ``force`` to take it anyway."""

    def __init__(self, message: str, *, repo_id: str | None = None, tag: str | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.tag = tag


class PushConflictError(HubError, RuntimeError):
    def __init__(self, message: str, *, repo_id: str | None = None, expected: str | None = None,
                 actual: str | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.expected = expected
        self.actual = actual


class IntegrityError(HubError, ValueError):
    def __init__(self, message: str, *, path: str | None = None, expected: str | None = None,
                 actual: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.expected = expected
        self.actual = actual


class RemoteAccessError(HubError, PermissionError):
    """Unauthorised (401/403) or gated on the remote."""


class RemoteUnavailableError(HubError, ConnectionError):
    """The remote could not be reached (network down, wrong ``HF_ENDPOINT``, offline mode)."""


class StoreError(HubError, OSError):
    """A git command under the store failed unexpectedly."""


class StoreAccessError(StoreError):
    """git refuses to read a repository of the store: another user owns it ("dubious ownership").

    Attributes: ``path`` (the repository).
    """

    def __init__(self, message: str, *, path: object = None) -> None:
        super().__init__(message)
        self.path = path
