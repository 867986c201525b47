"""The Hugging Face Hub remote (or any server speaking its API: ``HF_ENDPOINT``, e.g. ``hub serve``).

Push: validate locally, ``create_repo(exist_ok=True)``, exactly one ``create_commit`` whose
``parent_commit`` is the branch head we read (so a concurrent push elsewhere fails ours instead of being
overwritten), then ``create_tag``. A commit whose response is lost (network error, 5xx) is not retried
blindly: we re-read the branch head and look for our push id in the new commit's description first.

Pull: resolve the revision to a commit, ``snapshot_download`` it, check every file's sha256 (LFS) or git blob
sha1 against the server's own record from ``get_paths_info`` (huggingface_hub checks sizes only), validate
with :mod:`composer`, and record it in the local store (``refs/hf/<remote sha>`` plus the remote's tags)
so it works offline afterwards.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer.data import file_sha256

from .errors import (
    HubError,
    IntegrityError,
    PushConflictError,
    RemoteAccessError,
    RemoteUnavailableError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    TagExistsError,
)
from .ids import check_tag, next_version, parse_id
from .store import ADAPTER_FILES, BRANCH, PushResult, Store, check_reserved, write_card

_SHA40 = __import__("re").compile(r"[0-9a-f]{40}\Z")
_MARKER = "hub-push-id:"


def _endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set: the one reading of it (the app asks here too).

    huggingface_hub reads the variable once at import; it is read again so a later setting counts too, with
    huggingface_hub's own rule for true values (``1``, ``ON``, ``YES``, ``TRUE``, any case).
    """
    from huggingface_hub import constants
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES
    return env or bool(constants.HF_HUB_OFFLINE)


def _status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def _is_network(e: BaseException) -> bool:
    """True when a request may or may not have reached the server (so its effect is unknown)."""
    try:
        import httpx2
        if isinstance(e, httpx2.TransportError):
            return True
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    try:
        import httpx
        if isinstance(e, httpx.TransportError):
            return True
    except ImportError:  # pragma: no cover
        pass
    status = _status(e)
    if status is not None:
        return status >= 500
    return isinstance(e, (ConnectionError, TimeoutError))


def map_error(e: BaseException, repo_id: str, action: str) -> HubError | None:
    """Translate a huggingface_hub error into ours (with the next step), or ``None`` if unknown."""
    from huggingface_hub import errors as hf

    where = _endpoint()
    if isinstance(e, hf.OfflineModeIsEnabled):
        return RemoteUnavailableError(
            f"Cannot {action} '{repo_id}': HF_HUB_OFFLINE is set. Unset it to reach {where}, or drop "
            "'--remote hf' to use the local store.")
    if isinstance(e, hf.GatedRepoError):
        return RemoteAccessError(
            f"'{repo_id}' on {where} is gated: request access on its page, then log in with 'hf auth login'.")
    if isinstance(e, hf.RevisionNotFoundError):
        return RevisionNotFoundError(f"Revision not found in '{repo_id}' on {where}. Run "
                                     f"'hf download {repo_id} --dry-run' or check its tags.", repo_id=repo_id)
    if isinstance(e, hf.RepositoryNotFoundError):
        return RepositoryNotFoundError(
            f"'{repo_id}' was not found on {where} (or it is private and you are not logged in). Check the id, "
            "or log in with 'hf auth login' / set HF_TOKEN.", repo_id=repo_id)
    status = _status(e)
    if status in (401, 403):
        return RemoteAccessError(
            f"Not allowed to {action} '{repo_id}' on {where} (HTTP {status}). Log in with 'hf auth login' or "
            "set HF_TOKEN to a token with write access.")
    if status in (409, 412):
        return PushConflictError(
            f"'{repo_id}' on {where} changed while pushing (HTTP {status}): someone else pushed first. "
            f"Nothing of yours was written; run the push again to build on their version.", repo_id=repo_id)
    if _is_network(e):
        return RemoteUnavailableError(
            f"Cannot reach {where} to {action} '{repo_id}' ({type(e).__name__}). Check the network or "
            "HF_ENDPOINT, then retry; the local store still works offline.")
    return None


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class RemotePushResult:
    repo_id: str
    sha: str
    tag: str
    parent: str | None
    endpoint: str

    @property
    def pinned(self) -> str:
        return f"{self.repo_id}@{self.sha}"


