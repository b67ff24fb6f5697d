"""One file of a hub fetch, made complete and checked in the fetch's working directory.

`FilePlan` says what the local file is: a prefix (a header written locally, for a shard rebuilt from
byte ranges) and byte ranges of one remote file, in order; or an earlier fetch's file to reuse.
`fill` appends the ranges to ``<file>.incomplete`` through a `Sink` (hashed as it grows, journalled
so the next call resumes only from bytes it can check), resumes after each cut connection, then
checks the finished file: its size, the sha256 the hub lists (a file fetched whole), and its header
as the loader reads it. `fetch_small` fetches config, index and tokenizer files whole, checked
against the listing before they are written.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint.reading import CheckpointError, keys_in, tensor_offsets
from .cache_layout import (
    JOURNAL,
    JOURNAL_EVERY,
    READ_BYTES,
    RECORD,
    ContentError,
    disk_errors,
    git_blob_id,
    open_nofollow,
    read_bytes,
    read_small,
    same_identity,
    verified,
    write_file,
)
from .http import FetchError, HubClient, Listing, Transient, wait_or_give_up


@dataclass
class FilePlan:
    """A local file as ``prefix`` followed by byte ranges of one remote file, in order; or, when an
    earlier fetch holds a file of the same identity that still hashes to its record, that file."""

    name: str
    pieces: list[tuple[int, int]]      # (start, end) in the remote file of the same name
    remote_size: int | None = None     # the remote file's listed size (every ranged answer must report it)
    prefix: bytes = b""                # a header written locally (mixed shards)
    sha256: str | None = None          # the listed hash the finished file must have (fetched whole)
    identity: dict[str, Any] = field(default_factory=dict)   # equal identities make equal files
    keys: set[str] = field(default_factory=set)               # the tensors the finished file must hold
    reuse: Path | None = None          # a checked file of the same identity, from an earlier fetch
    reuse_sha256: str | None = None
    adopt: Path | None = None          # an interrupted fetch's .incomplete of the same identity

    @property
    def size(self) -> int:
        if self.reuse is not None:
            return self.reuse.stat().st_size
        return len(self.prefix) + sum(end - start for start, end in self.pieces)

    @property
    def key(self) -> str:
        """What an ``.incomplete`` file's journal is bound to: this prefix, these pieces, this remote file."""
        plan = json.dumps([self.identity, self.pieces, self.sha256]).encode()
        return hashlib.sha256(plan + self.prefix).hexdigest()[:32]


def fill(hub: HubClient, commit: str, plan: FilePlan, directory: Path, progress: Any, record: dict[str, dict]) -> int:
    """Make ``directory/plan.name`` complete and checked, resuming ``.incomplete``; returns the bytes fetched."""
    target = directory / plan.name
    if _finished_before(target, plan, record.get(plan.name, {})):
        return 0
    partial = directory / (plan.name + ".incomplete")
    sink = Sink(partial, plan.prefix, plan.size, plan.key, trust=plan.sha256 is not None)
    try:
        fetched = _stream_pieces(hub, commit, plan, sink, progress)
    finally:
        digest = sink.close()   # journals what arrived: the next call resumes from it
    _check_finished(hub, plan, sink, digest)
    os.replace(partial, target)
    sink.journal.unlink(missing_ok=True)
    record[plan.name] = {**plan.identity, "sha256": digest, "size": plan.size}
    write_file(directory / RECORD, json.dumps(record, indent=1))
    return fetched


def _stream_pieces(hub: HubClient, commit: str, plan: FilePlan, sink: Sink, progress: Any) -> int:
    """Append the plan's pieces from where ``sink`` stands, resuming after each cut; the bytes fetched."""
    fetched, position = 0, len(plan.prefix)   # where the current piece starts in the local file
    for start, end in plan.pieces:
        length, failures = end - start, 0
        while (done := min(max(sink.tell() - position, 0), length)) < length:
            arrived = 0
            try:
                for chunk in hub.stream(commit, plan.name, start + done, end, plan.remote_size):
                    if arrived + len(chunk) > length - done:
                        raise FetchError(f"{hub.repo_id}/{plan.name}: the server sent more bytes than asked for")
                    sink.write(chunk)
                    arrived += len(chunk)
                    if progress is not None:
                        progress.update(len(chunk))
                if arrived < length - done:
                    raise Transient(f"the answer ended after {arrived} of {length - done} bytes")
            except Transient as error:  # a cut connection: resume from what arrived
                sink.checkpoint()
                failures = wait_or_give_up(hub, plan.name, 0 if arrived else failures, error,
                                           f"run again to resume from {sink.tell()} of {plan.size} bytes")
            finally:
                fetched += arrived
        position += length
    return fetched


