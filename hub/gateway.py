"""The front door of ``hub serve``: a small read-only HTTP proxy in front of the ``olah`` child.

::

    client ──HTTP──> gateway (host:port, this process) ──HTTP──> olah (127.0.0.1:<private port>, child)

It exists for what olah answers badly, and to keep the server read-only whatever olah's routes become:

- ``GET /`` answers a short text saying what this is and how to use it (olah answers 500);
- ``/api/models/<ns>/<name>`` without a revision is asked as ``.../revision/main`` (olah asks
  huggingface.co for the newest commit even for its own mirrors, and answers 401 "repository not found");
- only the Hub API routes olah implements pass (model info, refs, tree, commits, paths-info, resolve); any other
  path is ``404`` with the Hub's error headers (olah answered ``200`` with an empty body, and clients then failed
  parsing it: ``list_models`` with a ``JSONDecodeError``);
- a missing revision of an existing repository is ``404 RevisionNotFound`` and a missing file of an existing
  revision ``404 EntryNotFound``, as on the Hub (olah answers ``401 RepoNotFound`` and ``500``, so clients said
  "repository not found ... make sure you are authenticated");
- a repository id is looked up without regard to case, as on the Hub (``Alice/Math`` is ``alice/math``): the
  gateway asks olah for the store's spelling of it (olah looks a path up, exact on most filesystems, so it
  served ``Alice/Math`` and ``alice/math`` as two repositories);
- a redirect to olah's private address is rewritten to the public one;
- only ``GET`` and ``HEAD`` pass, and ``POST`` to ``/api/models/<ns>/<name>/paths-info/<rev>`` (a read that
  huggingface_hub sends as a form: ``get_paths_info``, which ``hub pull --remote hf`` needs for sizes and
  checksums), its body at most 1 MiB; anything else is ``405`` (the store is never written through the server).

Responses are streamed through in blocks, with their status and headers (hop-by-hop headers dropped).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote

_MODEL_INFO = re.compile(r"/api/models/([^/?#]+)/([^/?#]+)/?(\?.*)?\Z")
_SEG = r"[^/?#]+"
_Q = r"(?:\?.*)?"
_ROUTES = tuple(re.compile(p + r"\Z") for p in (
    rf"/api/models/(?P<repo>{_SEG}/{_SEG})/revision/(?P<rev>{_SEG})/?{_Q}",
    rf"/api/models/(?P<repo>{_SEG}/{_SEG})/refs/?{_Q}",
    rf"/api/models/(?P<repo>{_SEG}/{_SEG})/(?:tree|commits|paths-info)/(?P<rev>{_SEG})(?:/[^?#]*)?{_Q}",
    rf"/(?P<repo>{_SEG}/{_SEG})/resolve/(?P<rev>{_SEG})/(?P<file>[^?#]+){_Q}",
    rf"/repos/{_SEG}/{_SEG}/{_SEG}/{_SEG}",  # olah's LFS file route
))
_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                  "transfer-encoding", "upgrade",
                  "date", "server"))  # not hop-by-hop, but the gateway sends its own
_PATHS_INFO = re.compile(r"/api/models/[^/?#]+/[^/?#]+/paths-info/[^?#]+\Z")
_BLOCK = 1 << 16
_MAX_BODY = 1 << 20  # a paths-info form: a list of file names
_MAX_COMMITS = 16 << 20  # a commit listing rewritten here (olah pages it by 50)


READ_TIMEOUT = 30.0  # seconds a client may stay silent (idle sockets would otherwise hold a thread forever)


def _ask(upstream: tuple[str, int], path: str) -> tuple[int, object]:
    """GET ``path`` from olah: (status, parsed JSON or None); (0, None) if it does not answer."""
    conn = http.client.HTTPConnection(*upstream, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        data = resp.read(1 << 20)
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, None
    except OSError:
        return 0, None
    finally:
        conn.close()


def _handler(upstream: tuple[str, int], public: str, read_timeout: float,
             canonical: Callable[[str], str] | None) -> type[BaseHTTPRequestHandler]:
    private = f"http://{upstream[0]}:{upstream[1]}"

    class Handler(BaseHTTPRequestHandler):
        server_version = "adapter-hub"
        protocol_version = "HTTP/1.0"  # one request per connection: bodies end when the connection closes
        timeout = read_timeout  # each read and write of the client's socket; a silent client is dropped

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
            pass  # olah keeps the access log

        def _text(self, status: int, text: str, extra: dict[str, str] | None = None) -> None:
            body = text.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _forward(self, body: bytes | None = None) -> None:
            path = self.path
            if path in ("/", ""):
                self._text(200, f"adapter-hub: a read-only store served over the Hugging Face Hub API.\n"
                                f"Use it with HF_ENDPOINT={public} (huggingface_hub, transformers, peft).\n"
                                f"Example: HF_ENDPOINT={public} hf download <namespace>/<name> --revision v1\n")
                return
            m = _MODEL_INFO.match(path)
            if m:
                path = f"/api/models/{m.group(1)}/{m.group(2)}/revision/main{m.group(3) or ''}"
            route = next((r.match(path) for r in _ROUTES if r.match(path)), None)
            if route is None:
                self._hub_error(404, "NotFound", f"Not found: {path.split('?')[0][:200]}. This server answers "
                                "the Hub API for models only; see GET /.")
                return
            if canonical is not None and route.groupdict().get("repo"):
                asked = unquote(route.group("repo"))
                try:
                    stored = canonical(asked)
                except ValueError:  # not an id of ours: olah answers it as it is
                    stored = asked
                if stored != asked:
                    path = path[:route.start("repo")] + quote(stored) + path[route.end("repo"):]
                    route = next(r.match(path) for r in _ROUTES if r.match(path))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP and k.lower() != "host"}
            conn = http.client.HTTPConnection(*upstream, timeout=300)
            try:
                conn.request(self.command, path, body=body, headers=headers)
                resp = conn.getresponse()
            except OSError as e:
                conn.close()
                self._text(502, f"The store's server (olah) did not answer: {e}. It may still be starting.\n")
                return
            try:
                if self._corrected(resp, route.groupdict()):
                    return
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() == "location" and v.startswith(private):
                        v = public + v[len(private):]
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    while block := resp.read(_BLOCK):
                        self.wfile.write(block)
            except OSError:
                pass  # the client went away
            finally:
                conn.close()

        def _corrected(self, resp: http.client.HTTPResponse, route: dict[str, str | None]) -> bool:
            """Answer what olah gets wrong as the Hub would; True when answered here."""
            repo, rev, file = route.get("repo"), route.get("rev"), route.get("file")
            if repo is None or rev is None:
                return False
            lost = resp.status == 401 and resp.getheader("X-Error-Code") == "RepoNotFound"
            if lost or (resp.status >= 500 and file is not None):
                if _ask(upstream, f"/api/models/{repo}/refs")[0] != 200:
                    return False  # no such repository: olah's answer is the Hub's
                status, info = _ask(upstream, f"/api/models/{repo}/revision/{rev}")
                if status != 200:
                    self._hub_error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev)[:200]}")
                    return True
                names = {s.get("rfilename") for s in (info or {}).get("siblings", []) if isinstance(s, dict)}
                if file is not None and unquote(file) not in names:
                    self._hub_error(404, "EntryNotFound", f"Entry not found: {unquote(file)[:200]}")
                    return True
                return False
            if resp.status == 200 and "/commits/" in self.path.split("?")[0] and self.command == "GET":
                # olah's commit authors lack the Hub's "user" field (huggingface_hub: KeyError 'user')
                data = resp.read(_MAX_COMMITS + 1)
                try:
                    commits = json.loads(data) if len(data) <= _MAX_COMMITS else None
                except ValueError:
                    commits = None
                if isinstance(commits, list):
                    for c in commits:
                        for a in c.get("authors", []) if isinstance(c, dict) else []:
                            if isinstance(a, dict):
                                a.setdefault("user", a.get("name"))
                    data = json.dumps(commits).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return True
            return False

        def _hub_error(self, status: int, code: str, message: str) -> None:
            """An error as the Hub sends it: JSON body and the X-Error-Code / X-Error-Message headers that
            huggingface_hub turns into its own exceptions (RevisionNotFoundError, ...)."""
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message.encode("ascii", "backslashreplace").decode())
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._forward()

        def do_HEAD(self) -> None:  # noqa: N802
            self._forward()

        def _read_only(self) -> None:
            self._text(405, "This server is read-only: push with 'hub push' on the machine that holds the store.\n",
                       {"Allow": "GET, HEAD"})

        def do_POST(self) -> None:  # noqa: N802
            if not _PATHS_INFO.match(self.path):
                self._read_only()
                return
            length = self.headers.get("Content-Length", "")
            if not length.isdigit() or int(length) > _MAX_BODY:
                self._text(413 if length.isdigit() else 411,
                           f"A paths-info request needs a Content-Length of at most {_MAX_BODY} bytes.\n")
                return
            try:
                body = self.rfile.read(int(length))
            except OSError:
                return  # the client went silent or away
            self._forward(body)

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _read_only  # noqa: N815

    return Handler


class Gateway:
    """The proxy, serving in a background thread until :meth:`close`."""

    def __init__(self, host: str, port: int, upstream: tuple[str, int], *, read_timeout: float = READ_TIMEOUT,
                 canonical: Callable[[str], str] | None = None) -> None:
        """``canonical``: maps a repository id as asked to its stored spelling (ids are case-insensitive)."""
        public = f"http://{host}:{port}"
        self.httpd = ThreadingHTTPServer((host, port), _handler(upstream, public, read_timeout, canonical))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="hub-gateway", daemon=True)

    def start(self) -> Gateway:
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
