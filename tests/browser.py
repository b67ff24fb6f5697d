"""A small headless-Chromium harness for tests: serve a directory on 127.0.0.1, drive the system's chromium over
the DevTools protocol, and record every request a page makes and every error it reports.

    from browser import Browser, find_chromium, serve

    with serve(site_dir) as base, Browser() as browser:
        browser.open(base + "index.html")
        assert browser.evaluate("document.title") == "..."
        browser.type_text("decompose")                 # into the focused element, as key events
        browser.wait_for("document.querySelectorAll('.result').length > 0")
        browser.screenshot("page.png")
        assert browser.outside(base) == [] and browser.errors == []

Nothing is downloaded: the browser is the system's (``chromium``, ``chromium-browser``, ``google-chrome`` or
``/usr/bin/chromium``); the only extra dependency is ``websocket-client`` (the ``docs`` extra). Every host but
127.0.0.1 resolves to nothing (``--host-resolver-rules``), so a page that reaches outside fails to load that
resource, and ``requests`` (from ``Network.requestWillBeSent``) shows what it tried.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "/usr/bin/chromium")


def find_chromium() -> str | None:
    """The path of a chromium binary on this machine, or None."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the stdlib's name)
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # chromium drops connections it no longer needs: not an error worth a traceback in the test log
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve(directory: str | os.PathLike):
    """Serve ``directory`` with the stdlib's http.server on 127.0.0.1 and a free port; yields the base URL
    (``http://127.0.0.1:PORT/``)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class BrowserError(RuntimeError):
    """The browser did not start, a command failed, or a wait timed out."""


class Browser:
    """Headless chromium driven over the DevTools protocol (one page)."""

    def __init__(self, binary: str | None = None, width: int = 1280, height: int = 900, timeout: float = 30.0):
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise BrowserError("no chromium binary found (looked for " + ", ".join(CANDIDATES) + ")")
        self.width, self.height, self.timeout = width, height, timeout
        self.requests: list[str] = []          # every URL the page asked for, in order
        self.failed: list[tuple[str, str]] = []  # (url, error) of requests that failed
        self.errors: list[str] = []            # console errors, uncaught exceptions, error log entries
        self.process: subprocess.Popen | None = None
        self._profile: str | None = None
        self._socket = None
        self._next_id = 0
        self._urls: dict[str, str] = {}
        self._events: list[dict] = []

    # ---- life cycle ---------------------------------------------------------------------------------------
    def start(self) -> Browser:
        """Launch chromium headless and attach to its page."""
        import websocket  # websocket-client, the docs extra: imported here so that find_chromium needs nothing

        self._profile = tempfile.mkdtemp(prefix="g3n-chromium-")
        args = [self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={self._profile}",
                f"--window-size={self.width},{self.height}", "--hide-scrollbars", "--mute-audio",
                "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
                "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "about:blank"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not port_file.exists() or not port_file.read_text().strip():
            if self.process.poll() is not None:
                raise BrowserError(f"chromium exited ({self.process.returncode}): "
                                   + self.process.stderr.read().decode(errors="replace")[-2000:])
            if time.monotonic() > deadline:
                raise BrowserError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=self.timeout) as response:
            targets = json.load(response)
        page = next(t for t in targets if t.get("type") == "page")
        self._socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=self.timeout,
                                                   suppress_origin=True)
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        return self

    def close(self) -> None:
        """Close the connection, end chromium (this process only) and remove its profile."""
        if self._socket is not None:
            with contextlib.suppress(Exception):
                self._socket.close()
            self._socket = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    def __enter__(self) -> Browser:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- protocol -----------------------------------------------------------------------------------------
    def _receive(self, deadline: float) -> dict:
        self._socket.settimeout(max(0.05, deadline - time.monotonic()))
        message = json.loads(self._socket.recv())
        if "method" in message:
            self._record(message)
        return message

    def _record(self, event: dict) -> None:
        method, params = event["method"], event.get("params", {})
        self._events.append(event)
        if method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            self.requests.append(url)
            self._urls[params["requestId"]] = url
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            self.failed.append((self._urls.get(params["requestId"], "?"), params.get("errorText", "")))
        elif method == "Network.responseReceived" and params["response"].get("status", 200) >= 400:
            self.failed.append((params["response"]["url"], f"HTTP {params['response']['status']}"))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())

    def send(self, method: str, **params):
        """Send one DevTools command and return its result (events that arrive meanwhile are recorded)."""
        if self._socket is None:
            raise BrowserError("the browser is not started")
        self._next_id += 1
        ident = self._next_id
        self._socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._receive(deadline)
            if message.get("id") == ident:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})

    def wait_event(self, method: str, timeout: float | None = None) -> dict:
        """Wait for the next event named ``method`` (one already recorded since the last wait counts)."""
        for i, event in enumerate(self._events):
            if event["method"] == method:
                del self._events[: i + 1]
                return event
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            try:
                message = self._receive(deadline)
            except Exception as error:  # the socket's timeout
                if time.monotonic() >= deadline:
                    break
                raise BrowserError(f"waiting for {method}: {error}") from error
            if message.get("method") == method:
                self._events.clear()
                return message
        raise BrowserError(f"no {method} within {timeout or self.timeout} s")

    # ---- pages --------------------------------------------------------------------------------------------
    def open(self, url: str, timeout: float | None = None) -> None:
        """Navigate to ``url`` and wait for its load event and for the document to be complete."""
        self._events.clear()
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")
        self.wait_event("Page.loadEventFired", timeout)
        self.wait_for("document.readyState === 'complete'", timeout)

    def evaluate(self, expression: str, await_promise: bool = True):
        """The value of a JavaScript expression in the page (JSON-serializable values)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=await_promise)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression!r}: " + (details.get("exception", {}).get("description")
                                                      or details.get("text", "exception")))
        return result["result"].get("value")

    def wait_for(self, condition: str, timeout: float | None = None, interval: float = 0.1):
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.evaluate(condition)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {condition!r}")
            time.sleep(interval)

    def type_text(self, text: str) -> None:
        """Type into the focused element as key events (keydown, input, keyup for each character)."""
        for character in text:
            self.send("Input.dispatchKeyEvent", type="keyDown", text=character, key=character,
                      unmodifiedText=character)
            self.send("Input.dispatchKeyEvent", type="keyUp", key=character)

    def screenshot(self, path: str | os.PathLike, full_page: bool = False) -> Path:
        """Save a PNG of the viewport (or the whole page) to ``path``."""
        params: dict = {"format": "png"}
        if full_page:
            width, height = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
        data = self.send("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def outside(self, base: str) -> list[str]:
        """The requests made so far to anything but ``base`` (data: and blob: URLs are the page's own)."""
        return [url for url in self.requests if not url.startswith((base, "data:", "blob:", "about:"))]


def screenshot_target(asset: Path, scratch: Path) -> Path:
    """Where a test saves a screenshot: the committed ``asset`` when it is missing or ``G3N_UPDATE_SCREENSHOTS=1``
    is set, else ``scratch`` (the shot is still taken, and a test run leaves the working tree as it was)."""
    if os.environ.get("G3N_UPDATE_SCREENSHOTS") == "1" or not asset.exists():
        return asset
    return scratch / asset.name
