"""The Hugging Face Hub remote (or any server speaking its API: ``HF_ENDPOINT``, e.g. ``hub serve``).

Push: validate locally, ``create_repo(exist_ok=True)``, exactly one ``create_commit`` whose
``parent_commit`` is the branch head we read (so a concurrent push elsewhere fails ours instead of being
overwritten), then ``create_tag``. A commit whose response is lost (network error, 5xx) is not retried
blindly: we re-read the branch head and look for our push id in the new commit's description first.

Pull: resolve the revision to a commit (model info), take the server's own record of each adapter file
(``get_paths_info``: size, sha256 for LFS files or the git blob sha1) and check the sizes against
:mod:`composer.limits` before downloading anything; then stream each file ourselves, never past its recorded
size, and check its checksum (huggingface_hub's downloader trusts the size the download announces, and checks
nothing else). Every read from the remote shares one deadline (``ADAPTER_HUB_REMOTE_DEADLINE``, 600 s): a server
trickling a byte every few seconds ends the pull with an error rather than holding it forever. Only the
adapter files at the top of the repository are downloaded (and, for a recipe of parts, those of its part
folders); a pickle (``.bin``, ``.pt``, ...) is refused, any other file is left on the server. The files are
validated with :mod:`composer` and recorded in the local store
(``refs/hf/<remote sha>`` plus the remote's tags) so it works offline afterwards::

    model_info(rev, blobs)  ─> sha, file names   (pickle: refused; not an adapter file: skipped)
    paths-info(names)       ─> size, checksum    (over a limit: refused before any download)
    GET resolve/<sha>/<f>   ─> staging/<f>       (stops past the recorded size or the deadline)
    store.push(staging)     ─> refs/hf/<sha>, tags
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer import limits
from composer.folder import PICKLE_SUFFIXES

from .errors import (
    HubError,
    IntegrityError,
    InvalidIdError,
    PushConflictError,
    RemoteAccessError,
    RemoteUnavailableError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    TagExistsError,
    UnsafeFolderError,
)
from .ids import check_tag, next_version, parse_id
from .staging import SMALL_FILES
from .store import BRANCH, PushResult, Store, check_reserved, listing, stored, write_card
from .text import shown

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

    def _refs(self, repo_id: str, deadline: float | None = None) -> tuple[str | None, dict[str, str]]:
        if deadline is None:
            refs = self._call(repo_id, "read", self.api.list_repo_refs, repo_id)
        else:
            refs = self._read(repo_id, deadline, self.api.list_repo_refs, repo_id)
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
            names = [n for n in listing(staging) if stored(n)]  # a recipe of parts: its part folders' files too
            present = set()
            if head is not None:
                present = set(self._call(repo_id, "read", self.api.list_repo_files, repo_id, revision=head))
            marker = f"{_MARKER} {uuid.uuid4()}"
            msg = message or f"Push {tag}"
            sha = None
            for attempt in range(self.max_attempts):
                ops = [CommitOperationAdd(path_in_repo=n, path_or_fileobj=str(staging / n)) for n in names]
                ops += [CommitOperationDelete(path_in_repo=n) for n in sorted(present)
                        if stored(n) and n not in names]
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

        deadline = time.monotonic() + limits.get("remote_deadline")
        info = self._read(repo_id, deadline, self.api.model_info, repo_id, revision=rev, files_metadata=True)
        sha = getattr(info, "sha", None)
        if not isinstance(sha, str) or not _SHA40.match(sha):
            raise IntegrityError(f"{self._where()} gave no commit sha for '{repo_id}@{shown(rev)}'; it is not "
                                 "a Hugging Face Hub server, or a broken one. Check HF_ENDPOINT.")
        # Recorded under the stored spelling when there is one, else the remote's own: the Hub's ids ignore case
        # (Alice/X is alice/x), so one repository there is one here.
        ref = self.store.canonical(parse_id(repo_id, allow_revision=False))
        spelled = getattr(info, "id", None)
        if not self.store.exists(repo_id) and isinstance(spelled, str) and spelled.lower() == repo_id.lower():
            with contextlib.suppress(InvalidIdError):
                ref = parse_id(spelled, allow_revision=False)
        if self.store.exists(repo_id):
            try:
                return self.store.resolve(f"{repo_id}@{sha}")  # already recorded: refs/hf/<sha>
            except RevisionNotFoundError:
                pass
        names = _adapter_names(repo_id, sha, getattr(info, "siblings", None) or ())
        records = self._records(repo_id, sha, names, info, deadline)
        self.store.root.mkdir(parents=True, exist_ok=True)
        with self.store.staging_dir("pull") as tmp:
            local = Path(tmp)
            from huggingface_hub.utils import tqdm

            for name in tqdm(names, desc="Downloading", unit="file", leave=False):
                (local / name).parent.mkdir(exist_ok=True)  # a part folder of a recipe of parts
                self._download(repo_id, sha, name, local / name, records[name], deadline)
            remote_tags: tuple[str, ...] = ()
            try:
                _, tags = self._refs(repo_id, deadline)
                remote_tags = tuple(t for t, target in tags.items() if target == sha)
            except HubError:
                pass
            if rev not in remote_tags and rev != BRANCH and not _SHA40.match(rev) and not rev.startswith(sha[:4]):
                remote_tags = remote_tags + (rev,)
            result: PushResult = self.store.push(
                local, ref.repo_id, message=f"Pull {repo_id}@{sha} from {self._where()}",
                extra_refs={f"refs/hf/{sha}": ""}, extra_tags=remote_tags, auto_version=False,
                keep_card=True)
        return Resolved(ref, result.sha)

    def _where(self) -> str:
        return str(getattr(self.api, "endpoint", None) or _endpoint())

    def _read(self, repo_id: str, deadline: float, fn, *args, **kwargs):
        """``self._call(fn)`` that gives up at ``deadline`` (a server trickling its answer byte by byte would
        otherwise hold the pull forever: each read is within the read timeout, the whole never ends).

        The call runs in a daemon thread that is abandoned at the deadline; whatever it still receives is
        dropped, nothing of it is stored.
        """
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = self._call(repo_id, "pull", fn, *args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                box["error"] = e

        worker = threading.Thread(target=run, name="hub-remote-read", daemon=True)
        worker.start()
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            raise self._late(repo_id)
        if "error" in box:
            error = box["error"]
            if isinstance(error, (ValueError, TypeError, KeyError, AttributeError)) and not isinstance(
                    error, HubError):  # model info that is not JSON, or JSON of another shape
                raise IntegrityError(
                    f"{self._where()} answered a request about '{repo_id}' with something that is not a Hugging "
                    f"Face Hub answer ({type(error).__name__}); it is not a Hub server, or a broken one. Nothing "
                    "was stored; check HF_ENDPOINT.") from error
            raise error
        return box["value"]

    def _late(self, repo_id: str) -> RemoteUnavailableError:
        lim = limits.LIMITS["remote_deadline"]
        return RemoteUnavailableError(
            f"Pulling '{repo_id}' from {self._where()} took longer than {limits.get('remote_deadline'):g} s "
            f"(the server is too slow, or stalling); nothing was stored. Retry later, or allow more time with "
            f"{lim.env}=<seconds>.")

    def _records(self, repo_id: str, sha: str, names: list[str], info: Any, deadline: float) -> dict[str, Any]:
        """The server's own record (size, checksum) of each file, checked against the size limits before a byte
        of any file is downloaded."""
        records: dict[str, Any] = {}
        if names:
            infos = self._read(repo_id, deadline, self.api.get_paths_info, repo_id, names, revision=sha)
            records = {getattr(i, "path", None): i for i in infos}
        listed = {getattr(s, "rfilename", None): getattr(s, "size", None) for s in getattr(info, "siblings", ())}
        for name in names:
            record = records.get(name)
            size = getattr(record, "size", None)
            if record is None or not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise IntegrityError(f"{self._where()} lists '{name}' in '{repo_id}@{sha[:12]}' but gives no size "
                                     "or checksum for it; refusing to download it. Nothing was stored.", path=name)
            if isinstance(listed.get(name), int) and listed[name] != size:
                raise IntegrityError(
                    f"{self._where()} gives two sizes for '{name}' in '{repo_id}@{sha[:12]}' ({listed[name]} in the "
                    f"model info, {size} in paths-info); refusing it. Nothing was stored.", path=name)
            limits.check("config_bytes" if name.rsplit("/", 1)[-1] in SMALL_FILES else "adapter_bytes", size,
                         f"'{name}' of '{repo_id}@{sha[:12]}' on {self._where()} (its declared size)")
        return records

    def _download(self, repo_id: str, sha: str, name: str, dest: Path, record: Any, deadline: float) -> None:
        """Stream one file into ``dest``: never more than its declared size, never past ``deadline``, then its
        checksum against the server's record (sha256 for LFS files, the git blob sha1 otherwise)."""
        import httpx2
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session

        size = record.size
        url = hf_hub_url(repo_id, name, revision=sha, endpoint=getattr(self.api, "endpoint", None))
        token = getattr(self.api, "token", None)
        headers = build_hf_headers(token=token) if token is not False else build_hf_headers(token=False)
        headers["Accept-Encoding"] = "identity"  # count the bytes as sent: no decompression bomb
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._late(repo_id)
        read = min(float(constants.HF_HUB_DOWNLOAD_TIMEOUT or 10), remaining)
        received = 0
        lfs = getattr(record, "lfs", None)
        digest = hashlib.sha256() if lfs is not None else hashlib.sha1(b"blob %d\0" % size)
        try:
            with get_session().stream("GET", url, headers=headers, timeout=httpx2.Timeout(read),
                                      follow_redirects=True) as resp:
                if resp.status_code >= 400:
                    raise self._refused(repo_id, sha, name, resp.status_code)
                announced = resp.headers.get("Content-Length")
                if announced is not None and announced.isdigit() and int(announced) > size:
                    raise self._oversized(repo_id, sha, name, size, int(announced), "announces")
                with open(dest, "xb") as out:
                    for block in resp.iter_raw():
                        received += len(block)
                        if received > size:
                            raise self._oversized(repo_id, sha, name, size, received, "sent")
                        if time.monotonic() > deadline:
                            raise self._late(repo_id)
                        digest.update(block)
                        out.write(block)
        except HubError:
            raise
        except Exception as e:
            mapped = map_error(e, repo_id, "pull")
            if mapped is None:
                raise
            raise mapped from e
        if received != size:
            raise IntegrityError(f"'{name}' from '{repo_id}@{sha[:12]}' ended after {received} of its {size} bytes; "
                                 "the connection was cut. Nothing was stored; retry the pull.", path=name)
        expected = (lfs["sha256"] if isinstance(lfs, dict) else lfs.sha256) if lfs is not None \
            else getattr(record, "blob_id", None)
        actual = digest.hexdigest()
        if expected != actual:
            raise IntegrityError(
                f"'{name}' from '{repo_id}@{sha[:12]}' does not match the server's checksum (expected "
                f"{expected}, got {actual}); it was corrupted or altered in transit. Nothing was stored; "
                "retry the pull.", path=name, expected=expected, actual=actual)

    def _refused(self, repo_id: str, sha: str, name: str, status: int) -> HubError:
        where = f"{self._where()} answered HTTP {status} for '{name}' of '{repo_id}@{sha[:12]}'"
        if status in (401, 403):
            return RemoteAccessError(f"{where}: not allowed. Log in with 'hf auth login' or set HF_TOKEN.")
        if status >= 500 or status in (408, 429):
            return RemoteUnavailableError(f"{where}. Nothing was stored; retry the pull later.")
        return IntegrityError(f"{where}, though it lists that file. Nothing was stored; the server is broken, "
                              "check HF_ENDPOINT.", path=name)

    def _oversized(self, repo_id: str, sha: str, name: str, size: int, got: int, how: str) -> IntegrityError:
        return IntegrityError(
            f"{self._where()} {how} {got} bytes for '{name}' of '{repo_id}@{sha[:12]}', but its own record says "
            f"{size}; stopped there and stored nothing. The server is broken or hostile; check HF_ENDPOINT.",
            path=name, expected=str(size), actual=str(got))


def _adapter_names(repo_id: str, sha: str, siblings) -> list[str]:
    """The files of a remote commit that a pull downloads: the adapter files at the top level, and for a recipe
    of parts (a ``parts.json`` and no ``adapter_config.json`` at the top) its part folders' adapter files
    (:func:`hub.store.stored`: one level down, plain names; which of them are parts, the staged ``parts.json``
    decides, and the store keeps only those).

    A pickle anywhere is refused (it runs code when loaded, and a repo that ships one is not an adapter this
    hub can store); any other file (``.gitattributes``, images, training logs, checkpoint subfolders of a plain
    adapter) is left on the server, not downloaded.
    """
    names = []
    for s in siblings:
        name = getattr(s, "rfilename", None)
        if not isinstance(name, str):
            continue
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise UnsafeFolderError(
                f"'{repo_id}@{sha[:12]}' holds '{shown(name)}', a pickle (it runs code when loaded); the hub only "
                "pulls safetensors adapters. Ask its author for adapter_model.safetensors.", path=name)
        if stored(name):
            names.append(name)
    if "parts.json" not in names or "adapter_config.json" in names:
        names = [n for n in names if "/" not in n]
    return sorted(set(names))
