"""A fake Hugging Face Hub API (``HfApi``-like) whose files are served through huggingface_hub's own client hook
(the network boundary; the ``fake`` fixture in conftest.py): shared by the remote tests and the recipes-of-parts
tests."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import httpx2
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.errors import RepositoryNotFoundError as HfRepoNotFound
from huggingface_hub.hf_api import RepoFile

from hub.remote import git_blob_sha1


def _http_error(status: int) -> HfHubHTTPError:
    req = httpx2.Request("POST", "https://hub.example/api/models/x/commit/main")
    return HfHubHTTPError(f"{status} error", response=httpx2.Response(status, request=req))


class FakeHub:
    """Just enough of HfApi for one model repo, keeping commits as {path: bytes}."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.commits: dict[str, dict] = {}
        self.head: str | None = None
        self.tags: dict[str, str] = {}
        self.exists = False
        self.fail_commit: list = []  # queue of ("before"|"after", exception) for create_commit
        self.tamper: dict[str, bytes] = {}
        self.lfs = False

    def _commit(self, tree: dict, message: str, description: str, parent: str | None) -> str:
        sha = hashlib.sha1(repr((sorted(tree.items()), message, description, parent)).encode()).hexdigest()
        self.commits[sha] = {"tree": tree, "message": message, "description": description, "parent": parent}
        self.head = sha
        return sha

    def create_repo(self, repo_id, *, exist_ok=False, private=None, **kw):
        self.calls.append(("create_repo", {"repo_id": repo_id, "exist_ok": exist_ok}))
        if not self.exists:
            self.exists = True
            self._commit({".gitattributes": b"*.safetensors filter=lfs\n"}, "initial commit", "", None)

    def list_repo_refs(self, repo_id, **kw):
        self.calls.append(("list_repo_refs", {}))
        if not self.exists:
            raise HfRepoNotFound("404", response=httpx2.Response(404, request=httpx2.Request("GET", "http://x")))
        return SimpleNamespace(branches=[SimpleNamespace(name="main", target_commit=self.head)],
                               tags=[SimpleNamespace(name=t, target_commit=s) for t, s in self.tags.items()])

    def list_repo_files(self, repo_id, *, revision=None, **kw):
        return sorted(self.commits[revision or self.head]["tree"])

    def create_commit(self, repo_id, operations, *, commit_message, commit_description=None, parent_commit=None,
                      revision=None, **kw):
        self.calls.append(("create_commit", {"parent_commit": parent_commit, "revision": revision,
                                             "paths": sorted(o.path_in_repo for o in operations)}))
        when, exc = self.fail_commit.pop(0) if self.fail_commit else (None, None)
        if callable(exc) and not isinstance(exc, BaseException):
            exc = exc()
        if when == "before":
            raise exc
        if parent_commit is not None and parent_commit != self.head:
            raise _http_error(412)
        tree = dict(self.commits[self.head]["tree"])
        for op in operations:
            if hasattr(op, "path_or_fileobj"):
                tree[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
            else:
                tree.pop(op.path_in_repo)
        sha = self._commit(tree, commit_message, commit_description or "", self.head)
        if when == "after":
            raise exc
        return SimpleNamespace(oid=sha)

    def list_repo_commits(self, repo_id, *, revision=None, **kw):
        out, sha = [], revision
        while sha:
            c = self.commits[sha]
            out.append(SimpleNamespace(commit_id=sha, title=c["message"], message=c["description"]))
            sha = c["parent"]
        return out

    def create_tag(self, repo_id, *, tag, revision=None, **kw):
        self.calls.append(("create_tag", {"tag": tag, "revision": revision}))
        if tag in self.tags:
            raise _http_error(409)
        self.tags[tag] = revision

    def delete_tag(self, repo_id, *, tag, **kw):
        self.calls.append(("delete_tag", {"tag": tag}))
        self.tags.pop(tag)

    def _sha(self, rev):
        return self.tags.get(rev) or (self.head if rev in (None, "main") else rev)

    endpoint = "https://hub.example"
    token = False

    def model_info(self, repo_id, *, revision=None, **kw):
        if not self.exists:
            raise HfRepoNotFound("404", response=httpx2.Response(404, request=httpx2.Request("GET", "http://x")))
        sha = self._sha(revision)
        return SimpleNamespace(sha=sha, siblings=[SimpleNamespace(rfilename=n) for n in self.commits[sha]["tree"]])

    def serve(self, request: httpx2.Request) -> httpx2.Response:
        """``GET /<ns>/<name>/resolve/<sha>/<file>``: the file's bytes (tampered if asked)."""
        parts = request.url.path.strip("/").split("/")
        assert parts[2] == "resolve", request.url
        name = "/".join(parts[4:])
        data = self.tamper.get(name, self.commits[parts[3]]["tree"][name])
        return httpx2.Response(200, headers={"Content-Length": str(len(data))}, content=iter([data]))

    def get_paths_info(self, repo_id, paths, *, revision=None, **kw):
        tree = self.commits[self._sha(revision)]["tree"]
        out = []
        for p in paths:
            data = tree[p]
            lfs = None
            if self.lfs and p.endswith(".safetensors"):
                lfs = {"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 130}
            out.append(RepoFile(path=p, size=len(data), oid=git_blob_sha1(data), lfs=lfs))
        return out

    def count(self, name):
        return sum(1 for c, _ in self.calls if c == name)
