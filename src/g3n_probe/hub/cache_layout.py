"""The hub fetch's cache on disk: where things are, no link followed, bytes checked by content.

Under the root (`hub.cache_root`), one directory per repository::

    models--<org>--<name>/
        .lock                    one fetch of this repository at a time
        refs/<revision>          the commit a branch or tag named when last fetched (offline use)
        partial/<commit>/        a fetch in progress: finished files, <file>.incomplete and its journal,
                                 .g3n_fetch.json (what each file is), .g3n_revision (what was asked)
        snapshots/<commit>/      complete, checked checkpoints, renamed from partial/ in one step
        configs/<commit>/        config and index only (`hub.fetch_config`)

**No link is followed.** Every directory below the root is entered or made only after ``lstat`` says
it is a real directory, every file is opened with ``O_NOFOLLOW``, and a snapshot's entries are
checked before it is used: a symbolic link anywhere inside is refused with its path
(`CacheLinkError`), never written through and never loaded. (The root itself may be a link: which
disk holds the cache is the user's choice.) A dangling link in a fetch's own working directory is
removed, since nothing can have meant it.

**Bytes are checked by content.** A file fetched whole is hashed as it streams and compared with the
hash the hub lists (LFS sha256, or the git blob id of a small file). A file rebuilt from byte ranges
cannot be compared with the remote file's hash without fetching all of it; its own sha256 is
recorded in ``.g3n_fetch.json``, so a later reuse can re-check it. An ``.incomplete`` file's
journal (``<file>.incomplete.sha256``: how many bytes were hashed, and their digest) lets the next
call resume only from bytes it can check. A file of an earlier snapshot is hashed again before it
is hard-linked into a new one, and every use of a snapshot checks that no file is missing or resized
(`damaged`; with ``full``, each file hashed again: `hub.verify`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .._util import atomic_write
from ..checkpoint.reading import CheckpointError
from .http import FetchError

RECORD = ".g3n_fetch.json"      # per directory: what each file is (remote identity, own sha256 and size)
REVISION_FILE = ".g3n_revision"  # in partial/<commit>: the revision that was asked for
JOURNAL = ".sha256"             # beside <file>.incomplete: its hashed length and their digest
JOURNAL_EVERY = 64 * 1024**2    # bytes between journal entries: a kill -9 costs at most this much
MAX_REF_NAME = 200              # a revision's file name in refs/ (quoted; atomic writes add 14 characters)
IDENTITY = ("remote_sha256", "keys")   # what makes two local files equal (see `hub._shard_identity`)
READ_BYTES = 8 * 1024**2   # one read while hashing a file


class CacheLinkError(PermissionError):
    """A symbolic link inside the g3n cache: refused, never followed."""


class ContentError(CheckpointError):
    """Bytes differ from what the hub lists or the record promises; the file was deleted."""


class DiskFullError(FetchError):
    """No space left where the fetch writes; what arrived is kept, and the next call resumes."""


# --- where things are ------------------------------------------------------------------------------

def repo_dir(root: Path, repo_id: str) -> Path:
    return root / ("models--" + repo_id.replace("/", "--"))


def ref_name(revision: str) -> str:
    """The file name in ``refs/`` that records ``revision``."""
    return quote(revision, safe="")


def ref_file(root: Path, repo_id: str, revision: str) -> Path:
    return repo_dir(root, repo_id) / "refs" / ref_name(revision)


# --- no link followed ----------------------------------------------------------------------------

def _link_error(path: Path) -> CacheLinkError:
    target = os.readlink(path) if path.is_symlink() else "?"
    return CacheLinkError(f"{path} is a symbolic link (to {target}) inside the g3n cache; g3n_probe never follows "
                          "links there, so it is neither written through nor loaded. Remove it (the fetch recreates "
                          "what it needs), or point cache_dir= / $G3N_PROBE_CACHE at the other disk instead.")


def real_dir(path: Path, root: Path, create: bool = False) -> bool:
    """Whether ``path`` exists, each of its parts below ``root`` checked to be a real directory (made
    when ``create``); a link among them is a `CacheLinkError`."""
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            if not create:
                return False
            with disk_errors(current):
                try:
                    os.mkdir(current)
                except FileExistsError:
                    pass   # made by another process meanwhile: checked below like any other
            mode = os.lstat(current).st_mode
        if stat.S_ISLNK(mode):
            raise _link_error(current)
        if not stat.S_ISDIR(mode):
            raise NotADirectoryError(f"{current} is in the g3n cache but is not a directory; remove it")
    return True


def check_entries(directory: Path, remove_dangling: bool = False) -> None:
    """No entry of ``directory`` is a link; a dangling one is removed when ``remove_dangling``."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.is_symlink():
                continue
            path = Path(entry.path)
            if remove_dangling and not path.exists():
                path.unlink()
                warnings.warn(f"removed {path}, a dangling symbolic link in the fetch's own directory", stacklevel=3)
                continue
            raise _link_error(path)


