"""``g3n-probe graph serve DIR``: a directory of saved graphs (`Graph.save`) served on 127.0.0.1 only.

    /                      the graphs listed in ``graph-metadata.json``, with links
    /graph/<slug>          the viewer page (`viewer.page`) of ``<slug>.json``
    /<name>.json           a JSON file of the directory, as stored (``graph-metadata.json`` included)

Only GET and HEAD; only plain files directly inside the directory, never a path with a separator or ``..``, a
hidden name, or a symlink leading out of the directory. A request whose ``Host`` is not this loopback address
is refused (a web page elsewhere cannot reach the server through DNS rebinding).

    server = serve("graphs")          # started in a daemon thread on a free port
    server.url                        # http://127.0.0.1:PORT/
    server.shutdown(); server.server_close()
"""

from __future__ import annotations

import html
import json
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from . import viewer

HOST = "127.0.0.1"
#: Pages may run their own inline script and style, and request nothing.
PAGE_POLICY = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"


class GraphServer(ThreadingHTTPServer):
    """The server: ``root`` the directory served, ``port`` and ``url`` where, ``thread`` the one serving."""

    daemon_threads = True

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        super().__init__((HOST, port), GraphHandler)
        self.port = int(self.server_address[1])
        self.url = f"http://{HOST}:{self.port}/"
        self.thread: threading.Thread | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a browser that drops a connection it no longer needs is not an error worth a traceback
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)

    def file(self, name: str) -> Path | None:
        """The plain file ``name`` directly inside the root (symlinks followed only within it), else None."""
        if not name or name.startswith(".") or any(c in name for c in "/\\\0") or name in ("..",):
            return None
        path = self.root / name
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if resolved.parent != self.root or not resolved.is_file():
            return None
        return resolved


class GraphHandler(BaseHTTPRequestHandler):
    server: GraphServer
    server_version = "g3n-probe-graphs"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass   # quiet: a notebook or a test is no place for an access log

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's spelling)
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
        if host not in (HOST, "localhost"):
            return self._send(HTTPStatus.FORBIDDEN, "text/plain", b"refused: not a loopback Host\n", body)
        path = unquote(urlsplit(self.path).path)
        try:
            status, kind, content = self._route(path)
        except ValueError as error:   # a file that is not a graph
            status, kind, content = HTTPStatus.UNPROCESSABLE_ENTITY, "text/plain", f"{error}\n".encode()
        self._send(status, kind, content, body)

    def _route(self, path: str) -> tuple[HTTPStatus, str, bytes]:
        if path in ("/", "/index.html"):
            return HTTPStatus.OK, "text/html", index_page(self.server.root).encode()
        if path.startswith("/graph/"):
            file = self.server.file(path[len("/graph/"):] + ".json")
            if file is not None:
                data = json.loads(file.read_text(encoding="utf-8"))
                return HTTPStatus.OK, "text/html", viewer.page(data).encode()
        elif path.endswith(".json") and path.count("/") == 1:
            file = self.server.file(path[1:])
            if file is not None:
                return HTTPStatus.OK, "application/json", file.read_bytes()
        return HTTPStatus.NOT_FOUND, "text/plain", b"not found\n"

    def _send(self, status: HTTPStatus, kind: str, content: bytes, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(len(content)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", PAGE_POLICY)
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(content)


def _graphs(root: Path) -> list[dict[str, Any]]:
    index = root / "graph-metadata.json"
    if not index.is_file():
        return []
    try:
        graphs = json.loads(index.read_text(encoding="utf-8")).get("graphs", [])
    except (ValueError, AttributeError):
        return []
    return [g for g in graphs if isinstance(g, dict) and isinstance(g.get("slug"), str)]


def index_page(root: Path) -> str:
    """The list of the directory's graphs (``graph-metadata.json``), each linked to its page and its JSON."""
    rows = []
    for entry in _graphs(root):
        slug = entry["slug"]
        prompt = entry.get("prompt") or "".join(map(str, entry.get("prompt_tokens") or []))
        rows.append(f'<li><a href="/graph/{quote(slug)}">{html.escape(slug)}</a> '
                    f'<a class="raw" href="/{quote(slug)}.json">json</a> '
                    f'<span>{html.escape(str(prompt)[:200])}</span></li>')
    listing = "<ul>" + "".join(rows) + "</ul>" if rows else "<p>No graphs in graph-metadata.json.</p>"
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>attribution graphs</title>"
            "<link rel='icon' href='data:,'>"
            "<style>body{font:14px system-ui,sans-serif;margin:16px}li{margin:4px 0}"
            "span{color:#4a5568;margin-left:8px;white-space:pre-wrap}.raw{font-size:12px;margin-left:6px}</style>"
            f"</head><body><h1>Attribution graphs</h1><p>{html.escape(str(root))}</p>{listing}</body></html>")


def serve(directory: str | Path, port: int = 0) -> GraphServer:
    """Serve ``directory`` on 127.0.0.1 (``port`` 0: a free one) from a daemon thread; returns the running server
    (``server.port``, ``server.url``; stop it with ``server.shutdown()`` and ``server.server_close()``)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in 0..65535; got {port!r}")
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory of graphs (write one with graph.save(directory, slug))")
    server = GraphServer(root.resolve(), port)
    server.thread = threading.Thread(target=server.serve_forever, name=f"g3n-graphs-{server.port}", daemon=True)
    server.thread.start()
    return server
