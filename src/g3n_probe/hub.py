"""From a hub id to a local text-only checkpoint, fetching only the bytes the text path reads.

A Gemma 3n repository holds the text model and two towers g3n_probe never runs. `fetch` asks the
hub for the commit and its files (one request), takes ``config.json`` first (anything that is not
Gemma 3n is refused before a weight byte moves), then reads the index to see which shards hold
tensors the loader reads (`checkpoint.keys_read`):

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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ._util import atomic_write
from .checkpoint import (
    FETCH_NOTE,
    INDEX,
    PICKLE_SUFFIXES,
    SINGLE,
    CheckpointError,
    header_length,
    keys_in,
    keys_read,
    parse_header,
    read_config,
)
from .hub_http import FetchError, HubAccessError, HubClient, Transient, wait_or_give_up

RECORD = ".g3n_fetch.json"   # per snapshot: which remote file (LFS sha256) each local file was cut from
_HEX_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")
# The files a checkpoint directory needs besides its weights: config, generation settings, tokenizer.
_SMALL_FILE = re.compile(r"^(config\.json|generation_config\.json|tokenizer[\w.\-]*|special_tokens_map\.json|"
                         r"added_tokens\.json|chat_template[\w.\-]*|README\.md|LICENSE[\w.\-]*)$")


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


def _shard_identity(remote_sha256: str | None, keys: set[str]) -> dict[str, Any]:
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


def _remote_header(hub: HubClient, commit: str, filename: str, size: int) -> dict[str, Any]:
    """A remote safetensors file's header entries (`checkpoint.parse_header`): two small ranged reads."""
    where = f"{hub.repo_id}/{filename}"
    length = header_length(hub.read(commit, filename, 0, 8) if size >= 8 else b"", size, where)
    return parse_header(hub.read(commit, filename, 8, 8 + length), size, where)


def _ranged_plan(hub: HubClient, filename: str, header: dict[str, Any], keys: set[str]) -> _FilePlan:
    """A safetensors file holding only ``keys``: a new header, then their bytes as remote ranges."""
    if missing := sorted(keys - set(header)):
        raise CheckpointError(f"{hub.repo_id}/{filename} does not contain {missing[0]}, although the index says it does")
    out: dict[str, Any] = {"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}
    pieces: list[tuple[int, int]] = []
    offset = 0
    for key in sorted(keys, key=lambda k: header[k][2]):
        dtype, shape, start, end = header[key]
        out[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + end - start]}
        offset += end - start
        if pieces and pieces[-1][1] == start:
            pieces[-1] = (pieces[-1][0], end)   # adjacent: one request
        else:
            pieces.append((start, end))
    text = json.dumps(out, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # safetensors pads its header to 8 bytes
    return _FilePlan(filename, pieces, struct.pack("<Q", len(text)) + text)


def _plan(hub: HubClient, commit: str, sizes: dict[str, int], hashes: dict[str, str], config: Any, index: dict | None,
          earlier: dict[str, list[tuple[dict, Path]]]) -> tuple[list[_FilePlan], list[str]]:
    """The weight files to fetch (whole or ranged) or reuse, and the shards never touched."""

    headers: dict[str, dict[str, Any]] = {}
    if index is None:
        headers[SINGLE] = _remote_header(hub, commit, SINGLE, sizes[SINGLE])
        mapping = {key: SINGLE for key in headers[SINGLE] if key != "__metadata__"}
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
        identity = _shard_identity(hashes.get(filename), wanted)
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
            plans.append(_ranged_plan(hub, filename, headers[filename], wanted))
            plans[-1].identity = identity
    return plans, skipped


# --- writing -------------------------------------------------------------------------------------

def _fill(hub: HubClient, commit: str, plan: _FilePlan, directory: Path, progress: Any) -> int:
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
                        raise Transient(f"the answer ended after {arrived} of {length - done} bytes")
                except Transient as error:  # a cut connection: resume from what arrived
                    out.flush()
                    failures = wait_or_give_up(hub, plan.name, 0 if arrived else failures, error,
                                                f"run again to resume from {out.tell()} of {plan.size} bytes")
                finally:
                    out.flush()
                    fetched += arrived
            position += length
    if partial.stat().st_size != plan.size:
        raise FetchError(f"{hub.repo_id}/{plan.name}: {partial.stat().st_size} bytes on disk, expected {plan.size}")
    try:
        keys_in(partial)   # safetensors checks on open that each tensor's bytes match its header entry
    except CheckpointError as error:
        partial.unlink()   # complete yet invalid: the next call fetches it afresh
        raise CheckpointError(f"{hub.repo_id}/{plan.name} arrived complete but is not a valid safetensors file "
                              f"({error}); it was deleted, run again to fetch it afresh") from None
    os.replace(partial, target)
    return fetched


def _fetch_small(hub: HubClient, commit: str, name: str, size: int, directory: Path, progress: Any) -> int:
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


    _check_names(repo_id, revision)
    hub = HubClient(repo_id, token, endpoint)
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


def _fetch_into(hub: HubClient, commit: str, sizes: dict[str, int], hashes: dict[str, str], repo: Path,
                directory: Path, report: FetchReport, progress: bool) -> None:

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
        present = {p.name: keys_in(directory / p.name) for p in plans}
        kept = {key: f for key, f in index["weight_map"].items() if key in present.get(f, ())}
        metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
        metadata = {k: v for k, v in metadata.items() if k != "total_size"}
        metadata[FETCH_NOTE] = (f"text-only fetch of {hub.repo_id}@{commit}: the towers' tensors and the KV-shared "
                                 "layers' k/v were not fetched")
        atomic_write(directory / INDEX, lambda tmp: Path(tmp).write_text(
            json.dumps({"metadata": metadata, "weight_map": kept}, indent=2)))


def _bytes_on_disk(directory: Path, plan: _FilePlan) -> int:
    done = directory / plan.name
    if done.exists() and done.stat().st_size == plan.size:
        return plan.size
    partial = directory / (plan.name + ".incomplete")
    return min(partial.stat().st_size, plan.size) if partial.exists() else 0


def fetch_config(repo_id: str, revision: str | None = None, *, cache_dir: str | os.PathLike | None = None,
                 token: str | bool | None = None, endpoint: str | None = None) -> Path:
    """A directory with just ``config.json`` (and the index) of ``repo_id``: enough to plan, print the
    point table or the layers, without fetching weights. ``<root>/models--…/configs/<commit>/``."""
    _check_names(repo_id, revision)
    hub = HubClient(repo_id, token, endpoint)
    commit, sizes, _ = hub.info(revision)
    directory = _repo_dir(cache_root(cache_dir), repo_id) / "configs" / commit
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", INDEX):
        if name in sizes:
            _fetch_small(hub, commit, name, sizes[name], directory, None)
    return directory


def locate(
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
