"""From a hub id to a local text-only checkpoint, fetching only the bytes the text path reads.

A Gemma 3n repository holds the text model and two towers g3n_probe never runs. `fetch` asks the
hub for the commit and its files (one request), takes ``config.json`` first (anything that is not
Gemma 3n is refused before a weight byte moves), then reads the index to see which shards hold
tensors the loader reads (`loading.keys_read`):

* a shard holding none of them is never requested;
* a shard holding only them is fetched whole;
* a mixed shard is fetched as the byte ranges of those tensors (HTTP ``Range``, as
  huggingface_hub's file system reads), written into a safetensors file of its own whose header
  lists just them.

Everything goes into ``<root>/models--<org>--<name>/partial/<commit>/`` and is renamed to
``snapshots/<commit>/`` in one step when every file is complete and checked, so a half-fetched
checkpoint is never loaded. A shard in progress is ``<name>.incomplete``: bytes are appended in a
fixed order, so its size says where to resume (after a cut connection, in the same call; after an
interrupt, on the next). ``refs/<revision>`` records the commit for offline use. A shard whose
remote file is unchanged (same LFS sha256) is taken from an earlier snapshot instead of fetched.

The root is ``cache_dir``, else ``$G3N_PROBE_CACHE/hub`` (default ``~/.cache/g3n_probe/hub``);
a full snapshot already in the Hugging Face cache is used as it is. Requests go through
huggingface_hub (its session and token: ``token=``, ``HF_TOKEN`` or the stored login).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ._util import SAFETENSORS_DTYPE_BYTES, atomic_write

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
RECORD = ".g3n_fetch.json"   # per snapshot: which remote file (LFS sha256) each local file was cut from
_HEX_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")
# The files a checkpoint directory needs besides its weights: config, generation settings, tokenizer.
_SMALL_FILE = re.compile(r"^(config\.json|generation_config\.json|tokenizer[\w.\-]*|special_tokens_map\.json|"
                         r"added_tokens\.json|chat_template[\w.\-]*|README\.md|LICENSE[\w.\-]*)$")
_ATTEMPTS = 5        # failures in a row, without a byte arriving, before a fetch gives up (resumable)
_MAX_WAIT = 8.0      # seconds between attempts: 0.5, 1, 2, 4, 8, or what Retry-After asks (up to 60)


class HubAccessError(PermissionError):
    """The hub refused access (401/403): a gated or private repository, or a missing/invalid token."""


class FetchError(ConnectionError):
    """The fetch could not finish (network, or a server that does not honour byte ranges)."""


class _Transient(Exception):
    """Worth another attempt: a cut or stalled connection, a 5xx, a 429."""

    def __init__(self, why: str, wait: float | None = None) -> None:
        super().__init__(why)
        self.wait = wait


def looks_like_hub_id(text: str) -> bool:
    return _HUB_ID.fullmatch(text) is not None and not text.startswith((".", "/"))


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where fetched text-only checkpoints live."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("G3N_PROBE_CACHE", Path.home() / ".cache" / "g3n_probe")) / "hub"


def is_offline() -> bool:
    """``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``, read now (huggingface_hub reads them at import)."""
    from huggingface_hub import constants

    now = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return constants.HF_HUB_OFFLINE or now in {"1", "ON", "YES", "TRUE"}


def _check_names(repo_id: str, revision: str | None) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision must be a branch, tag or commit as a string; got {type(revision).__name__}")

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{repo_id!r} is not a valid hub id: {error}") from None
    if revision is not None and (revision.strip(".") == "" or "\\" in revision or "\0" in revision):
        raise ValueError(f"revision={revision!r} is not a branch, tag or commit")


@dataclass
class FetchReport:
    """What `fetch` did: where the checkpoint is, and the bytes against the full snapshot."""

    repo_id: str
    commit: str
    path: Path
    bytes_fetched: int = 0          # over the network, this call
    bytes_text: int = 0             # the text-only checkpoint's files, all calls together
    bytes_snapshot: int = 0         # every file of the repository at this commit
    files_whole: list[str] = field(default_factory=list)
    files_ranged: list[str] = field(default_factory=list)
    files_reused: list[str] = field(default_factory=list)   # unchanged since an earlier snapshot
    files_skipped: list[str] = field(default_factory=list)
    resumed_from: int = 0           # bytes already on disk from an interrupted fetch
    cached: bool = False            # nothing fetched: the checkpoint was already here


# --- where things are on disk --------------------------------------------------------------------

def _repo_dir(root: Path, repo_id: str) -> Path:
    return root / ("models--" + repo_id.replace("/", "--"))


def _ref_file(root: Path, repo_id: str, revision: str) -> Path:
    return _repo_dir(root, repo_id) / "refs" / quote(revision, safe="")


def cached_checkpoint(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The complete text-only checkpoint of ``repo_id`` at ``revision`` in the g3n cache, if any."""
    root, revision = cache_root(cache_dir), revision or "main"
    commit = revision
    if not _HEX_COMMIT.match(revision):
        ref = _ref_file(root, repo_id, revision)
        if not ref.is_file():
            return None
        commit = ref.read_text().strip()
    snapshot = _repo_dir(root, repo_id) / "snapshots" / commit
    return snapshot if _HEX_COMMIT.match(commit) and snapshot.is_dir() else None


