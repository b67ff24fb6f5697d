"""A stand-in for the Hugging Face hub on 127.0.0.1, for the fetch tests.

It serves what `g3n_probe.hub` asks of the real hub: the model-info API (``/api/models/…``, with file
sizes and LFS hashes) and files under ``/<repo>/resolve/<revision>/<file>`` with byte ranges,
redirected, as huggingface.co does, to a CDN on another origin. It logs every range the CDN serves
and misbehaves the way real servers do when asked to: a gated repository answers 401/403 with
``X-Error-Code: GatedRepo``, an unknown one 401 ``RepoNotFound`` to anonymous callers, a client that
accepts gzip gets the whole file compressed (CloudFront ignores ranges then), and connections can be
cut, stalled or refused with 429 + ``Retry-After``. It also lies, as a careless or hostile server
might: bytes changed at the same size (``flips``), another directory's bytes served under the commit
the listing describes (``Repo.serve``), sizes listed as null or 0 (``sizes``), and model-info
requests answered 429/5xx (``info_errors``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    directory: Path
    commit: str
    token: str | None = None            # gated: this bearer token is required for files
    serve: Path | None = None           # serve this directory's bytes under the commit (the listing stays)

    @property
    def served_from(self) -> Path:
        return self.serve or self.directory


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    log: list[tuple[str, str, int, int]] = field(default_factory=list)   # (repo, file, start, end) served
    cuts: dict[str, list[int]] = field(default_factory=dict)    # file -> bytes sent before each cut
    stalls: dict[str, list[int]] = field(default_factory=dict)  # file -> bytes sent before each stall
    busy: int = 0                      # answer this many file requests with 429 + Retry-After: 1
    ignore_ranges: bool = False
    cdn_saw_authorization: bool = False
    commits: int = 0
    flips: dict[str, int] = field(default_factory=dict)          # file -> offset of a byte served flipped
    sizes: dict[str, int | None] = field(default_factory=dict)   # file -> the size the listing gives
    info_errors: list[int] = field(default_factory=list)         # model-info answers, one each, before 200
    requests: list[str] = field(default_factory=list)            # every path asked for, API included

    def add(self, repo_id: str, directory: Path, token: str | None = None) -> str:
        """Serve ``directory`` as ``repo_id``; adding it again makes a new commit."""
        self.commits += 1
        commit = hashlib.sha1(f"{repo_id}:{directory}:{self.commits}".encode()).hexdigest()
        self.repos[repo_id] = Repo(Path(directory), commit, token)
        return commit

    def listing(self, repo: Repo) -> list[dict]:
        """The siblings the model-info API lists: size, git blob id, and for .safetensors files the LFS
        entry (huggingface.co lists a pointer's blob id for those), with ``sizes`` overriding sizes."""
        siblings = []
        for p in sorted(p for p in repo.directory.iterdir() if p.is_file()):
            data = p.read_bytes()
            size = self.sizes.get(p.name, len(data))
            entry = {"rfilename": p.name, "size": size, "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
            if p.suffix == ".safetensors":
                sha = hashlib.sha256(data).hexdigest()
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
                entry["blobId"] = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
                entry["lfs"] = {"size": size, "pointerSize": len(pointer), "sha256": sha}
            siblings.append(entry)
        return siblings

    def served(self, repo_id: str, filename: str) -> list[tuple[int, int]]:
        return [(start, end) for repo, name, start, end in self.log if repo == repo_id and name == filename]

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True   # headers and body go out as separate writes: no 40 ms delayed-ACK stall

            def log_message(self, *args: object) -> None:
                pass

            def answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def fail(self, status: int, code: str, message: str) -> None:
                self.answer(status, json.dumps({"error": message}).encode(),
                            {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"})

            def find(self, repo_id: str, revision: str, files: bool) -> Repo | None:
                repo = hub.repos.get(repo_id)
                authorization = self.headers.get("authorization")
                if repo is None:
                    if authorization is None:
                        self.fail(401, "RepoNotFound", "Repository not found")
                    else:
                        self.fail(404, "RepoNotFound", "Repository not found")
                    return None
                if files and repo.token and authorization != f"Bearer {repo.token}":
                    status = 401 if authorization is None else 403
                    self.fail(status, "GatedRepo", "Access to model is restricted. You must have access to it.")
                    return None
                if revision not in ("main", repo.commit):
                    self.fail(404, "RevisionNotFound", "Invalid rev id")
                    return None
                return repo

            def do_GET(self) -> None:  # the name http.server calls
                path = unquote(urlparse(self.path).path)
                hub.requests.append(path)
                if path.startswith("/cdn/"):
                    self.cdn(path)
                    return
                if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
                    if hub.info_errors:
                        status = hub.info_errors.pop(0)
                        self.answer(status, b"{}", {"Retry-After": "1", "Content-Type": "application/json"})
                        return
                    repo = self.find(m.group(1), m.group(2) or "main", files=False)
                    if repo is not None:
                        body = json.dumps({"id": m.group(1), "sha": repo.commit, "siblings": hub.listing(repo)})
                        self.answer(200, body.encode(), {"Content-Type": "application/json"})
                    return
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if m is None:
                    self.fail(404, "EntryNotFound", "no such endpoint")
                    return
                repo = self.find(m.group(1), m.group(2), files=True)
                if repo is None:
                    return
                if not (repo.directory / m.group(3)).is_file():
                    self.fail(404, "EntryNotFound", "Entry not found")
                    return
                # huggingface.co answers with a redirect to a signed CDN URL on another origin.
                location = f"http://localhost:{self.server.server_address[1]}/cdn/{m.group(1)}/{m.group(3)}"
                self.answer(302, b"", {"Location": location})

            def cdn(self, path: str) -> None:
                hub.cdn_saw_authorization |= self.headers.get("authorization") is not None
                if hub.busy:
                    hub.busy -= 1
                    self.answer(429, b"slow down", {"Retry-After": "1"})
                    return
                repo_id, _, name = path.removeprefix("/cdn/").rpartition("/")
                target = hub.repos[repo_id].served_from / name
                size = target.stat().st_size
                if "gzip" in self.headers.get("accept-encoding", ""):   # CloudFront: compressed, whole, 200
                    self.answer(200, gzip.compress(target.read_bytes()), {"Content-Encoding": "gzip"})
                    return
                start, end, status = 0, size, 200
                if (wanted := self.headers.get("range")) and not hub.ignore_ranges:
                    first, _, last = wanted.removeprefix("bytes=").partition("-")
                    start, end, status = int(first), (int(last) + 1 if last else size), 206
                hub.log.append((repo_id, name, start, end))
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                cut = self.next(hub.cuts, name, end - start)
                stall = self.next(hub.stalls, name, end - start)
                flip = hub.flips.get(name)
                with open(target, "rb") as f:
                    f.seek(start)
                    left = end - start if cut is None and stall is None else (cut if cut is not None else stall)
                    position = start
                    while left > 0:
                        piece = bytearray(f.read(min(left, 4 * 1024**2)))
                        if flip is not None and position <= flip < position + len(piece):
                            piece[flip - position] ^= 0x01   # one bit, same size
                        self.wfile.write(piece)
                        left -= len(piece)
                        position += len(piece)
                self.wfile.flush()
                if stall is not None:
                    time.sleep(3)   # longer than the client's read timeout in the tests
                if cut is not None or stall is not None:
                    self.close_connection = True

            @staticmethod
            def next(plans: dict[str, list[int]], name: str, length: int) -> int | None:
                queue = plans.get(name)
                return queue.pop(0) if queue and length > queue[0] else None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)   # shutdown() waits for one poll
        self._thread.start()
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