class HfRemote:
    """Push to / pull from a Hugging Face Hub-compatible server.

    Args:
        api: an ``HfApi``-like object (injected in tests); default ``huggingface_hub.HfApi()``, which reads
            ``HF_ENDPOINT`` and the token from huggingface_hub's usual places.
        store: the local store pulls are recorded in.
        max_attempts: how many times a commit whose response was lost may be sent in total.
    """

    def __init__(self, api: Any = None, *, store: Store | None = None, max_attempts: int = 3) -> None:
        if api is None:
            from huggingface_hub import HfApi
            api = HfApi()
        self.api = api
        self.store = store or Store()
        self.max_attempts = max_attempts

    def _call(self, repo_id: str, action: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HubError:
            raise
        except Exception as e:
            mapped = map_error(e, repo_id, action)
            if mapped is None:
                raise
            raise mapped from e

    def _refs(self, repo_id: str) -> tuple[str | None, dict[str, str]]:
        refs = self._call(repo_id, "read", self.api.list_repo_refs, repo_id)
        head = next((b.target_commit for b in refs.branches if b.name == BRANCH), None)
        return head, {t.name: t.target_commit for t in refs.tags}

    # --- push ---------------------------------------------------------------------------------------

    def push(self, folder: str | os.PathLike, repo_id: str, *, tag: str | None = None,
             message: str | None = None, force: bool = False, private: bool | None = None) -> RemotePushResult:
        """Validate ``folder`` and push it as one commit on ``main`` plus one tag (``vN`` or ``tag``).

        Raises:
            InvalidIdError, composer.ComposerError, InvalidCardError, TagExistsError, PushConflictError,
            RemoteAccessError, RemoteUnavailableError.
        """
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        ref = parse_id(repo_id, allow_revision=False)
        repo_id = ref.repo_id
        if tag is not None:
            tag = check_tag(tag)
        self.store.root.mkdir(parents=True, exist_ok=True)
        with self.store.staging_dir() as staging_name:
            staging = Path(staging_name)
            adapter, _ = self.store.stage(Path(folder), staging)

            def previous() -> bytes | None:
                try:
                    return self.store.read(self.store.resolve(repo_id), "README.md")
                except HubError:
                    return None

            write_card(staging, adapter, previous, repo_id)
            self._call(repo_id, "create", self.api.create_repo, repo_id, exist_ok=True, private=private)
            head, tags = self._refs(repo_id)
            if tag is None:
                tag = next_version(tags)
            elif tag in tags and not force:
                raise TagExistsError(f"Tag '{tag}' of '{repo_id}' on {_endpoint()} already points at "
                                     f"{tags[tag][:12]}. Pick another tag, or pass --force to move it.",
                                     repo_id=repo_id, tag=tag, target=tags[tag])
            else:
                check_reserved(repo_id, tag, force=force)
            names = sorted(n for n in os.listdir(staging) if n in ADAPTER_FILES)
            present = set()
            if head is not None:
                present = set(self._call(repo_id, "read", self.api.list_repo_files, repo_id, revision=head))
            marker = f"{_MARKER} {uuid.uuid4()}"
            msg = message or f"Push {tag}"
            sha = None
            for attempt in range(self.max_attempts):
                ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(staging / n)) for n in names]
                ops += [CommitOperationDelete(path_in_repo=n) for n in sorted(present)
                        if n in ADAPTER_FILES and n not in names]
                try:
                    info = self.api.create_commit(repo_id, ops, commit_message=msg, commit_description=marker,
                                                  parent_commit=head, revision=BRANCH)
                    sha = info.oid
                    break
                except Exception as e:
                    mapped = map_error(e, repo_id, "push to")
                    if not isinstance(mapped, RemoteUnavailableError) or attempt == self.max_attempts - 1:
                        if isinstance(mapped, RemoteUnavailableError):
                            sha = self._landed(repo_id, head, marker)
                            if sha:
                                break
                        if mapped is None:
                            raise
                        raise mapped from e
                    # The response was lost: the commit may have landed. Look before sending it again.
                    sha = self._landed(repo_id, head, marker)
                    if sha:
                        break
            self._tag(repo_id, tag, sha, force=force and tag in tags)
        return RemotePushResult(repo_id, sha, tag, head, _endpoint())

    def _landed(self, repo_id: str, parent: str | None, marker: str) -> str | None:
        """After a lost response: our commit's sha if it landed, ``None`` if the branch did not move.

        Raises:
            PushConflictError: the branch moved to someone else's commit.
        """
        new_head, _ = self._refs(repo_id)
        if new_head == parent:
            return None
        commits = self._call(repo_id, "read", self.api.list_repo_commits, repo_id, revision=new_head)
        for c in commits[:5]:
            if marker in (getattr(c, "message", "") or "") or marker in (getattr(c, "title", "") or ""):
                return c.commit_id
            if c.commit_id == parent:
                break
        raise PushConflictError(f"'{repo_id}' on {_endpoint()} moved to {str(new_head)[:12]} while pushing, and "
                                "not by us. Nothing of yours was written; run the push again.",
                                repo_id=repo_id, expected=parent, actual=new_head)

    def _tag(self, repo_id: str, tag: str, sha: str, *, force: bool) -> None:
        if force:
            self._call(repo_id, "tag", self.api.delete_tag, repo_id, tag=tag)
        try:
            self.api.create_tag(repo_id, tag=tag, revision=sha)
        except Exception as e:
            mapped = map_error(e, repo_id, "tag")
            if isinstance(mapped, (RemoteUnavailableError, PushConflictError)):
                _, tags = self._refs(repo_id)
                if tags.get(tag) == sha:  # it landed; the response was lost
                    return
                if tag in tags:
                    raise TagExistsError(f"Tag '{tag}' of '{repo_id}' was created by someone else meanwhile "
                                         f"(at {tags[tag][:12]}); your commit is {sha[:12]}. Tag it with "
                                         f"'hub tag {repo_id}@{sha[:12]} NAME --remote hf'.",
                                         repo_id=repo_id, tag=tag, target=tags[tag]) from e
            if mapped is None:
                raise
            raise mapped from e

    # --- pull ---------------------------------------------------------------------------------------

    def pull(self, repo_id: str, *, to: str | os.PathLike | None = None, force: bool = False) -> Path:
        """Download ``ns/name[@rev]``, verify and validate it, record it in the local store.

        Returns:
            ``to`` (the files written there) or the store's snapshot folder.

        Raises:
            InvalidIdError, RepositoryNotFoundError, RevisionNotFoundError, IntegrityError,
            composer.ComposerError, RemoteAccessError, RemoteUnavailableError.
        """
        ref = parse_id(repo_id)
        rev = ref.revision or BRANCH
        if offline() and self.store.exists(ref.repo_id):
            resolved = self.store.resolve(str(ref))  # offline: what was recorded before
        else:
            resolved = self._fetch(ref.repo_id, rev)
        if to is not None:
            return self.store.pull_to(resolved, to, force=force)
        return self.store.snapshot(resolved)

    def _fetch(self, repo_id: str, rev: str):
        from .store import Resolved

        info = self._call(repo_id, "pull", self.api.model_info, repo_id, revision=rev)
        sha = info.sha
        if not sha or not _SHA40.match(sha):
            raise IntegrityError(f"{_endpoint()} gave no commit sha for '{repo_id}@{rev}'.")
        ref = parse_id(repo_id)
        if self.store.exists(repo_id):
            try:
                return self.store.resolve(f"{repo_id}@{sha}")  # already recorded: refs/hf/<sha>
            except RevisionNotFoundError:
                pass
        self.store.root.mkdir(parents=True, exist_ok=True)
        with self.store.staging_dir("pull") as tmp:
            local = Path(self._call(repo_id, "pull", self.api.snapshot_download, repo_id, revision=sha,
                                    local_dir=tmp))
            files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*")
                           if p.is_file() and ".cache" not in p.relative_to(local).parts)
            self._verify(repo_id, sha, local, files)
            remote_tags: tuple[str, ...] = ()
            try:
                _, tags = self._refs(repo_id)
                remote_tags = tuple(t for t, target in tags.items() if target == sha)
            except HubError:
                pass
            if rev not in remote_tags and rev != BRANCH and not _SHA40.match(rev) and not rev.startswith(sha[:4]):
                remote_tags = remote_tags + (rev,)
            result: PushResult = self.store.push(
                local, repo_id, message=f"Pull {repo_id}@{sha} from {_endpoint()}",
                extra_refs={f"refs/hf/{sha}": ""}, extra_tags=remote_tags, auto_version=False,
                keep_card=True)
        return Resolved(ref, result.sha)

    def _verify(self, repo_id: str, sha: str, local: Path, files: list[str]) -> None:
        from huggingface_hub.utils import tqdm

        infos = self._call(repo_id, "pull", self.api.get_paths_info, repo_id, files, revision=sha)
        by_path = {i.path: i for i in infos}
        for name in tqdm(files, desc="Verifying checksums", unit="file", leave=False):
            info = by_path.get(name)
            if info is None:
                raise IntegrityError(f"'{name}' was downloaded from '{repo_id}@{sha[:12]}' but the server has no "
                                     "record of it; refusing it.", path=name)
            lfs = getattr(info, "lfs", None)
            if lfs is not None:
                expected = lfs["sha256"] if isinstance(lfs, dict) else lfs.sha256
                actual = file_sha256(local / name)
            else:
                expected = info.blob_id
                actual = git_blob_sha1((local / name).read_bytes())
            if expected != actual:
                raise IntegrityError(
                    f"'{name}' from '{repo_id}@{sha[:12]}' does not match the server's checksum (expected "
                    f"{expected}, got {actual}); it was corrupted or altered in transit. Nothing was stored; "
                    "retry the pull.", path=name, expected=expected, actual=actual)
