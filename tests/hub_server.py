"""A local HTTP server that answers the way the Hugging Face hub does, for huggingface_hub 2.x clients.

Point ``HF_ENDPOINT`` at ``server.url`` and the real client (``snapshot_download``, ``hf_hub_download``,
``HfApi.get_paths_info``) runs unchanged against checkpoint directories on disk. Routes (see
/work/shared/notes/hub-protocol.md):

* ``GET /api/models/{org}/{name}[/revision/{rev}]``: ``{"id", "sha", "siblings"}``
* ``GET /api/models/{repo}/tree/{rev}``: the file list (``type``, ``path``, ``size``, ``oid``, ``lfs``)
* ``POST /api/models/{repo}/paths-info/{rev}``: the entries of the posted ``paths``
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag``, ``Content-Length``,
  ``Accept-Ranges``; ``Range`` requests get 206
* ``GET /api/agent-harnesses``: ``{"standardEnvVars": [], "harnesses": {}}`` (huggingface_hub 2.4 caches
  this answer per HF_HOME and crashes on every later request if it is not a dict)

Errors carry ``X-Error-Code`` as the hub's do: unknown repo 404 ``RepoNotFound``, gated repo 401
``GatedRepo`` without a token and 403 with a wrong one, unknown revision 404 ``RevisionNotFound``,
missing file 404 ``EntryNotFound``. Every request is logged in ``server.requests``, the bytes sent of each file in ``server.served``.

Run it by hand: ``python tests/hub_server.py org/name=/path/to/checkpoint`` (prints the URL).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class Repo:
    root: Path
    gated_token: str | None = None  # when set, the repo is gated and only this token gets in
    commit: str = ""
    branches: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        h = hashlib.sha1()
        for f in self.files():
            h.update(f.encode())
            h.update(str((self.root / f).stat().st_size).encode())
        self.commit = self.commit or h.hexdigest()
        self.branches.setdefault("main", self.commit)

    def files(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def entry(self, path: str) -> dict:
        p = self.root / path
        size = p.stat().st_size
        oid = hashlib.sha1(p.read_bytes()).hexdigest()
        e = {"type": "file", "path": path, "size": size, "oid": oid}
        if path.endswith(".safetensors"):
            e["lfs"] = {"oid": hashlib.sha256(p.read_bytes()).hexdigest(), "size": size, "pointerSize": 134}
        return e


class HubServer:
    """``with HubServer({"org/name": Repo(path)}) as hub: ...`` serves on 127.0.0.1 at ``hub.url``."""

    def __init__(self, repos: dict[str, Repo]):
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        self.served: list[tuple[str, int]] = []  # (file, bytes of it sent) for every GET of a file
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                return None

            def do_HEAD(self) -> None:
                server._handle(self, head=True)

            def do_GET(self) -> None:
                server._handle(self, head=False)

            def do_POST(self) -> None:
                server._handle(self, head=False)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # ---- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False,
              content_type: str = "application/json") -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str, head: bool) -> None:
        body = json.dumps({"error": code}).encode()
        self._send(h, status, body, {"X-Error-Code": code, "X-Error-Message": code}, head)

    def _access(self, h, repo_id: str, head: bool) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 404, "RepoNotFound", head)
            return None
        if repo.gated_token is not None:
            auth = h.headers.get("Authorization", "")
            if not auth:
                self._error(h, 401, "GatedRepo", head)
                return None
            if auth != f"Bearer {repo.gated_token}":
                self._error(h, 403, "GatedRepo", head)
                return None
        return repo

    def _commit(self, h, repo: Repo, rev: str, head: bool) -> str | None:
        rev = unquote(rev)
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.branches.values():
            return rev
        self._error(h, 404, "RevisionNotFound", head)
        return None

    # ---- routing ----------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlparse(h.path)
        path = url.path
        self.requests.append((h.command, h.path))
        body = b""
        if h.command == "POST":
            body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        if path == "/api/agent-harnesses":
            return self._send(h, 200, b'{"standardEnvVars": [], "harnesses": {}}', head=head)
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?/?$", path)
        if m:
            repo = self._access(h, m.group(1), head)
            if repo and (commit := self._commit(h, repo, m.group(2) or "main", head)):
                info = {"id": m.group(1), "modelId": m.group(1), "sha": commit, "private": False,
                        "gated": "manual" if repo.gated_token else False,
                        "siblings": [{"rfilename": f} for f in repo.files()]}
                self._send(h, 200, json.dumps(info).encode(), head=head)
            return None
        m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$", path)
        if m:
            repo = self._access(h, m.group(1), head)
            if repo and self._commit(h, repo, m.group(2), head):
                sub = (m.group(3) or "").strip("/")
                files = [f for f in repo.files() if not sub or f.startswith(sub + "/")]
                self._send(h, 200, json.dumps([repo.entry(f) for f in files]).encode(), head=head)
            return None
        m = re.match(r"^/api/models/([^/]+/[^/]+)/paths-info/([^/]+)$", path)
        if m:
            repo = self._access(h, m.group(1), head)
            if repo and self._commit(h, repo, m.group(2), head):
                form = parse_qs(body.decode())
                wanted = form.get("paths", [])
                entries = [repo.entry(p) for p in wanted if (repo.root / p).is_file()]
                self._send(h, 200, json.dumps(entries).encode(), head=head)
            return None
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            repo = self._access(h, m.group(1), head)
            if not repo or not (commit := self._commit(h, repo, m.group(2), head)):
                return None
            rel = unquote(m.group(3))
            f = repo.root / rel
            if not f.is_file():
                return self._error(h, 404, "EntryNotFound", head)
            return self._send_file(h, repo, commit, rel, f, head)
        return self._error(h, 404, "NotFound", head)

    def _send_file(self, h, repo: Repo, commit: str, rel: str, f: Path, head: bool) -> None:
        data = f.read_bytes()
        e = repo.entry(rel)
        etag = e["lfs"]["oid"] if "lfs" in e else e["oid"]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if "lfs" in e:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        rng = h.headers.get("Range")
        if rng and not head:
            m = re.match(r"bytes=(\d+)-(\d*)", rng)
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                self.served.append((rel, len(data[start : end + 1])))
                return self._send(h, 206, data[start : end + 1], headers, content_type="application/octet-stream")
        if not head:
            self.served.append((rel, len(data)))
        self._send(h, 200, data, headers, head=head, content_type="application/octet-stream")

    def downloaded(self) -> list[str]:
        """Paths whose content was fetched (GET on resolve)."""
        out = []
        for method, p in self.requests:
            m = re.match(r"^/[^/]+/[^/]+/resolve/[^/]+/(.+)$", urlparse(p).path)
            if method == "GET" and m:
                out.append(unquote(m.group(1)))
        return out


def main(argv: list[str]) -> None:
    repos = {}
    for arg in argv:
        repo_id, _, path = arg.partition("=")
        repos[repo_id] = Repo(Path(path))
    with HubServer(repos) as hub:
        print(hub.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
