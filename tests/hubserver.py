"""A stand-in for the Hugging Face hub on 127.0.0.1, for the fetch tests.

It serves what `g3n_probe.hub` asks of the real hub: the model-info API (``/api/models/…``, with file
sizes) and files under ``/<repo>/resolve/<revision>/<file>`` with byte ranges. It logs every range
it serves, can require a token as a gated repository does (401 with ``X-Error-Code: GatedRepo``), and
can cut a connection part-way through a response, as a flaky network does.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    directory: Path
    commit: str
    token: str | None = None            # gated: this bearer token is required


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    log: list[tuple[str, str, int, int]] = field(default_factory=list)   # (repo, file, start, end) served
    cuts: dict[str, list[int]] = field(default_factory=dict)             # file -> bytes to send before each cut
    ignore_ranges: bool = False

    def add(self, repo_id: str, directory: Path, token: str | None = None) -> str:
        commit = hashlib.sha1(f"{repo_id}:{directory}".encode()).hexdigest()
        self.repos[repo_id] = Repo(Path(directory), commit, token)
        return commit

    def served(self, repo_id: str, filename: str) -> list[tuple[int, int]]:
        return [(start, end) for repo, name, start, end in self.log if repo == repo_id and name == filename]

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def fail(self, status: int, code: str, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def repo(self, repo_id: str, revision: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self.fail(404, "RepoNotFound", "Repository not found")
                    return None
                if repo.token and self.headers.get("authorization") != f"Bearer {repo.token}":
                    self.fail(401, "GatedRepo", "Access to model is restricted. You must have access to it.")
                    return None
                if revision not in ("main", repo.commit):
                    self.fail(404, "RevisionNotFound", "Invalid rev id")
                    return None
                return repo

            def do_GET(self) -> None:
                path = unquote(urlparse(self.path).path)
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
                    repo = self.repo(m.group(1), m.group(2) or "main")
                    if repo is None:
                        return
                    files = sorted(p for p in repo.directory.iterdir() if p.is_file())
                    body = json.dumps({"id": m.group(1), "sha": repo.commit, "siblings": [
                        {"rfilename": p.name, "size": p.stat().st_size} for p in files]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m is None:
                    self.fail(404, "EntryNotFound", "no such endpoint")
                    return
                repo = self.repo(m.group(1), m.group(2))
                if repo is None:
                    return
                target = repo.directory / m.group(3)
                if not target.is_file():
                    self.fail(404, "EntryNotFound", "Entry not found")
                    return
                size = target.stat().st_size
                start, end, status = 0, size, 200
                if (wanted := self.headers.get("range")) and not hub.ignore_ranges:
                    first, _, last = wanted.removeprefix("bytes=").partition("-")
                    start, end, status = int(first), (int(last) + 1 if last else size), 206
                hub.log.append((m.group(1), target.name, start, end))
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                cuts = hub.cuts.get(target.name)
                cut = cuts.pop(0) if cuts and end - start > cuts[0] else None
                with open(target, "rb") as f:
                    f.seek(start)
                    left = end - start if cut is None else cut
                    while left > 0:
                        piece = f.read(min(left, 4 * 1024**2))
                        self.wfile.write(piece)
                        left -= len(piece)
                if cut is not None:
                    self.wfile.flush()
                    self.close_connection = True

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