def complete_snapshot(snapshot: Path, root: Path) -> bool:
    """Whether ``snapshot`` is there, a real directory holding no link (a `CacheLinkError` otherwise)."""
    if not real_dir(snapshot, root):
        return False
    check_entries(snapshot)
    return True


def is_file(path: Path) -> bool:
    """Whether ``path`` is a regular file; a link there is a `CacheLinkError`."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(mode):
        raise _link_error(path)
    return stat.S_ISREG(mode)


def open_nofollow(path: Path, flags: int) -> int:
    """``os.open`` refusing a link at ``path`` (`CacheLinkError`) rather than opening what it names."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP or path.is_symlink():
            raise _link_error(path) from None
        raise


@contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """A full disk or quota while writing ``path`` says so, with the path and what is free there."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        try:
            free = f"{shutil.disk_usage(path.parent).free:,} bytes free there"
        except OSError:
            free = "free space unknown"
        raise DiskFullError(error.errno, f"no space left on device writing {path} ({free}): free some space, or "
                            "fetch onto another disk (cache_dir= or $G3N_PROBE_CACHE); what arrived is kept and "
                            "the next call resumes") from None


def write_file(path: Path, data: bytes | str) -> None:
    """``path`` replaced in one step (a link there is replaced, not written through); a full disk named."""
    raw = data.encode() if isinstance(data, str) else data
    with disk_errors(path):
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(raw))


# --- content -------------------------------------------------------------------------------------

def hash_file(path: Path, limit: int | None = None) -> str:
    """The sha256 of ``path`` (its first ``limit`` bytes), read once, never through a link."""
    digest = hashlib.sha256()
    with os.fdopen(open_nofollow(path, os.O_RDONLY), "rb") as handle:
        left = limit
        while left is None or left > 0:
            chunk = handle.read(READ_BYTES if left is None else min(READ_BYTES, left))
            if not chunk:
                break
            digest.update(chunk)
            left = None if left is None else left - len(chunk)
    return digest.hexdigest()


def git_blob_id(data: bytes) -> str:
    """The git object id of a file's bytes: what the hub lists as ``blobId`` for a file not in LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def read_record(directory: Path) -> dict[str, dict[str, Any]]:
    """File name -> what the file is, from ``directory``'s record (empty when it has none)."""
    try:
        record = json.loads(read_small(directory / RECORD, 64 * 1024**2))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        if isinstance(error, CacheLinkError):
            raise
        return {}
    return {k: v for k, v in record.items() if isinstance(v, dict)} if isinstance(record, dict) else {}


def same_identity(entry: dict[str, Any], identity: dict[str, Any]) -> bool:
    return bool(identity.get("remote_sha256")) and all(entry.get(k) == identity.get(k) for k in IDENTITY)


