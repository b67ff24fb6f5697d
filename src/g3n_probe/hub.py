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
interrupt, on the next). ``refs/<revision>`` records the commit for offline use.

The root is ``cache_dir``, else ``$G3N_PROBE_CACHE/hub`` (default ``~/.cache/g3n_probe/hub``);
a full snapshot already in the Hugging Face cache is used as it is. Requests go through
huggingface_hub (its session, retries, token: ``token=``, ``HF_TOKEN`` or the stored login).
"""

from __future__ import annotations

import json
import os
import re
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
_HEX_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")
# The files a checkpoint directory needs besides its weights: config, generation settings, tokenizer.
_SMALL_FILE = re.compile(r"^(config\.json|generation_config\.json|tokenizer[\w.\-]*|special_tokens_map\.json|"
                         r"added_tokens\.json|chat_template[\w.\-]*|README\.md|LICENSE[\w.\-]*)$")
_ATTEMPTS = 5  # per piece: a cut connection resumes where it stopped


class HubAccessError(PermissionError):
    """The hub refused access (401/403): a gated or private repository, or a missing/invalid token."""


class FetchError(ConnectionError):
    """The fetch could not finish (network, or a server that does not honour byte ranges)."""


class _Transient(Exception):
    """A server error worth retrying, like a cut connection."""


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
        if not ref.exists():
            return None
        commit = ref.read_text().strip()
    snapshot = _repo_dir(root, repo_id) / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


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
        self.requests: list[tuple[str, str | None]] = []

    def explain(self, error: Exception, what: str) -> Exception:
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        status = getattr(getattr(error, "response", None), "status_code", None)
        page = f"https://huggingface.co/{self.repo_id}"
        if isinstance(error, GatedRepoError) or status in (401, 403):
            return HubAccessError(
                f"{self.repo_id}: the hub refused access to {what} (HTTP {status}). Gemma models are gated: accept "
                f"the license at {page} with your account, then log in (`hf auth login`) or set HF_TOKEN "
                "(or pass token=) to a token of that account.")
        if isinstance(error, RevisionNotFoundError):
            return FileNotFoundError(f"{self.repo_id}: revision not found on the hub ({what})")
        if isinstance(error, RepositoryNotFoundError):
            return FileNotFoundError(f"{self.repo_id!r} is neither a local directory nor a repository on the hub "
                                     f"({self.endpoint}); check the id (it is case-sensitive)")
        if isinstance(error, OfflineModeIsEnabled):
            return FetchError(f"{self.repo_id}: not fetched because offline mode is on (HF_HUB_OFFLINE)")
        if isinstance(error, HfHubHTTPError):
            return FetchError(f"{self.repo_id}: the hub answered {what} with HTTP {status}: {error}")
        return FetchError(f"{self.repo_id}: cannot reach {self.endpoint} for {what}: {type(error).__name__}: {error}. "
                          "Check the network, or load with download=False to use only what is cached")

    def info(self, revision: str | None) -> Any:
        self.requests.append(("info", revision))
        try:
            return self.api.model_info(self.repo_id, revision=revision, files_metadata=True)
        except Exception as error:  # noqa: BLE001 - made plain by explain()
            raise self.explain(error, f"revision {revision or 'main'}") from None

    def url(self, commit: str, filename: str) -> str:
        # The hub's file URL (as `huggingface_hub.hf_hub_url` builds it, but on this endpoint).
        return f"{self.endpoint}/{self.repo_id}/resolve/{quote(commit, safe='')}/{quote(filename)}"

    def stream(self, commit: str, filename: str, start: int, end: int) -> Iterator[bytes]:
        """The bytes ``[start, end)`` of ``filename``; raises `FetchError` if the server ignores the range."""
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

        headers = build_hf_headers(token=self.token)
        headers["Range"] = f"bytes={start}-{end - 1}"
        self.requests.append((filename, headers["Range"]))
        try:
            # No retries inside: a cut mid-body must reach `_fill`, which resumes from the bytes that arrived.
            with http_stream_backoff("GET", self.url(commit, filename), headers=headers, max_retries=0,
                                     retry_on_status_codes=()) as response:
                if response.status_code >= 500:
                    raise _Transient(f"HTTP {response.status_code}")
                hf_raise_for_status(response)
                whole = start == 0 and response.headers.get("content-length") == str(end)
                if response.status_code != 206 and not (response.status_code == 200 and whole):
                    raise FetchError(f"{self.repo_id}/{filename}: the server answered a byte-range request with "
                                     f"HTTP {response.status_code}, not 206; it does not serve partial files")
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

    def read(self, commit: str, filename: str, start: int, end: int) -> bytes:
        """A small piece, whole (asked again after a transient failure)."""
        for attempt in range(_ATTEMPTS):
            try:
                data = b"".join(self.stream(commit, filename, start, end))
                break
            except _Transient as error:
                if attempt == _ATTEMPTS - 1:
                    raise FetchError(f"{self.repo_id}/{filename}: the connection failed {_ATTEMPTS} times "
                                     f"({error}); check the network and run again") from None
                time.sleep(0.2 * (attempt + 1))
        if len(data) != end - start:
            raise FetchError(f"{self.repo_id}/{filename}: asked for {end - start} bytes at {start}, got {len(data)}")
        return data


# --- what to fetch -------------------------------------------------------------------------------

@dataclass
class _FilePlan:
    """A local file as ``prefix`` followed by byte ranges of one remote file, in order."""

    name: str
    remote: str
    pieces: list[tuple[int, int]]      # (start, end) in the remote file
    prefix: bytes = b""                # a header written locally (mixed shards)

    @property
    def size(self) -> int:
        return len(self.prefix) + sum(end - start for start, end in self.pieces)


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
    return header, 8 + length


def _ranged_plan(hub: _Hub, commit: str, filename: str, size: int, keys: set[str]) -> _FilePlan:
    """A safetensors file holding only ``keys``: a new header, then their bytes as remote ranges."""
    from .loading import CheckpointError

    header, data_start = _remote_header(hub, commit, filename, size)
    wanted = sorted((k for k in header if k in keys), key=lambda k: header[k]["data_offsets"][0])
    if missing := sorted(keys - set(wanted)):
        raise CheckpointError(f"{hub.repo_id}/{filename} does not contain {missing[0]}, although the index says it does")
    out: dict[str, Any] = {"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}
    pieces: list[tuple[int, int]] = []
    offset = 0
    for key in wanted:
        entry = header[key]
        start, end = entry["data_offsets"]
        itemsize = SAFETENSORS_DTYPE_BYTES.get(entry.get("dtype"), 0)
        count = 1
        for dim in entry.get("shape", []):
            count *= dim
        if itemsize == 0 or end - start != count * itemsize or data_start + end > size:
            raise CheckpointError(f"{hub.repo_id}/{filename}: the header's entry for {key} does not match its bytes "
                                  f"({entry.get('dtype')} {entry.get('shape')}, offsets {start}..{end}, file {size})")
        out[key] = {"dtype": entry["dtype"], "shape": entry["shape"], "data_offsets": [offset, offset + end - start]}
        offset += end - start
        if pieces and pieces[-1][1] == data_start + start:
            pieces[-1] = (pieces[-1][0], data_start + end)   # adjacent: one request
        else:
            pieces.append((data_start + start, data_start + end))
    text = json.dumps(out, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # safetensors pads its header to 8 bytes
    return _FilePlan(filename, filename, pieces, struct.pack("<Q", len(text)) + text)


def _plan(hub: _Hub, commit: str, sizes: dict[str, int], config: Any, index: dict | None) -> tuple[list[_FilePlan], list[str]]:
    """The weight files to fetch (whole or ranged) and the shards never touched."""
    from .loading import CheckpointError, keys_read

    if index is None:
        header, _ = _remote_header(hub, commit, SINGLE, sizes[SINGLE])
        mapping = {key: SINGLE for key in header if key != "__metadata__"}
    else:
        mapping = index["weight_map"]
    read, _ = keys_read(mapping, config)
    plans, skipped = [], []
    for filename in sorted(set(mapping.values())):
        if "/" in filename or filename.startswith(".") or not filename.endswith(".safetensors"):
            raise CheckpointError(f"{hub.repo_id}: the index names {filename!r}; shards must be .safetensors files "
                                  "beside it")
        if filename not in sizes:
            raise CheckpointError(f"{hub.repo_id}: the index names {filename}, which the repository does not hold")
        held = {key for key, f in mapping.items() if f == filename}
        wanted = held & set(read)
        if not wanted:
            skipped.append(filename)
        elif wanted == held and index is not None:
            plans.append(_FilePlan(filename, filename, [(0, sizes[filename])]))
        else:
            plans.append(_ranged_plan(hub, commit, filename, sizes[filename], wanted))
    return plans, skipped


# --- writing -------------------------------------------------------------------------------------

def _fill(hub: _Hub, commit: str, plan: _FilePlan, directory: Path, progress: Any) -> int:
    """Make ``directory/plan.name`` complete, resuming ``.incomplete``; returns the bytes fetched."""
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
        position = len(plan.prefix)
        for start, end in plan.pieces:
            length = end - start
            failures = 0   # in a row, without a byte arriving
            while (done := min(max(out.tell() - position, 0), length)) < length:
                before = done
                try:
                    for chunk in hub.stream(commit, plan.remote, start + done, end):
                        if len(chunk) > length - done:
                            raise FetchError(f"{hub.repo_id}/{plan.remote}: the server sent more bytes than asked for")
                        out.write(chunk)
                        done += len(chunk)
                        fetched += len(chunk)
                        if progress is not None:
                            progress.update(len(chunk))
                    out.flush()
                except _Transient as error:  # a cut connection: resume from what arrived
                    out.flush()
                    failures = 0 if done > before else failures + 1
                    if failures == _ATTEMPTS:
                        raise FetchError(f"{hub.repo_id}/{plan.remote}: the connection failed {_ATTEMPTS} times "
                                         f"in a row ({error}); run again to resume from {out.tell()} of "
                                         f"{plan.size} bytes") from None
                    time.sleep(0.2 * failures)
            if out.tell() - position < length:
                raise FetchError(f"{hub.repo_id}/{plan.remote}: {out.tell() - position} of {length} bytes arrived")
            position += length
    if partial.stat().st_size != plan.size:
        raise FetchError(f"{hub.repo_id}/{plan.name}: {partial.stat().st_size} bytes on disk, expected {plan.size}")
    _check_safetensors(partial, plan.name)
    os.replace(partial, target)
    return fetched


def _check_safetensors(path: Path, name: str) -> None:
    """Each tensor's bytes match its header entry (safetensors checks this on open)."""
    from .loading import CheckpointError, open_safetensors

    try:
        with open_safetensors(path) as handle:
            handle.keys()
    except CheckpointError as error:
        raise CheckpointError(f"{name} arrived but is not a valid safetensors file: {error}") from None