def _finished_before(target: Path, plan: FilePlan, entry: dict[str, Any]) -> bool:
    """A file an interrupted call of this fetch finished: kept if it still hashes to its record."""
    if not os.path.lexists(target):
        return False
    if same_identity(entry, plan.identity) and entry.get("size") == plan.size and verified(target, entry):
        return True
    target.unlink()   # of another plan, or damaged since: made again
    return False


def adopt(plan: FilePlan, directory: Path) -> None:
    """Move ``plan.adopt``, an interrupted fetch's ``.incomplete`` of the same identity, into ``directory``
    (with its journal, which vouches for its bytes only if the new plan's key matches), unless this
    fetch has one of its own."""
    partial = directory / (plan.name + ".incomplete")
    source = plan.adopt
    if source is None or os.path.lexists(partial) or not os.path.lexists(source):
        return
    os.replace(source, partial)
    journal = source.with_name(source.name + JOURNAL)
    if os.path.lexists(journal):
        os.replace(journal, partial.with_name(partial.name + JOURNAL))


def _check_finished(hub: HubClient, plan: FilePlan, sink: Sink, digest: str) -> None:
    """The complete ``.incomplete``: its size, its hash against the listing, its header as the loader reads it."""
    where = f"{hub.repo_id}/{plan.name}"
    size = os.lstat(sink.path).st_size
    if size != plan.size:
        raise FetchError(f"{where}: {size} bytes on disk, expected {plan.size}")
    if plan.sha256 is not None and digest != plan.sha256:
        sink.discard()
        raise ContentError(f"{where}: the bytes that arrived hash to sha256 {digest[:16]}…, the hub lists "
                           f"{plan.sha256[:16]}… for this file (LFS); they are not the file the listing names (changed "
                           "in transit, or a server sending other bytes). It was deleted, with the files rebuilt from "
                           "byte ranges of the same server (no listed hash can check those); the next call fetches "
                           "them afresh")
    try:
        tensor_offsets(sink.path)   # as the loader reads it: overlaps refused
        keys = keys_in(sink.path)   # safetensors checks on open that each tensor's bytes match its header entry
        if missing := sorted(plan.keys - keys):
            raise CheckpointError(f"it does not contain {missing[0]}, although the index says it does")
    except CheckpointError as error:
        sink.discard()
        why = ("its bytes are the ones the hub lists (the sha256 matches): the repository's own file is invalid, and "
               "fetching it again will not help" if plan.sha256 else "it was deleted; the next call fetches it afresh")
        raise CheckpointError(f"{where} arrived complete but is not a valid safetensors file ({error}); {why}") from None


def listed_mismatch(listing: Listing, name: str, data: bytes) -> str | None:
    """How ``data`` differs from what the hub lists for ``name`` (its hash, else its size), if it does."""
    if (sha := listing.sha256.get(name)) and (got := hashlib.sha256(data).hexdigest()) != sha:
        return f"sha256 {got[:16]}… where the hub lists {sha[:16]}…"
    if (blob := listing.blob_ids.get(name)) and (got := git_blob_id(data)) != blob:
        return f"git blob id {got[:12]}… where the hub lists {blob[:12]}…"
    if listing.sizes.get(name) and len(data) != listing.sizes[name]:
        return f"{len(data)} bytes where the hub lists {listing.sizes[name]}"
    return None


def fetch_small(hub: HubClient, listing: Listing, name: str, directory: Path, progress: Any) -> int:
    """A small file, whole, checked against the listing before it is written; a listing without its
    size (null or 0) fetches it with no ``Range``."""
    target = directory / name
    if os.path.lexists(target) and listed_mismatch(listing, name, read_bytes(target, 1 << 30)) is None \
            and (listing.blob_ids.get(name) or listing.sha256.get(name) or listing.sizes.get(name)):
        return 0
    size = listing.sizes.get(name)
    data = hub.read(listing.commit, name, 0, size, size) if size else hub.read(listing.commit, name, 0, None)
    if (problem := listed_mismatch(listing, name, data)) is not None:
        raise ContentError(f"{hub.repo_id}/{name}: the bytes that arrived have {problem}: not the file the listing "
                           "names (changed in transit, or a server sending other bytes); nothing was written, the next "
                           "call fetches it afresh")
    write_file(target, data)
    if progress is not None:
        progress.update(len(data))
    return len(data)


