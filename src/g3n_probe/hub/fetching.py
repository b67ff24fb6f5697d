"""From a hub id to a local text-only checkpoint, fetching only the bytes the text path reads.

A Gemma 3n repository holds the text model and two towers g3n_probe never runs. `fetch` asks the
hub for the commit and its files (one request; a busy hub's 429/5xx is asked again, as it asks),
takes ``config.json`` first (anything that is not Gemma 3n is refused before a weight byte moves),
then reads the index to see which shards hold tensors the loader reads (`checkpoint.keys_read`).
What happens to a shard is decided by what the index says it holds, never by its name:

* a shard holding none of them is never requested;
* a shard holding only them is fetched whole, hashed as it streams and compared with the LFS
  sha256 the hub lists;
* a mixed shard is fetched as the byte ranges of those tensors (HTTP ``Range``, as
  huggingface_hub's file system reads), written into a safetensors file of its own whose header
  lists just them. Its remote header is checked as the loader checks a file (`parse_header`:
  overlapping tensors refused; `check_as_safetensors_does`) before a byte of its tensors moves.

Everything goes into ``<root>/models--<org>--<name>/partial/<commit>/`` and is renamed to
``snapshots/<commit>/`` in one step when every file is complete and checked, so a half-fetched
checkpoint is never loaded. A shard in progress is ``<name>.incomplete``: bytes are appended in a
fixed order, so its size says where to resume (after a cut connection, in the same call; after an
interrupt, on the next, from the bytes its journal vouches for). ``refs/<revision>`` records the
commit for offline use. A shard whose remote file is unchanged (same LFS sha256) is taken from an
earlier snapshot, or from an interrupted fetch of another commit, after hashing it again. How the
cache is laid out, and why no link in it is ever followed: `hub_files`.

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

from ..checkpoint.reading import (
    FETCH_NOTE,
    INDEX,
    PICKLE_SUFFIXES,
    SINGLE,
    CheckpointError,
    by_file,
    check_as_safetensors_does,
    header_length,
    keys_in,
    keys_read,
    parse_header,
    read_config,
)
from .cache_layout import (
    MAX_REF_NAME,
    RECORD,
    REVISION_FILE,
    CacheLinkError,
    ContentError,
    DiskFullError,
    check_entries,
    complete_snapshot,
    damaged,
    earlier_files,
    hash_file,
    link_or_copy,
    read_record,
    read_ref,
    read_small,
    real_dir,
    ref_file,
    ref_name,
    repo_dir,
    same_identity,
    verified,
    write_file,
    write_ref,
)
from .http import HEX_COMMIT, FetchError, HubAccessError, HubClient, Listing
from .transfers import FilePlan, adopt, bytes_on_disk, fetch_small, fill, forget_ranged

__all__ = ["CacheLinkError", "ContentError", "DiskFullError", "FetchError", "FetchReport", "HubAccessError",
           "cache_root", "cached_checkpoint", "fetch", "fetch_config", "hf_cache_checkpoint", "is_offline",
           "locate", "looks_like_hub_id", "verify"]

_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")
# The files a checkpoint directory needs besides its weights: config, generation settings, tokenizer.
# Chosen by name, but never a weight file: every .safetensors file is planned from the index.
_SMALL_FILE = re.compile(r"^(config\.json|generation_config\.json|tokenizer[\w.\-]*|special_tokens_map\.json|"
                         r"added_tokens\.json|chat_template[\w.\-]*|README\.md|LICENSE[\w.\-]*)$")


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a hub repository id (``owner/name``) rather than a local path."""
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
    if revision is not None and len(ref_name(revision).encode()) > MAX_REF_NAME:
        raise ValueError(f"revision is {len(revision)} characters ({len(ref_name(revision).encode())} as the file "
                         f"name that records it); at most {MAX_REF_NAME} fit the cache's refs/ directory: pass a "
                         "branch, tag or 40-digit commit")


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


# --- what is cached ------------------------------------------------------------------------------