def _fetch_small(hub: _Hub, commit: str, name: str, size: int, directory: Path, progress: Any) -> int:
    target = directory / name
    if target.exists() and target.stat().st_size == size:
        return 0
    data = hub.read(commit, name, 0, size) if size else b""
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(data))
    if progress is not None:
        progress.update(size)
    return size


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

    hub = _Hub(repo_id, token, endpoint)
    info = hub.info(revision)
    commit = info.sha
    if not isinstance(commit, str) or not _HEX_COMMIT.match(commit):
        raise FetchError(f"{repo_id}: the hub answered with commit {commit!r}, not a 40-digit hex id")
    sizes = {s.rfilename: (s.size or 0) for s in (info.siblings or [])}
    root = cache_root(cache_dir)
    repo = _repo_dir(root, repo_id)
    snapshot = repo / "snapshots" / commit
    report = FetchReport(repo_id, commit, snapshot, bytes_snapshot=sum(sizes.values()))
    repo.mkdir(parents=True, exist_ok=True)
    with FileLock(str(repo / ".lock")):
        if not snapshot.is_dir():
            _fetch_into(hub, commit, sizes, repo / "partial" / commit, report, progress)
            snapshot.parent.mkdir(exist_ok=True)
            os.replace(repo / "partial" / commit, snapshot)
        else:
            report.cached = True
        report.bytes_text = sum(p.stat().st_size for p in snapshot.iterdir() if p.is_file())
        ref = _ref_file(root, repo_id, revision or "main")
        ref.parent.mkdir(exist_ok=True)
        atomic_write(ref, lambda tmp: Path(tmp).write_text(commit))
    return report