def hf_cache_checkpoint(repo_id: str, revision: str | None = None) -> Path | None:
    """A full snapshot in the Hugging Face cache whose weights are all present, if any."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - every failure here means "not in the cache"
        return None
    index = path / INDEX
    if index.exists():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return path  # the loader names what is wrong with it
        return path if all((path / shard).exists() for shard in shards) else None
    return path if (path / SINGLE).exists() else None


# --- requests ------------------------------------------------------------------------------------

class _Hub:
    """The few requests a fetch makes, through huggingface_hub, with its errors made plain."""

    def __init__(self, repo_id: str, token: str | bool | None, endpoint: str | None) -> None:
        from huggingface_hub import HfApi, constants

        self.repo_id = repo_id
        self.token = token
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.api = HfApi(endpoint=self.endpoint, token=token)

    def explain(self, error: Exception, what: str) -> Exception:
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

    def info(self, revision: str | None) -> tuple[str, dict[str, int], dict[str, str]]:
        """The commit ``revision`` names, and each file's size and (where the hub gives one) LFS sha256."""
        from huggingface_hub import constants

        try:
            info = self.api.model_info(self.repo_id, revision=revision, files_metadata=True,
                                       timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - made plain by explain()
            raise self.explain(error, f"revision {revision or 'main'}") from None
        if not isinstance(info.sha, str) or not _HEX_COMMIT.match(info.sha):
            raise FetchError(f"{self.repo_id}: the hub answered with commit {info.sha!r}, not a 40-digit hex id")
        siblings = info.siblings or []
        sizes = {s.rfilename: (s.size or 0) for s in siblings}
        hashes = {s.rfilename: s.lfs.sha256 for s in siblings if getattr(s, "lfs", None) is not None}
        return info.sha, sizes, hashes

    def url(self, commit: str, filename: str) -> str:
        # The hub's file URL (as `huggingface_hub.hf_hub_url` builds it, but on this endpoint).
        return f"{self.endpoint}/{self.repo_id}/resolve/{quote(commit, safe='')}/{quote(filename)}"

    def stream(self, commit: str, filename: str, start: int, end: int) -> Iterator[bytes]:
        """The bytes ``[start, end)`` of ``filename`` as they arrive; `_Transient` when worth another attempt."""
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

        headers = build_hf_headers(token=self.token)
        headers["Range"] = f"bytes={start}-{end - 1}"
        # Compressed answers ignore ranges (CloudFront) or change the byte count: ask for the bytes as stored.
        headers["Accept-Encoding"] = "identity"
        try:
            # No retries inside: a cut mid-body must reach the caller, which resumes from the bytes that arrived.
            with http_stream_backoff("GET", self.url(commit, filename), headers=headers, max_retries=0,
                                     retry_on_status_codes=(), timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
                if response.status_code == 429 or response.status_code >= 500:
                    after = response.headers.get("Retry-After", "")
                    raise _Transient(f"HTTP {response.status_code}", float(after) if after.isdigit() else None)
                hf_raise_for_status(response)
                self._check_answer(response, filename, start, end)
                yield from response.iter_bytes()   # as it arrives: a cut keeps every byte received
        except (FetchError, HubAccessError, _Transient):
            raise
        except Exception as error:
            from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

            if isinstance(error, (HfHubHTTPError, OfflineModeIsEnabled)):
                raise self.explain(error, filename) from None
            if type(error).__module__.startswith(("httpx", "httpcore")) or isinstance(error, OSError):
                raise _Transient(f"{type(error).__name__}: {error}") from error   # cut, reset, timeout
            raise

    def _check_answer(self, response: Any, filename: str, start: int, end: int) -> None:
        """A 206 for exactly the bytes asked for, or a 200 for a whole file asked from its start."""
        status = response.status_code
        encoding = response.headers.get("Content-Encoding", "identity")
        if encoding not in ("identity", ""):
            raise FetchError(f"{self.repo_id}/{filename}: the server sent {encoding}-encoded bytes despite "
                             "Accept-Encoding: identity; offsets would not match")
        if status == 206:
            served = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if served is None or int(served.group(1)) != start:
                raise FetchError(f"{self.repo_id}/{filename}: asked for bytes from {start}, the server answered "
                                 f"Content-Range {response.headers.get('Content-Range')!r}")
        elif not (status == 200 and start == 0 and response.headers.get("Content-Length") == str(end)):
            raise FetchError(f"{self.repo_id}/{filename}: the server answered a byte-range request with HTTP "
                             f"{status}, not 206; it does not serve partial files")

    def read(self, commit: str, filename: str, start: int, end: int) -> bytes:
        """A small piece, whole (asked again after a transient failure)."""
        failures = 0
        while True:
            try:
                data = b"".join(self.stream(commit, filename, start, end))
            except _Transient as error:
                failures = _wait_or_give_up(self, filename, failures, error, "check the network and run again")
                continue
            if len(data) != end - start:
                raise FetchError(f"{self.repo_id}/{filename}: asked for {end - start} bytes at {start}, got {len(data)}")
            return data


def _wait_or_give_up(hub: _Hub, filename: str, failures: int, error: _Transient, advice: str) -> int:
    """One more failure in a row: wait (exponential, or as the server asks), or raise `FetchError`."""
    failures += 1
    if failures >= _ATTEMPTS:
        raise FetchError(f"{hub.repo_id}/{filename}: the connection failed {failures} times in a row ({error}); "
                         f"{advice}") from None
    time.sleep(min(error.wait, 60.0) if error.wait is not None else min(0.5 * 2 ** (failures - 1), _MAX_WAIT))
    return failures


# --- what to fetch -------------------------------------------------------------------------------

@dataclass
class _FilePlan:
    """A local file as ``prefix`` followed by byte ranges of one remote file, in order; or, when an
    earlier snapshot holds a file of the same identity, that file."""

    name: str
    pieces: list[tuple[int, int]]      # (start, end) in the remote file of the same name
    prefix: bytes = b""                # a header written locally (mixed shards)
    identity: dict[str, Any] = field(default_factory=dict)   # equal identities make equal files
    reuse: Path | None = None

    @property
    def size(self) -> int:
        if self.reuse is not None:
            return self.reuse.stat().st_size
        return len(self.prefix) + sum(end - start for start, end in self.pieces)


def _identity(remote_sha256: str | None, keys: set[str]) -> dict[str, Any]:
    """The remote file (its LFS hash) and the tensors taken from it: all a local file depends on."""
    return {"remote_sha256": remote_sha256, "keys": hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()}


def _earlier(repo: Path) -> dict[str, list[tuple[dict, Path]]]:
    """File name -> (identity, path) of every file in the repository's complete snapshots."""
    found: dict[str, list[tuple[dict, Path]]] = {}
    for snapshot in sorted((repo / "snapshots").glob("*")):
        try:
            record = json.loads((snapshot / RECORD).read_text())
        except (OSError, ValueError):
            continue
        for name, identity in record.items() if isinstance(record, dict) else ():
            if (snapshot / name).is_file():
                found.setdefault(name, []).append((identity, snapshot / name))
    return found


def _remote_header(hub: _Hub, commit: str, filename: str, size: int) -> tuple[dict, int]:
    """A remote safetensors file's header and where its data starts: two small ranged reads."""
    from .loading import CheckpointError

    if size < 8:
        raise CheckpointError(f"{hub.repo_id}/{filename} is {size} bytes: not a safetensors file")
    (length,) = struct.unpack("<Q", hub.read(commit, filename, 0, 8))
    if not 2 <= length <= min(size - 8, 100 * 1024**2):
        raise CheckpointError(f"{hub.repo_id}/{filename}: header length {length} does not fit a {size}-byte file")
    try:
        header = json.loads(hub.read(commit, filename, 8, 8 + length))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{hub.repo_id}/{filename}: the safetensors header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{hub.repo_id}/{filename}: the safetensors header is not a JSON object")
    return header, 8 + length


def _entry_bytes(hub: _Hub, filename: str, size: int, data_start: int, key: str, entry: Any) -> tuple[int, int]:
    """A header entry's data range, checked against its dtype and shape and the file's size."""
    from .loading import CheckpointError

    try:
        start, end = (int(x) for x in entry["data_offsets"])
        count = 1
        for dim in entry["shape"]:
            count *= int(dim)
        itemsize = SAFETENSORS_DTYPE_BYTES[entry["dtype"]]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{hub.repo_id}/{filename}: the header's entry for {key} is malformed: {entry!r}") from None
    if not 0 <= start <= end or end - start != count * itemsize or data_start + end > size:
        raise CheckpointError(f"{hub.repo_id}/{filename}: the header's entry for {key} does not match its bytes "
                              f"({entry['dtype']} {entry['shape']}, offsets {start}..{end}, file {size} bytes)")
    return start, end


def _ranged_plan(hub: _Hub, filename: str, size: int, header: dict, data_start: int, keys: set[str]) -> _FilePlan:
    """A safetensors file holding only ``keys``: a new header, then their bytes as remote ranges."""
    from .loading import CheckpointError

    if missing := sorted(keys - set(header)):
        raise CheckpointError(f"{hub.repo_id}/{filename} does not contain {missing[0]}, although the index says it does")
    spans = {key: _entry_bytes(hub, filename, size, data_start, key, header[key]) for key in keys}
    out: dict[str, Any] = {"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}
    pieces: list[tuple[int, int]] = []
    offset = 0
    for key in sorted(keys, key=lambda k: spans[k]):
        start, end = spans[key]
        out[key] = {"dtype": header[key]["dtype"], "shape": header[key]["shape"],
                    "data_offsets": [offset, offset + end - start]}
        offset += end - start
        if pieces and pieces[-1][1] == data_start + start:
            pieces[-1] = (pieces[-1][0], data_start + end)   # adjacent: one request
        else:
            pieces.append((data_start + start, data_start + end))
    text = json.dumps(out, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # safetensors pads its header to 8 bytes
    return _FilePlan(filename, pieces, struct.pack("<Q", len(text)) + text)


def _plan(hub: _Hub, commit: str, sizes: dict[str, int], hashes: dict[str, str], config: Any, index: dict | None,
          earlier: dict[str, list[tuple[dict, Path]]]) -> tuple[list[_FilePlan], list[str]]:
    """The weight files to fetch (whole or ranged) or reuse, and the shards never touched."""
    from .loading import CheckpointError, keys_read

    headers: dict[str, tuple[dict, int]] = {}
    if index is None:
        headers[SINGLE] = _remote_header(hub, commit, SINGLE, sizes[SINGLE])
        mapping = {key: SINGLE for key in headers[SINGLE][0] if key != "__metadata__"}
    else:
        mapping = index["weight_map"]
    read = set(keys_read(mapping, config)[0])
    held: dict[str, set[str]] = {}
    for key, filename in mapping.items():
        held.setdefault(filename, set()).add(key)
    plans, skipped = [], []
    for filename in sorted(held):
        if not isinstance(filename, str) or "/" in filename or filename.startswith(".") \
                or not filename.endswith(".safetensors"):
            raise CheckpointError(f"{hub.repo_id}: the index names {filename!r}; shards must be .safetensors files "
                                  "beside it")
        if filename not in sizes:
            raise CheckpointError(f"{hub.repo_id}: the index names {filename}, which the repository does not hold")
        wanted = held[filename] & read
        identity = _identity(hashes.get(filename), wanted)
        same = [path for seen, path in earlier.get(filename, ()) if seen == identity and identity["remote_sha256"]]
        if not wanted:
            skipped.append(filename)
        elif same:
            plans.append(_FilePlan(filename, [], identity=identity, reuse=same[0]))
        elif wanted == held[filename] and index is not None:
            plans.append(_FilePlan(filename, [(0, sizes[filename])], identity=identity))
        else:
            if filename not in headers:
                headers[filename] = _remote_header(hub, commit, filename, sizes[filename])
            plans.append(_ranged_plan(hub, filename, sizes[filename], *headers[filename], wanted))
            plans[-1].identity = identity
    return plans, skipped


# --- writing -------------------------------------------------------------------------------------

def _fill(hub: _Hub, commit: str, plan: _FilePlan, directory: Path, progress: Any) -> int:
    """Make ``directory/plan.name`` complete, resuming ``.incomplete``; returns the bytes fetched."""
    from .loading import CheckpointError

    target = directory / plan.name
    if target.exists() and target.stat().st_size == plan.size:
        return 0
    partial = directory / (plan.name + ".incomplete")
    fetched = 0
    with open(partial, "ab+") as out:
        out.seek(0)
        if out.read(len(plan.prefix)) != plan.prefix or out.seek(0, os.SEEK_END) > plan.size:
            out.truncate(0)            # a different plan, or garbage: start over
            out.write(plan.prefix)
        out.seek(0, os.SEEK_END)       # appends only: the size says where to resume
        position = len(plan.prefix)    # where the current piece starts in the local file
        for start, end in plan.pieces:
            length, failures = end - start, 0
            while True:
                done = min(max(out.tell() - position, 0), length)
                if done == length:
                    break
                arrived = 0
                try:
                    for chunk in hub.stream(commit, plan.name, start + done, end):
                        if arrived + len(chunk) > length - done:
                            raise FetchError(f"{hub.repo_id}/{plan.name}: the server sent more bytes than asked for")
                        out.write(chunk)
                        arrived += len(chunk)
                        if progress is not None:
                            progress.update(len(chunk))
                    if arrived < length - done:
                        raise _Transient(f"the answer ended after {arrived} of {length - done} bytes")
                except _Transient as error:  # a cut connection: resume from what arrived
                    out.flush()
                    failures = _wait_or_give_up(hub, plan.name, 0 if arrived else failures, error,
                                                f"run again to resume from {out.tell()} of {plan.size} bytes")
                finally:
                    out.flush()
                    fetched += arrived
            position += length
    if partial.stat().st_size != plan.size:
        raise FetchError(f"{hub.repo_id}/{plan.name}: {partial.stat().st_size} bytes on disk, expected {plan.size}")
    try:
        _keys_in(partial)   # safetensors checks on open that each tensor's bytes match its header entry
    except CheckpointError as error:
        partial.unlink()   # complete yet invalid: the next call fetches it afresh
        raise CheckpointError(f"{hub.repo_id}/{plan.name} arrived complete but is not a valid safetensors file "
                              f"({error}); it was deleted, run again to fetch it afresh") from None
    os.replace(partial, target)
    return fetched


def _keys_in(path: Path) -> set[str]:
    from .loading import open_safetensors

    with open_safetensors(path) as handle:
        return set(handle.keys())


def _fetch_small(hub: _Hub, commit: str, name: str, size: int, directory: Path, progress: Any) -> int:
    target = directory / name
    if target.exists() and target.stat().st_size == size:
        return 0
    data = hub.read(commit, name, 0, size) if size else b""
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    if progress is not None:
        progress.update(size)
    return size


def _link_or_copy(source: Path, target: Path) -> None:
    """Snapshot files are never written in place, so one inode can serve both."""
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def fetch(
    repo_id: str,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    progress: bool = True,
) -> FetchReport:
    """Fetch the text-only checkpoint of ``repo_id`` (only the bytes the text path reads); see the module doc.

    Returns a `FetchReport` whose ``path`` is the local checkpoint. Raises `HubAccessError` for a gated or
    private repository without access, ``FileNotFoundError`` for an unknown id or revision, `FetchError`
    when the network fails (what arrived is kept: the next call resumes), `CheckpointError` for a repository
    that is not a Gemma 3n safetensors checkpoint.
    """
    from filelock import FileLock

    from .loading import CheckpointError

    _check_names(repo_id, revision)
    hub = _Hub(repo_id, token, endpoint)
    commit, sizes, hashes = hub.info(revision)
    root = cache_root(cache_dir)
    repo = _repo_dir(root, repo_id)
    snapshot = repo / "snapshots" / commit
    report = FetchReport(repo_id, commit, snapshot, bytes_snapshot=sum(sizes.values()), cached=snapshot.is_dir())
    if not report.cached:
        repo.mkdir(parents=True, exist_ok=True)
        with FileLock(str(repo / ".lock")):
            if snapshot.is_dir():   # another process finished it while this one waited
                report.cached = True
            else:
                partial = repo / "partial" / commit
                try:
                    _fetch_into(hub, commit, sizes, hashes, repo, partial, report, progress)
                except (CheckpointError, HubAccessError, FileNotFoundError, ValueError):
                    shutil.rmtree(partial, ignore_errors=True)   # nothing here is worth resuming
                    raise
                snapshot.parent.mkdir(exist_ok=True)
                os.replace(partial, snapshot)
    report.bytes_text = sum(p.stat().st_size for p in snapshot.iterdir() if p.is_file() and p.name != RECORD)
    ref = _ref_file(root, repo_id, revision or "main")
    ref.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(ref, lambda tmp: Path(tmp).write_text(commit))
    return report


def _fetch_into(hub: _Hub, commit: str, sizes: dict[str, int], hashes: dict[str, str], repo: Path,
                directory: Path, report: FetchReport, progress: bool) -> None:
    from .loading import PICKLE_SUFFIXES, CheckpointError, read_config

    if "config.json" not in sizes:
        raise CheckpointError(f"{hub.repo_id} has no config.json at {commit[:12]}: not a Hugging Face model repository")
    if INDEX not in sizes and SINGLE not in sizes:
        pickles = sorted(n for n in sizes if n.endswith(PICKLE_SUFFIXES))
        raise CheckpointError(f"{hub.repo_id} has no safetensors weights"
                              + (f", only pickle files ({', '.join(pickles[:4])}); g3n_probe never unpickles"
                                 if pickles else ""))
    directory.mkdir(parents=True, exist_ok=True)
    report.bytes_fetched += _fetch_small(hub, commit, "config.json", sizes["config.json"], directory, None)
    config = read_config(directory)   # not Gemma 3n: refused before a weight byte moves
    index = None
    if INDEX in sizes:
        report.bytes_fetched += _fetch_small(hub, commit, INDEX, sizes[INDEX], directory, None)
        try:
            index = json.loads((directory / INDEX).read_text())
            if not isinstance(index.get("weight_map"), dict):
                raise TypeError("weight_map is not a mapping")
        except (ValueError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{hub.repo_id}/{INDEX} is not a valid safetensors index: {error}") from None
    plans, report.files_skipped = _plan(hub, commit, sizes, hashes, config, index, _earlier(repo))
    for plan in plans:
        if plan.reuse is not None:
            _link_or_copy(plan.reuse, directory / plan.name)
            report.files_reused.append(plan.name)
    small = {n: s for n, s in sizes.items() if _SMALL_FILE.match(n) and n != "config.json"}
    total = sum(p.size for p in plans) + sum(small.values())
    on_disk = sum(_bytes_on_disk(directory, p) for p in plans) + sum(
        s for n, s in small.items() if (directory / n).exists() and (directory / n).stat().st_size == s)
    report.resumed_from = on_disk - sum(p.size for p in plans if p.name in report.files_reused)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=on_disk, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"fetching {hub.repo_id} (text only)")
    try:
        for name, size in small.items():
            report.bytes_fetched += _fetch_small(hub, commit, name, size, directory, bar)
        for plan in plans:
            if plan.reuse is None:
                (report.files_ranged if plan.prefix else report.files_whole).append(plan.name)
                report.bytes_fetched += _fill(hub, commit, plan, directory, bar)
    finally:
        if bar is not None:
            bar.close()
    atomic_write(directory / RECORD, lambda tmp: Path(tmp).write_text(
        json.dumps({p.name: p.identity for p in plans}, indent=1)))
    if index is not None:
        present = {p.name: _keys_in(directory / p.name) for p in plans}
        kept = {key: f for key, f in index["weight_map"].items() if key in present.get(f, ())}
        metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
        metadata = {k: v for k, v in metadata.items() if k != "total_size"}
        metadata["g3n_probe"] = (f"text-only fetch of {hub.repo_id}@{commit}: the towers' tensors and the KV-shared "
                                 "layers' k/v were not fetched")
        atomic_write(directory / INDEX, lambda tmp: Path(tmp).write_text(
            json.dumps({"metadata": metadata, "weight_map": kept}, indent=2)))


def _bytes_on_disk(directory: Path, plan: _FilePlan) -> int:
    done = directory / plan.name
    if done.exists() and done.stat().st_size == plan.size:
        return plan.size
    partial = directory / (plan.name + ".incomplete")
    return min(partial.stat().st_size, plan.size) if partial.exists() else 0


def fetched_text_only(directory: Path) -> str | None:
    """If ``directory`` is a text-only fetch, what it says it left out; else None."""
    try:
        return json.loads((directory / INDEX).read_text())["metadata"]["g3n_probe"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fetch_config(repo_id: str, revision: str | None = None, *, cache_dir: str | os.PathLike | None = None,
                 token: str | bool | None = None, endpoint: str | None = None) -> Path:
    """A directory with just ``config.json`` (and the index) of ``repo_id``: enough to plan, print the
    point table or the layers, without fetching weights. ``<root>/models--…/configs/<commit>/``."""
    _check_names(repo_id, revision)
    hub = _Hub(repo_id, token, endpoint)
    commit, sizes, _ = hub.info(revision)
    directory = _repo_dir(cache_root(cache_dir), repo_id) / "configs" / commit
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", INDEX):
        if name in sizes:
            _fetch_small(hub, commit, name, sizes[name], directory, None)
    return directory


def resolve(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    download: bool = True,
    endpoint: str | None = None,
    progress: bool = True,
    config_only: bool = False,
) -> Path:
    """A local checkpoint directory for a hub id: a full snapshot in the Hugging Face cache, the text-only
    checkpoint in the g3n cache, or (network allowed) a fetch of one; with ``config_only``, when nothing
    is cached, a directory with just the config (`fetch_config`)."""
    _check_names(repo_id, revision)
    if (full := hf_cache_checkpoint(repo_id, revision)) is not None:
        return full
    cached = cached_checkpoint(repo_id, revision, cache_dir)
    if cached is not None and revision is not None and _HEX_COMMIT.match(revision):
        return cached   # a commit never changes: no need to ask the hub
    offline = local_files_only or not download or is_offline()
    if offline:
        if cached is not None:
            return cached
        from huggingface_hub import constants

        why = ("download=False (--offline)" if not download else "local_files_only=True" if local_files_only
               else "offline mode is on (HF_HUB_OFFLINE)")
        raise FileNotFoundError(
            f"{repo_id!r} (revision {revision or 'main'}) is neither a local directory nor cached: not in the g3n "
            f"cache ({cache_root(cache_dir)}) nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), and {why} "
            f"forbids fetching it. Fetch it once with the network on (`g3n-probe fetch {repo_id}`), or pass a directory.")
    if config_only and cached is not None:
        return cached
    try:
        if config_only:
            return fetch_config(repo_id, revision, cache_dir=cache_dir, token=token, endpoint=endpoint)
        return fetch(repo_id, revision, cache_dir=cache_dir, token=token, endpoint=endpoint, progress=progress).path
    except FetchError as error:
        if cached is None:
            raise
        warnings.warn(f"{error}; using the cached text-only checkpoint {cached}", stacklevel=3)
        return cached