def verified(path: Path, entry: dict[str, Any]) -> str | None:
    """``path``'s sha256 when it is a regular file of the size and hash its record gives, else None
    (with a warning naming what differs). A record older than its ``sha256`` field is held to the
    remote file's hash, which only a file fetched whole has."""
    expected = entry.get("sha256") or entry.get("remote_sha256")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        raise _link_error(path)
    if not stat.S_ISREG(info.st_mode) or not isinstance(expected, str):
        return None
    size = entry.get("size")
    if isinstance(size, int) and info.st_size != size:
        warnings.warn(f"{path} is {info.st_size} bytes, its record says {size}: damaged, so it is "
                      "fetched instead of used", stacklevel=3)
        return None
    got = hash_file(path)
    if got != expected:
        if entry.get("sha256"):
            warnings.warn(f"{path} hashes to sha256 {got[:16]}…, its record says {expected[:16]}…: "
                          "damaged, so it is fetched instead of used", stacklevel=3)
        return None
    return got


def damaged(directory: Path, full: bool = False) -> list[str]:
    """How ``directory``'s files differ from its record: missing or resized (one ``lstat`` each), and
    with ``full``, changed bytes (each file hashed again)."""
    problems = []
    for name, entry in read_record(directory).items():
        path, size = directory / name, entry.get("size")
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            problems.append(f"{path} is missing")
            continue
        if stat.S_ISLNK(info.st_mode):
            raise _link_error(path)
        if isinstance(size, int) and info.st_size != size:
            problems.append(f"{path} is {info.st_size} bytes, its record says {size}")
        elif full and isinstance(entry.get("sha256"), str) and hash_file(path) != entry["sha256"]:
            problems.append(f"{path} does not hash to the sha256 recorded when it was fetched")
    return problems


def earlier_files(repo: Path, root: Path, commit: str) -> tuple[dict[str, list[tuple[dict, Path]]],
                                                                 dict[str, list[tuple[dict, Path]]]]:
    """Files other fetches of the repository left: (complete, in progress), each name -> (record
    entry, path). Complete ones come from snapshots and from interrupted fetches of other commits;
    ``.incomplete`` ones from interrupted fetches only."""
    complete: dict[str, list[tuple[dict, Path]]] = {}
    pending: dict[str, list[tuple[dict, Path]]] = {}
    for kind in ("snapshots", "partial"):
        if not real_dir(repo / kind, root):
            continue
        for directory in sorted((repo / kind).iterdir()):
            if kind == "partial" and directory.name == commit:
                continue
            if is_file(directory) or not real_dir(directory, root):
                continue
            for name, entry in read_record(directory).items():
                if is_file(directory / name) and (kind == "snapshots" or entry.get("sha256")):
                    complete.setdefault(name, []).append((entry, directory / name))
                elif kind == "partial" and is_file(directory / (name + ".incomplete")):
                    pending.setdefault(name, []).append((entry, directory / (name + ".incomplete")))
    return complete, pending


def link_or_copy(source: Path, target: Path) -> None:
    """Snapshot files are never written in place, so one inode can serve both."""
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        with disk_errors(target):
            atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def read_bytes(path: Path, limit: int = 4096) -> bytes:
    """A small file's first ``limit`` bytes, never through a link."""
    with os.fdopen(open_nofollow(path, os.O_RDONLY), "rb") as handle:
        return handle.read(limit)


def read_small(path: Path, limit: int = 4096) -> str:
    """A small text file's first ``limit`` bytes, decoded, never through a link."""
    return read_bytes(path, limit).decode(errors="replace")


def read_ref(ref: Path, root: Path) -> str | None:
    """The commit ``refs/<revision>`` records, if any; a link there is refused."""
    if not real_dir(ref.parent, root):
        return None
    try:
        return read_small(ref).strip()
    except FileNotFoundError:
        return None


def write_ref(ref: Path, root: Path, commit: str) -> None:
    """Record ``commit`` for offline use; a cache that cannot be written (read-only, full) only warns:
    the checkpoint is complete and is used as it is."""
    if read_ref(ref, root) == commit:
        return
    try:
        real_dir(ref.parent, root, create=True)
        write_file(ref, commit)
    except CacheLinkError:
        raise
    except OSError as error:
        warnings.warn(f"could not record {ref} -> {commit} ({error}); the checkpoint is used as it is, and offline "
                      f"use of this revision needs the commit ({commit}) instead", stacklevel=3)
