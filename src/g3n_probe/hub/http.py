"""The few requests a hub fetch makes, through huggingface_hub, with its errors made plain.

`HubClient` asks for a commit's file list (`Listing`: sizes, LFS sha256, git blob ids) and streams
byte ranges; a cut connection, a stalled one, a 5xx or a 429 is `Transient` (worth another attempt,
after the wait the server asks for; the file list is asked again the same way), everything else an
error that says what to do: `HubAccessError` for a gated or
private repository, ``FileNotFoundError`` for an unknown id or revision, `FetchError` otherwise.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

HEX_COMMIT = re.compile(r"^[0-9a-f]{40}$")   # a full commit id

ATTEMPTS = 5        # failures in a row, without a byte arriving, before a fetch gives up (resumable)
MAX_WAIT = 8.0      # seconds between attempts: 0.5, 1, 2, 4, 8, or what Retry-After asks (up to 60)


class HubAccessError(PermissionError):
    """The hub refused access (401/403): a gated or private repository, or a missing/invalid token."""


class FetchError(ConnectionError):
    """The fetch could not finish (network, or a server that does not honour byte ranges)."""


class Transient(Exception):
    """Worth another attempt: a cut or stalled connection, a 5xx, a 429."""

    def __init__(self, why: str, wait: float | None = None) -> None:
        super().__init__(why)
        self.wait = wait


@dataclass
class Listing:
    """A commit's files as the hub lists them: size (None where the hub gives none), LFS sha256 (large
    files) and git blob id (every file; for an LFS file, its pointer's)."""

    commit: str
    sizes: dict[str, int | None] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    blob_ids: dict[str, str] = field(default_factory=dict)


def _retry_after(response: Any) -> float | None:
    after = (getattr(response, "headers", None) or {}).get("Retry-After", "")
    return float(after) if after.isdigit() else None


# --- requests ------------------------------------------------------------------------------------

class HubClient:
    """The few requests a fetch makes, through huggingface_hub, with its errors made plain."""

    def __init__(self, repo_id: str, token: str | bool | None, endpoint: str | None) -> None:
        from huggingface_hub import HfApi, constants

        self.repo_id = repo_id
        self.token = token
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.api = HfApi(endpoint=self.endpoint, token=token)

    def plain_error(self, error: Exception, what: str) -> Exception:
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        message = (getattr(response, "headers", None) or {}).get("X-Error-Message", "")
        page = f"https://huggingface.co/{self.repo_id}"
        login = "log in (`hf auth login`) or set HF_TOKEN (or pass token=)"
        if isinstance(error, GatedRepoError):
            return HubAccessError(
                f"{self.repo_id} is gated and the hub refused {what} (HTTP {status}): accept the license at {page} "
                f"with your account, then {login} with a token of that account.")
        if message == "Invalid credentials in Authorization header":
            return HubAccessError(f"{self.repo_id}: the hub rejected the token (HTTP {status}, invalid credentials); "
                                  f"{login} with a valid token.")
        if isinstance(error, RevisionNotFoundError):
            return FileNotFoundError(f"{self.repo_id}: revision not found on the hub ({what})")
        if isinstance(error, RepositoryNotFoundError):
            return FileNotFoundError(
                f"{self.repo_id!r} is neither a local directory nor a repository the hub shows you ({self.endpoint}): "
                f"check the id (it is case-sensitive), or if it is private or gated, {login}.")
        if status in (401, 403):
            return HubAccessError(f"{self.repo_id}: the hub refused {what} (HTTP {status}); if it is gated, accept "
                                  f"the license at {page}, then {login}.")
        if isinstance(error, OfflineModeIsEnabled):
            return FetchError(f"{self.repo_id}: not fetched because offline mode is on (HF_HUB_OFFLINE)")
        if isinstance(error, HfHubHTTPError):
            return FetchError(f"{self.repo_id}: the hub answered {what} with HTTP {status}: {error}")
        return FetchError(f"{self.repo_id}: cannot reach {self.endpoint} for {what}: {type(error).__name__}: {error}. "
                          "Check the network, or load with download=False (`--offline` on the command line) to use only what "
                          "is cached")

    def info(self, revision: str | None) -> Listing:
        """The commit ``revision`` names and its files' sizes and hashes; a 429 or 5xx is asked again
        after the wait the server asks for (``Retry-After``) or a growing one, as file reads are."""
        failures = 0
        while True:
            try:
                info = self._model_info(revision)
                break
            except Transient as error:
                failures = wait_or_give_up(self, "", failures, error, "the hub did not list the files (model info); "
                                            "check the network and run again")
        if not isinstance(info.sha, str) or not HEX_COMMIT.match(info.sha):
            raise FetchError(f"{self.repo_id}: the hub answered with commit {info.sha!r}, not a 40-digit hex id")
        listing = Listing(info.sha)
        for sibling in info.siblings or []:
            lfs = getattr(sibling, "lfs", None)
            # An LFS file's size is listed twice; a listing without it (null, or 0) leaves it unknown.
            listing.sizes[sibling.rfilename] = sibling.size or getattr(lfs, "size", None) or None
            if lfs is not None and isinstance(getattr(lfs, "sha256", None), str):
                listing.sha256[sibling.rfilename] = lfs.sha256.lower()
            elif isinstance(sibling.blob_id, str):
                listing.blob_ids[sibling.rfilename] = sibling.blob_id.lower()
        return listing

    def _model_info(self, revision: str | None) -> Any:
        from huggingface_hub import constants
        from huggingface_hub.errors import HfHubHTTPError

        try:
            return self.api.model_info(self.repo_id, revision=revision, files_metadata=True,
                                       timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
        except Exception as error:  # made plain by plain_error()
            status = getattr(getattr(error, "response", None), "status_code", None)
            if isinstance(error, HfHubHTTPError) and isinstance(status, int) and (status == 429 or status >= 500):
                raise Transient(f"HTTP {status}", _retry_after(error.response)) from None
            raise self.plain_error(error, f"revision {revision or 'main'}") from None

    def url(self, commit: str, filename: str) -> str:
        # The hub's file URL (as `huggingface_hub.hf_hub_url` builds it, but on this endpoint).
        return f"{self.endpoint}/{self.repo_id}/resolve/{quote(commit, safe='')}/{quote(filename)}"

    def stream(self, commit: str, filename: str, start: int, end: int | None, total: int | None = None) -> Iterator[bytes]:
        """The bytes ``[start, end)`` of ``filename`` as they arrive (``end=None``: the whole file, asked
        with no ``Range``, for a file whose size the listing omits); `Transient` when worth another attempt.
        ``total``, the listed size, must be the size a ranged answer reports."""
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

        headers = build_hf_headers(token=self.token)
        if end is not None:
            headers["Range"] = f"bytes={start}-{end - 1}"
        # Compressed answers ignore ranges (CloudFront) or change the byte count: ask for the bytes as stored.
        headers["Accept-Encoding"] = "identity"
        try:
            # No retries inside: a cut mid-body must reach the caller, which resumes from the bytes that arrived.
            with http_stream_backoff("GET", self.url(commit, filename), headers=headers, max_retries=0,
                                     retry_on_status_codes=(), timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
                if response.status_code == 429 or response.status_code >= 500:
                    raise Transient(f"HTTP {response.status_code}", _retry_after(response))
                hf_raise_for_status(response)
                self._check_answer(response, filename, start, end, total)
                yield from response.iter_bytes()   # as it arrives: a cut keeps every byte received
        except (FetchError, HubAccessError, Transient):
            raise
        except Exception as error:
            from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

            if isinstance(error, (HfHubHTTPError, OfflineModeIsEnabled)):
                raise self.plain_error(error, filename) from None
            if type(error).__module__.startswith(("httpx", "httpcore")) or isinstance(error, OSError):
                raise Transient(f"{type(error).__name__}: {error}") from error   # cut, reset, timeout
            raise

    def _check_answer(self, response: Any, filename: str, start: int, end: int | None, total: int | None) -> None:
        """A 206 for exactly the bytes asked for, of a file of the listed size, or a 200 for a whole file
        asked from its start."""
        status = response.status_code
        encoding = response.headers.get("Content-Encoding", "identity")
        if encoding not in ("identity", ""):
            raise FetchError(f"{self.repo_id}/{filename}: the server sent {encoding}-encoded bytes despite "
                             "Accept-Encoding: identity; offsets would not match")
        if end is None:
            if status != 200:
                raise FetchError(f"{self.repo_id}/{filename}: asked for the whole file, the server answered HTTP {status}")
        elif status == 206:
            served = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
            if served is None or int(served.group(1)) != start:
                raise FetchError(f"{self.repo_id}/{filename}: asked for bytes from {start}, the server answered "
                                 f"Content-Range {response.headers.get('Content-Range')!r}")
            if total is not None and served.group(2) not in ("*", str(total)):
                raise FetchError(f"{self.repo_id}/{filename}: the hub lists {total} bytes, the server answered from a "
                                 f"file of {served.group(2)} bytes (Content-Range); not the file the listing names")
        elif not (status == 200 and start == 0 and response.headers.get("Content-Length") == str(end)):
            raise FetchError(f"{self.repo_id}/{filename}: the server answered a byte-range request with HTTP "
                             f"{status}, not 206; it does not serve partial files")

    def read(self, commit: str, filename: str, start: int, end: int | None, total: int | None = None) -> bytes:
        """A small piece, whole (asked again after a transient failure); ``end=None``: the whole file."""
        failures = 0
        while True:
            try:
                data = b"".join(self.stream(commit, filename, start, end, total))
            except Transient as error:
                failures = wait_or_give_up(self, filename, failures, error, "check the network and run again")
                continue
            if end is not None and len(data) != end - start:
                raise FetchError(f"{self.repo_id}/{filename}: asked for {end - start} bytes at {start}, got {len(data)}")
            return data


def wait_or_give_up(hub: HubClient, filename: str, failures: int, error: Transient, advice: str) -> int:
    """One more failure in a row: wait (exponential, or as the server asks), or raise `FetchError`."""
    failures += 1
    if failures >= ATTEMPTS:
        where = f"{hub.repo_id}/{filename}" if filename else hub.repo_id
        raise FetchError(f"{where}: the request failed {failures} times in a row ({error}); {advice}") from None
    time.sleep(min(error.wait, 60.0) if error.wait is not None else min(0.5 * 2 ** (failures - 1), MAX_WAIT))
    return failures