def _fetch_into(hub: _Hub, commit: str, sizes: dict[str, int], directory: Path, report: FetchReport,
                progress: bool) -> None:
    from .loading import PICKLE_SUFFIXES, CheckpointError, read_config

    if "config.json" not in sizes:
        raise CheckpointError(f"{hub.repo_id} has no config.json at {commit[:12]}: not a Hugging Face model repository")
    has_index, has_single = INDEX in sizes, SINGLE in sizes
    if not (has_index or has_single):
        pickles = sorted(n for n in sizes if n.endswith(PICKLE_SUFFIXES))
        raise CheckpointError(f"{hub.repo_id} has no safetensors weights"
                              + (f", only pickle files ({', '.join(pickles[:4])}); g3n_probe never unpickles" if pickles else ""))
    directory.mkdir(parents=True, exist_ok=True)
    report.bytes_fetched += _fetch_small(hub, commit, "config.json", sizes["config.json"], directory, None)
    config = read_config(directory)   # not Gemma 3n: refused before a weight byte moves
    index = None
    if has_index:
        report.bytes_fetched += _fetch_small(hub, commit, INDEX, sizes[INDEX], directory, None)
        try:
            index = json.loads((directory / INDEX).read_text())
            if not isinstance(index.get("weight_map"), dict):
                raise TypeError("weight_map is not a mapping")
        except (ValueError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{hub.repo_id}/{INDEX} is not a valid safetensors index: {error}") from None
    plans, report.files_skipped = _plan(hub, commit, sizes, config, index)
    small = {n: s for n, s in sizes.items() if _SMALL_FILE.match(n) and n != "config.json"}
    total = sum(p.size for p in plans) + sum(small.values())
    on_disk = sum(_bytes_on_disk(directory, p) for p in plans) + sum(
        s for n, s in small.items() if (directory / n).exists() and (directory / n).stat().st_size == s)
    report.resumed_from = on_disk
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=on_disk, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"fetching {hub.repo_id} (text only)")
    try:
        for name, size in small.items():
            report.bytes_fetched += _fetch_small(hub, commit, name, size, directory, bar)
        for plan in plans:
            report.bytes_fetched += _fetch_file(hub, commit, plan, directory, bar, report)
    finally:
        if bar is not None:
            bar.close()
    if index is not None:
        kept = {key: f for key, f in index["weight_map"].items()
                if f in {p.name for p in plans} and key in _keys_in(directory / f)}
        text_index = {"metadata": {**index.get("metadata", {}), "g3n_probe": f"text-only fetch of {hub.repo_id}@{commit}"},
                      "weight_map": kept}
        text_index["metadata"].pop("total_size", None)
        atomic_write(directory / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(text_index, indent=2)))