def cached_checkpoint(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The complete text-only checkpoint of ``repo_id`` at ``revision`` in the g3n cache, if any; a
    symbolic link on the way (the ref, the snapshot, a file in it) is a `CacheLinkError`."""
    root, revision = cache_root(cache_dir), revision or "main"
    commit = revision if HEX_COMMIT.match(revision) else read_ref(ref_file(root, repo_id, revision), root)
    if commit is None or not HEX_COMMIT.match(commit):
        return None
    snapshot = repo_dir(root, repo_id) / "snapshots" / commit
    if not complete_snapshot(snapshot, root):
        return None
    if problems := damaged(snapshot):
        warnings.warn(f"{'; '.join(problems)}: the cached checkpoint {snapshot} is damaged and not used; fetching "
                      "it again (online) repairs it, fetching only what is damaged", stacklevel=2)
        return None
    return snapshot


def verify(path: str | os.PathLike) -> list[str]:
    """A fetched checkpoint re-checked: every file hashed again against the sha256 recorded when it was
    fetched (one read of the checkpoint). What differs, or nothing. (Each use checks only that no file
    is missing or resized; each reuse in a later fetch hashes the file again.)"""
    return damaged(Path(path), full=True)


def hf_cache_checkpoint(repo_id: str, revision: str | None = None) -> Path | None:
    """A full snapshot in the Hugging Face cache whose weights are all present, if any."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # every failure here means "not in the cache"
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

def _shard_identity(remote_sha256: str | None, keys: set[str]) -> dict[str, Any]:
    """The remote file (its LFS hash) and the tensors taken from it: all a local file depends on."""
    return {"remote_sha256": remote_sha256, "keys": hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()}


def _check_shard(hub: HubClient, listing: Listing, filename: Any) -> None:
    if not isinstance(filename, str) or "/" in filename or filename.startswith(".") \
            or not filename.endswith(".safetensors"):
        raise CheckpointError(f"{hub.repo_id}: the index names {filename!r}; shards must be .safetensors files "
                              "beside it")
    if filename not in listing.sizes:
        raise CheckpointError(f"{hub.repo_id}: the index names {filename}, which the repository does not hold")
    if not listing.sizes[filename]:
        raise CheckpointError(f"{hub.repo_id}: the hub lists {filename} with no size (null or 0); a shard's byte "
                              "ranges are planned from its listed size, so it cannot be fetched. The listing is the "
                              "hub's: try again later, or download the repository another way and load its directory")


def _remote_header(hub: HubClient, listing: Listing, filename: str) -> dict[str, Any]:
    """A remote safetensors file's header entries: two small ranged reads, checked as the loader checks
    a local file (`parse_header` refuses overlapping tensors) before any of its tensors' bytes move."""
    size = listing.sizes[filename] or 0
    where = f"{hub.repo_id}/{filename}"
    length = header_length(hub.read(listing.commit, filename, 0, 8, size) if size >= 8 else b"", size, where)
    text = hub.read(listing.commit, filename, 8, 8 + length, size)
    header = parse_header(text, size, where)
    check_as_safetensors_does(text, size, where)
    return header


def _ranged_plan(hub: HubClient, filename: str, header: dict[str, Any], keys: set[str]) -> FilePlan:
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
    return FilePlan(filename, pieces, prefix=struct.pack("<Q", len(text)) + text)


def _reused(name: str, identity: dict[str, Any], complete: dict[str, list[tuple[dict, Path]]]) -> FilePlan | None:
    """``name`` taken from an earlier fetch: the first file of the same identity that still hashes to
    its record (a damaged one is passed over with a warning, and the file fetched instead)."""
    for entry, path in complete.get(name, ()):
        if same_identity(entry, identity) and (digest := verified(path, entry)) is not None:
            return FilePlan(name, [], reuse=path, reuse_sha256=digest)
    return None


def _plan(hub: HubClient, listing: Listing, config: Any, index: dict | None,
          earlier: tuple[dict[str, list[tuple[dict, Path]]], dict[str, list[tuple[dict, Path]]]],
          ) -> tuple[list[FilePlan], list[str]]:
    """The weight files to fetch (whole or ranged) or reuse, and the shards never touched."""
    headers: dict[str, dict[str, Any]] = {}
    if index is None:
        _check_shard(hub, listing, SINGLE)
        headers[SINGLE] = _remote_header(hub, listing, SINGLE)
        mapping = {key: SINGLE for key in headers[SINGLE] if key != "__metadata__"}
    else:
        mapping = index["weight_map"]
    held = {filename: set(keys) for filename, keys in by_file(mapping).items()}
    for filename in held:   # once per shard, not once per key
        _check_shard(hub, listing, filename)
    read = set(keys_read(mapping, config)[0])
    plans, skipped = [], []
    for filename in sorted(held):
        wanted = held[filename] & read
        if not wanted:
            skipped.append(filename)
            continue
        identity = _shard_identity(listing.sha256.get(filename), wanted)
        plan = _reused(filename, identity, earlier[0])
        if plan is None:
            if wanted == held[filename] and index is not None:   # by content: every tensor in it is read
                plan = FilePlan(filename, [(0, listing.sizes[filename])], sha256=listing.sha256.get(filename))
            else:
                if filename not in headers:
                    headers[filename] = _remote_header(hub, listing, filename)
                plan = _ranged_plan(hub, filename, headers[filename], wanted)
            plan.remote_size = listing.sizes[filename]
            plan.adopt = next((path for entry, path in earlier[1].get(filename, ()) if same_identity(entry, identity)),
                              None)
        plan.identity, plan.keys = identity, wanted
        plans.append(plan)
    return plans, skipped


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
    when the network fails (what arrived is kept: the next call resumes; `DiskFullError` for a full disk),
    `CheckpointError` for a repository that is not a Gemma 3n safetensors checkpoint (`ContentError` for
    bytes that are not the ones the hub lists), `CacheLinkError` for a symbolic link inside the cache.
    """
    from filelock import FileLock

    _check_names(repo_id, revision)
    hub = HubClient(repo_id, token, endpoint)
    listing = hub.info(revision)
    root = cache_root(cache_dir)
    repo = repo_dir(root, repo_id)
    snapshot = repo / "snapshots" / listing.commit
    report = FetchReport(repo_id, listing.commit, snapshot, bytes_snapshot=sum(s or 0 for s in listing.sizes.values()))
    report.cached = complete_snapshot(snapshot, root) and not damaged(snapshot)
    if not report.cached:
        root.mkdir(parents=True, exist_ok=True)
        real_dir(repo, root, create=True)
        with FileLock(str(repo / ".lock")):
            report.cached = complete_snapshot(snapshot, root)   # another process may have finished it meanwhile
            if report.cached and (problems := damaged(snapshot)):
                _reopen(snapshot, repo / "partial" / listing.commit, root, problems)
                report.cached = False
            if not report.cached:
                _fetch_locked(hub, listing, repo, root, revision or "main", report, progress)
    report.bytes_text = sum(p.stat().st_size for p in snapshot.iterdir() if p.is_file() and not p.name.startswith(".g3n"))
    write_ref(ref_file(root, repo_id, revision or "main"), root, listing.commit)
    return report


def _reopen(snapshot: Path, partial: Path, root: Path, problems: list[str]) -> None:
    """A damaged snapshot back to partial/, where each file is hashed against its record again and
    only what is damaged or missing is fetched."""
    warnings.warn(f"{'; '.join(problems)}: repairing {snapshot}, fetching only what is damaged", stacklevel=3)
    if real_dir(partial, root):
        shutil.rmtree(partial)
    real_dir(partial.parent, root, create=True)
    os.replace(snapshot, partial)


def _fetch_locked(hub: HubClient, listing: Listing, repo: Path, root: Path, revision: str, report: FetchReport,
                  progress: bool) -> None:
    """The fetch proper, holding the repository's lock: into partial/<commit>, then renamed to snapshots/."""
    partial = repo / "partial" / listing.commit
    real_dir(partial, root, create=True)
    check_entries(partial, remove_dangling=True)
    write_file(partial / REVISION_FILE, revision)
    try:
        taken = _fetch_into(hub, listing, repo, root, partial, report, progress)
    except ContentError:
        raise   # that file (and the unverifiable ranged ones) was deleted; the rest is kept for the next call
    except (CheckpointError, HubAccessError, FileNotFoundError, ValueError):
        shutil.rmtree(partial, ignore_errors=True)   # nothing here is worth resuming
        raise
    check_entries(partial)   # nothing was planted while it ran
    real_dir(repo / "snapshots", root, create=True)
    os.replace(partial, repo / "snapshots" / listing.commit)
    _clean_partials(repo, root, revision, taken)


def _clean_partials(repo: Path, root: Path, revision: str, taken: dict[Path, set[str]]) -> None:
    """Interrupted fetches of other commits that this one made pointless: those of the same branch or
    tag (which now names this commit), and those whose every file this one took over."""
    if not real_dir(repo / "partial", root):
        return
    for directory in (repo / "partial").iterdir():
        if directory.is_symlink() or not directory.is_dir():
            continue
        try:
            asked = read_small(directory / REVISION_FILE).strip()
        except OSError:
            asked = None
        held = {name for name in read_record(directory)
                if os.path.lexists(directory / name) or os.path.lexists(directory / (name + ".incomplete"))}
        superseded = asked == revision and not HEX_COMMIT.match(revision)
        if superseded or (directory in taken and held <= taken[directory]):
            shutil.rmtree(directory, ignore_errors=True)


def _fetch_into(hub: HubClient, listing: Listing, repo: Path, root: Path, directory: Path, report: FetchReport,
                progress: bool) -> dict[Path, set[str]]:
    """Every file of the text-only checkpoint into ``directory``; which files of interrupted fetches of
    other commits it took (their directory -> names)."""
    _check_repository(hub, listing)
    report.bytes_fetched += fetch_small(hub, listing, "config.json", directory, None)
    config = read_config(directory)   # not Gemma 3n: refused before a weight byte moves
    index = _fetch_index(hub, listing, directory, report) if INDEX in listing.sizes else None
    plans, report.files_skipped = _plan(hub, listing, config, index, earlier_files(repo, root, listing.commit))
    record = _planned_record(read_record(directory), plans)
    taken: dict[Path, set[str]] = {}
    for plan in plans:
        if plan.reuse is not None:
            link_or_copy(plan.reuse, directory / plan.name)
            record[plan.name] = {**plan.identity, "sha256": plan.reuse_sha256, "size": plan.size}
            report.files_reused.append(plan.name)
        adopt(plan, directory)
        source = plan.reuse or plan.adopt
        if source is not None and source.parent.parent == repo / "partial":
            taken.setdefault(source.parent, set()).add(plan.name)
    write_file(directory / RECORD, json.dumps(record, indent=1))
    small = sorted(n for n in listing.sizes if _SMALL_FILE.match(n) and n != "config.json"
                   and not n.endswith(".safetensors"))
    bar = _progress(hub, listing, directory, plans, small, report, progress)
    try:
        for name in small:
            report.bytes_fetched += fetch_small(hub, listing, name, directory, bar)
        for plan in plans:
            if plan.reuse is None:
                (report.files_ranged if plan.prefix else report.files_whole).append(plan.name)
                report.bytes_fetched += fill(hub, listing.commit, plan, directory, bar, record)
    except ContentError:
        forget_ranged(directory, plans, record)
        raise
    finally:
        if bar is not None:
            bar.close()
    if index is not None:
        _write_text_index(hub, listing.commit, directory, index, plans)
    for name in ["config.json", *small] + ([INDEX] if index is not None else []):   # as written: `verify` re-checks
        record[name] = {"sha256": hash_file(directory / name), "size": (directory / name).stat().st_size}
    write_file(directory / RECORD, json.dumps(record, indent=1))
    return taken


def _check_repository(hub: HubClient, listing: Listing) -> None:
    if "config.json" not in listing.sizes:
        raise CheckpointError(f"{hub.repo_id} has no config.json at {listing.commit[:12]}: not a Hugging Face model "
                              "repository")
    if INDEX not in listing.sizes and SINGLE not in listing.sizes:
        pickles = sorted(n for n in listing.sizes if n.endswith(PICKLE_SUFFIXES))
        raise CheckpointError(f"{hub.repo_id} has no safetensors weights"
                              + (f", only pickle files ({', '.join(pickles[:4])}); g3n_probe never unpickles"
                                 if pickles else ""))


def _fetch_index(hub: HubClient, listing: Listing, directory: Path, report: FetchReport) -> dict:
    report.bytes_fetched += fetch_small(hub, listing, INDEX, directory, None)
    try:
        index = json.loads((directory / INDEX).read_text())
        if not isinstance(index.get("weight_map"), dict):
            raise TypeError("weight_map is not a mapping")
        if not all(isinstance(name, str) for name in index["weight_map"].values()):
            raise TypeError("weight_map names a shard by something other than a file name")
    except (ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{hub.repo_id}/{INDEX} is not a valid safetensors index: {error}") from None
    return index


def _planned_record(old: dict[str, dict], plans: list[FilePlan]) -> dict[str, dict]:
    """What each planned file is; files an interrupted call finished keep their hash (checked before use)."""
    return {p.name: old[p.name] if same_identity(old.get(p.name, {}), p.identity) and old[p.name].get("sha256")
            else dict(p.identity) for p in plans}


def _progress(hub: HubClient, listing: Listing, directory: Path, plans: list[FilePlan], small: list[str],
              report: FetchReport, show: bool) -> Any:
    """Sets how much an interrupted fetch left on disk; a progress bar from there, if ``show``."""
    sizes = {n: listing.sizes[n] or 0 for n in small}
    total = sum(p.size for p in plans) + sum(sizes.values())
    on_disk = sum(bytes_on_disk(directory, p) for p in plans) + sum(
        s for n, s in sizes.items() if (directory / n).exists() and (directory / n).stat().st_size == s)
    report.resumed_from = on_disk - sum(p.size for p in plans if p.name in report.files_reused)
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=on_disk, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"fetching {hub.repo_id} (text only)")


def _write_text_index(hub: HubClient, commit: str, directory: Path, index: dict, plans: list[FilePlan]) -> None:
    present = {p.name: keys_in(directory / p.name) for p in plans}
    kept = {key: f for key, f in index["weight_map"].items() if key in present.get(f, ())}
    metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    metadata = {k: v for k, v in metadata.items() if k != "total_size"}
    metadata[FETCH_NOTE] = (f"text-only fetch of {hub.repo_id}@{commit}: the towers' tensors and the KV-shared "
                            "layers' k/v were not fetched")
    write_file(directory / INDEX, json.dumps({"metadata": metadata, "weight_map": kept}, indent=2))


def fetch_config(repo_id: str, revision: str | None = None, *, cache_dir: str | os.PathLike | None = None,
                 token: str | bool | None = None, endpoint: str | None = None) -> Path:
    """A directory with just ``config.json`` (and the index) of ``repo_id``: enough to plan, print the
    point table or the layers, without fetching weights. ``<root>/models--…/configs/<commit>/``."""
    _check_names(repo_id, revision)
    hub = HubClient(repo_id, token, endpoint)
    listing = hub.info(revision)
    root = cache_root(cache_dir)
    directory = repo_dir(root, repo_id) / "configs" / listing.commit
    root.mkdir(parents=True, exist_ok=True)
    real_dir(directory, root, create=True)
    check_entries(directory, remove_dangling=True)
    for name in ("config.json", INDEX):
        if name in listing.sizes:
            fetch_small(hub, listing, name, directory, None)
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
    if cached is not None and revision is not None and HEX_COMMIT.match(revision):
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