def forget_ranged(directory: Path, plans: list[FilePlan], record: dict[str, dict]) -> None:
    """After a server sent other bytes than it lists: the files rebuilt from its byte ranges, which no
    listed hash can check, are fetched again too."""
    for plan in plans:
        if plan.prefix:
            for name in (plan.name, plan.name + ".incomplete", plan.name + ".incomplete" + JOURNAL):
                (directory / name).unlink(missing_ok=True)
            record[plan.name] = dict(plan.identity)
    write_file(directory / RECORD, json.dumps(record, indent=1))


def bytes_on_disk(directory: Path, plan: FilePlan) -> int:
    done = directory / plan.name
    if done.exists() and done.stat().st_size == plan.size:
        return plan.size
    partial = directory / (plan.name + ".incomplete")
    return min(partial.stat().st_size, plan.size) if partial.exists() else 0


class Sink:
    """``<file>.incomplete``: appended to in a fixed order, hashed as it grows, its hashed length and
    digest journalled beside it (every `JOURNAL_EVERY` bytes and when closed).

    Opening resumes only from bytes it can check: what the journal vouches for (hashed once now), or,
    with no journal and ``trust`` (a file whose listed hash is checked at the end), all of it. Anything
    else starts over after ``prefix``.
    """

    def __init__(self, path: Path, prefix: bytes, size: int, key: str, trust: bool) -> None:
        self.path, self.size, self.key = path, size, key
        self.journal = path.with_name(path.name + JOURNAL)
        self.hash = hashlib.sha256()
        self.file = os.fdopen(open_nofollow(path, os.O_RDWR | os.O_CREAT), "r+b")
        self.unjournalled = 0
        kept = self._resumable(prefix, trust)
        if kept == 0:
            self.hash = hashlib.sha256()
        self.file.seek(kept)
        with disk_errors(path):
            self.file.truncate(kept)
        if kept == 0:
            self.write(prefix)

    def _hash_first(self, count: int) -> None:
        """``self.hash`` over the file's first ``count`` bytes: the one read of a resumed prefix."""
        self.hash = hashlib.sha256()
        self.file.seek(0)
        left = count
        while left:
            chunk = self.file.read(min(left, READ_BYTES))
            if not chunk:
                break
            self.hash.update(chunk)
            left -= len(chunk)

    def _resumable(self, prefix: bytes, trust: bool) -> int:
        """How many bytes of an earlier attempt to keep (``self.hash`` is over them)."""
        have = os.fstat(self.file.fileno()).st_size
        if have > self.size or have < len(prefix) or self.file.read(len(prefix)) != prefix:
            return 0
        try:
            key, hashed, digest = read_small(self.journal).split()
        except FileNotFoundError:
            if trust:
                self._hash_first(have)   # checked at the end, against the listed hash
            return have if trust else 0
        except (OSError, ValueError):
            return 0
        if key != self.key or not hashed.isdigit() or not len(prefix) <= int(hashed) <= have:
            return 0   # a journal of another plan vouches for nothing here
        self._hash_first(int(hashed))
        if self.hash.hexdigest() != digest:
            warnings.warn(f"{self.path}: its first {hashed} bytes differ from what was fetched into it (sha256 "
                          "against its journal); fetching it from the start", stacklevel=4)
            return 0
        return int(hashed)

    def tell(self) -> int:
        return self.file.tell()

    def write(self, chunk: bytes) -> None:
        with disk_errors(self.path):
            self.file.write(chunk)
        self.hash.update(chunk)
        self.unjournalled += len(chunk)
        if self.unjournalled >= JOURNAL_EVERY:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Flush, then journal the bytes written so far (after the data: a journal never runs ahead)."""
        with disk_errors(self.path):
            self.file.flush()
        write_file(self.journal, f"{self.key} {self.file.tell()} {self.hash.copy().hexdigest()}\n")
        self.unjournalled = 0

    def close(self) -> str:
        """Journal what arrived and close; the sha256 of the whole file as written."""
        try:
            self.checkpoint()
        finally:
            self.file.close()
        return self.hash.hexdigest()

    def discard(self) -> None:
        for path in (self.path, self.journal):
            path.unlink(missing_ok=True)