def _fetch_file(hub: _Hub, commit: str, plan: _FilePlan, directory: Path, bar: Any, report: FetchReport) -> int:
    (report.files_ranged if plan.prefix else report.files_whole).append(plan.name)
    return _fill(hub, commit, plan, directory, bar)


def _bytes_on_disk(directory: Path, plan: _FilePlan) -> int:
    done = directory / plan.name
    if done.exists() and done.stat().st_size == plan.size:
        return plan.size
    partial = directory / (plan.name + ".incomplete")
    return min(partial.stat().st_size, plan.size) if partial.exists() else 0


def _keys_in(path: Path) -> set[str]:
    from .loading import open_safetensors

    with open_safetensors(path) as handle:
        return set(handle.keys())


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
) -> Path:
    """A local checkpoint directory for a hub id: a full snapshot in the Hugging Face cache, the text-only
    checkpoint in the g3n cache, or (network allowed) a fetch of one."""
    if (full := hf_cache_checkpoint(repo_id, revision)) is not None:
        return full
    offline = local_files_only or not download or is_offline()
    if offline:
        if (cached := cached_checkpoint(repo_id, revision, cache_dir)) is not None:
            return cached
        from huggingface_hub import constants

        why = ("download=False" if not download else "local_files_only=True" if local_files_only
               else "offline mode is on (HF_HUB_OFFLINE)")
        raise FileNotFoundError(
            f"{repo_id!r} (revision {revision or 'main'}) is neither a local directory nor cached: not in the g3n "
            f"cache ({cache_root(cache_dir)}) nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), and {why} "
            f"forbids fetching it. Fetch it once with the network on (`g3n-probe fetch {repo_id}`), or pass a directory.")
    try:
        return fetch(repo_id, revision, cache_dir=cache_dir, token=token, endpoint=endpoint, progress=progress).path
    except FetchError as error:
        cached = cached_checkpoint(repo_id, revision, cache_dir)
        if cached is None:
            raise
        warnings.warn(f"{error}; using the cached text-only checkpoint {cached}", stacklevel=3)
        return cached
