"""`ActivationDataset`: the rows of one point in a `cache_dataset` directory, padding left out.

A shard holds a point's values for up to ``batch_size`` texts, left padded to the shard's longest, in the
point's own layout — ``[B,T,D]``, or ``[S,B,T,D]`` for a stream stack, whose batch is dimension 1. The
dataset turns every real (non-padding) token of every text into one row: ``[N, D]`` for a plain point, one
stream of a stack as ``[N, D]`` (``stream=k``) or all of them as ``[N, S, D]``, each row with the index of
its text and its position in that text. Shards are verified before any row is read, exactly as a resume of
`cache_dataset` verifies them (size, digest, and that the record names this run, this shard and these
texts), and read lazily through safetensors' memory map, so a directory larger than memory streams. Before
each read the shard's size and modification time are compared with those it was verified at (one ``stat``);
a shard changed since (a flipped bit, two shards swapped) is verified again, so it is an error naming it,
never data under another text's label. Not noticed: a change that keeps both the size and the modification
time (a writer that restores the mtime), and a change made while a read is under way.

Under ``torchrun`` (an initialised process group, or ``WORLD_SIZE`` > 1) each rank takes the shards
i ≡ rank (mod world), as `cache_dataset` wrote them; `iterable` additionally splits a rank's shards among
DataLoader workers.
"""

from __future__ import annotations

import bisect
import json
import operator
import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from safetensors import safe_open
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .._util import rank_world
from ..points import BY_NAME, Point, checked_stream, split_qualified
from .writer import MANIFEST, rank_shards, run_fingerprint, shard_path, verify_shard


class Rows(NamedTuple):
    """Rows of activations with, per row, the text they come from and the token's position in it."""

    x: torch.Tensor
    text: torch.Tensor
    position: torch.Tensor


class ActivationDataset(Dataset):
    """The rows of ``point`` in the `cache_dataset` directory ``directory``.

    ``point`` is a cache key (``"layers.3.mlp_out"``, ``"layers.2.output"``, ``"ple_tokens"``). For a stream
    stack, ``stream=k`` gives stream k's rows ``[N, D]``; ``stream=None`` gives ``[N, S, D]``. Every other
    point gives ``[N, *rest]``: the batch and token axes become the row axis, the others stay in order;
    ``attn_pattern`` gives ``[N, H, K]`` with key ``j`` the text's token ``j`` (padding dropped, zero past the
    text's end; K the longest text's length), whatever shard and padding the row came from.

    ``dataset[i]`` is a `Rows` of one row (``x``, ``text``, ``position``), so a ``DataLoader`` collates
    batches of them (``num_workers`` > 1 works: shard handles are opened per process). `batches` and
    `iterable` read whole shards in order, the fast way through a large directory. ``text_index`` and
    ``positions`` hold every row's text and position; ``tokens(text)`` the text's token ids.

    ``verify=True`` checks every shard (of this rank) against its record before any row is read, and again
    before a read whenever its size or modification time changed; a damaged, missing or foreign shard is an
    error naming it (``verify=False``: none of this). ``ranks``: ``"auto"`` takes this rank's shards under
    ``torchrun``, ``False`` all shards, or ``(rank, world)`` explicitly. ``dtype`` casts rows on reading.
    """

    def __init__(self, directory: str | os.PathLike, point: str, stream: int | None = None, *, verify: bool = True,
                 ranks: Any = "auto", dtype: torch.dtype | None = None) -> None:
        self.directory = Path(directory)
        self.manifest = _read_manifest(self.directory)
        self.key, self.row = _resolve_point(self.manifest, point, self.directory)
        self.stream = checked_stream(stream, self.row.stack, f"{self.key} {self.row.shape}",
                                     int(self.manifest["streams"]) if "streams" in self.manifest else None)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch dtype (rows are cast to it, never quantised); "
                            f"got {dtype!r}")
        self.dtype = dtype
        self.rank, self.world = _ranks(ranks)
        self.shards = rank_shards(int(self.manifest["texts"]), int(self.manifest["batch_size"]), self.rank, self.world)
        self.paths = [shard_path(self.directory, i) for i in self.shards]
        self.verify = verify
        self._verified: dict[Path, tuple[int, int]] = {}   # shard -> (size, mtime_ns) it was verified at
        if verify:
            _verify(self.directory, self.manifest, self.shards, self.paths)
            self._verified = {path: _stamp(path) for path in self.paths}
        if self.stream is not None and self.paths:
            _row_shape(self.row, self._shape(self.paths[0]), self.stream)   # a stream past the stack's last
        self._index = [_shard_index(path, self.manifest, i) for i, path in zip(self.shards, self.paths)]
        self.offsets = [0]
        for index in self._index:
            self.offsets.append(self.offsets[-1] + len(index.text))
        self.text_index = torch.cat([index.text for index in self._index]) if self._index else torch.zeros(0, dtype=torch.long)
        self.positions = torch.cat([index.position for index in self._index]) if self._index else torch.zeros(0, dtype=torch.long)
        # attn_pattern rows keep their key axis, as the text's positions: the longest text's length wide
        self.keys = max((int(index.mask.sum(1).max()) for index in self._index if index.mask.numel()), default=0) \
            if self.row.axes.count("T") > 1 else None
        self._handles: dict[Path, Any] = {}
        self._handles_pid = os.getpid()
        self._cached: tuple[int, torch.Tensor] | None = None

    # ---- shape ----

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape of one row (``(D,)``, ``(S, D)``, ``(H, keys)`` for ``attn_pattern``, ...)."""
        shape = _row_shape(self.row, self._shape(self.paths[0]), self.stream)
        return tuple(shape[:-1] + [self.keys]) if self.keys is not None else tuple(shape)

    def _shape(self, path: Path) -> list[int]:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.get_slice(self.key).get_shape())

    def __repr__(self) -> str:
        stream = "" if self.stream is None else f", stream {self.stream}"
        return (f"ActivationDataset({self.key}{stream}: {len(self):,} rows of {list(self.row_shape)} from "
                f"{len(self.shards)} shard(s) in {self.directory})")

    # ---- random access ----

    def _checked(self, i: Any) -> int:
        if isinstance(i, (bool, float, str)) or (isinstance(i, torch.Tensor) and (i.is_floating_point() or i.dtype == torch.bool)):
            raise TypeError(f"rows are indexed by integers; got {type(i).__name__} {i!r}")
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"rows are indexed by integers; got {type(i).__name__} {i!r}") from None
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range: this dataset has {len(self)} rows")
        return i % len(self)

    def __getitem__(self, i: int) -> Rows:
        i = self._checked(i)
        s = bisect.bisect_right(self.offsets, i) - 1
        b, t = self._index[s].local[i - self.offsets[s]].tolist()
        where: list[Any] = [slice(None)] * len(self.row.axes)
        where[self.row.batch_axis], where[self.row.axis("T")] = b, t
        if self.stream is not None:
            where[0] = self.stream
        x = self._handle(self.paths[s], self.shards[s]).get_slice(self.key)[tuple(where)]
        if self.keys is not None:
            x = self._text_keys(x[None], self._index[s].mask[[b]])[0]
        return Rows(self._cast(x), self.text_index[i], self.positions[i])

    def __getitems__(self, indices: Sequence[int]) -> list[Rows]:
        """A DataLoader's batched fetch: rows of one shard are gathered from one read of that shard."""
        rows: list[Rows | None] = [None] * len(indices)
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for n, i in enumerate(indices):
            i = self._checked(i)
            by_shard.setdefault(bisect.bisect_right(self.offsets, i) - 1, []).append((n, i))
        for s, wanted in by_shard.items():
            values = self._shard_rows(s)
            for n, i in wanted:
                rows[n] = Rows(values[i - self.offsets[s]], self.text_index[i], self.positions[i])
        return rows  # type: ignore[return-value]

    # ---- streaming ----

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> Iterator[Rows]:
        """`Rows` of ``batch_size`` rows, shard after shard (this rank's), each shard read once; ``shuffle``
        permutes the shard order and the rows inside each shard (seeded). The last batch may be short."""
        return iter(self.iterable(batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last))

    def iterable(self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> "ShardStream":
        """An ``IterableDataset`` of `Rows` batches for ``DataLoader(ds.iterable(256), batch_size=None,
        num_workers=n)``: each worker takes every n-th of this rank's shards."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        return ShardStream(self, batch_size, shuffle, seed, drop_last)

    def tokens(self, text: int) -> torch.Tensor:
        """The token ids of text ``text`` (a global text index), padding removed."""
        start = int(self.manifest["batch_size"])
        shard, b = divmod(int(text), start)
        path = shard_path(self.directory, shard)
        handle = self._handle(path, shard)
        ids = handle.get_slice("input_ids")[b]
        mask = handle.get_slice("attention_mask")[b] if "attention_mask" in set(handle.keys()) else torch.ones_like(ids)
        return ids[mask.bool()]

    # ---- internals ----

    def _shard_rows(self, s: int) -> torch.Tensor:
        """Every row of this dataset's shard ``s`` (the last one read is kept)."""
        if self._cached is not None and self._cached[0] == s:
            return self._cached[1]
        sliced = self._handle(self.paths[s], self.shards[s]).get_slice(self.key)
        value = sliced[self.stream] if self.stream is not None else sliced[:]
        axes = [a for j, a in enumerate(self.row.axes) if not (self.stream is not None and j == 0)]
        batch, token = axes.index("B"), axes.index("T")
        order = [batch, token] + [j for j in range(len(axes)) if j not in (batch, token)]
        local = self._index[s].local.long()
        rows = value.permute(order)[local[:, 0], local[:, 1]]
        if self.keys is not None:
            rows = self._text_keys(rows, self._index[s].mask[local[:, 0]])
        rows = self._cast(rows)
        self._cached = (s, rows)
        return rows

    def _handle(self, path: Path, shard: int) -> Any:
        if self._handles_pid != os.getpid():  # a DataLoader worker: open its own handles
            self._handles, self._handles_pid, self._cached = {}, os.getpid(), None
        if self.verify:
            self._reverify(path, shard)
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = safe_open(str(path), framework="pt")
        return handle

    def _text_keys(self, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``attn_pattern`` rows ``[n, H, T_shard]`` with their key axis as their text's positions: key ``j`` is the
        text's token ``j`` (the shard's padding columns dropped), zero past the text's end, ``self.keys`` wide
        (the longest text in the dataset), so rows from any shard line up and collate."""
        n, heads, width = rows.shape
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)   # the real columns first, in order
        gathered = rows.gather(-1, order[:, None, :].expand(n, heads, width))
        real = torch.arange(width)[None, :] < mask.sum(1, keepdim=True)
        gathered = gathered * real[:, None, :].to(gathered.dtype)
        keys = int(self.keys or 0)
        if width >= keys:
            return gathered[..., :keys]
        return torch.cat([gathered, gathered.new_zeros(n, heads, keys - width)], -1)

    def _reverify(self, path: Path, shard: int) -> None:
        """A shard whose size or modification time differs from when it was verified (or one never verified) is
        verified again before it is read, and its handle reopened: one ``stat`` per read otherwise."""
        try:
            stamp = _stamp(path)
        except OSError as error:
            raise ValueError(f"{self.directory}: {path.name} cannot be read now ({error})") from None
        if self._verified.get(path) == stamp:
            return
        problem = verify_shard(path, self.manifest, shard)
        if problem is not None:
            raise ValueError(f"{self.directory}: {path.name} {problem} (it changed after this dataset was opened). "
                             "Rerun cache_dataset with the same arguments to recompute it")
        self._verified[path] = stamp
        self._handles.pop(path, None)
        if self._cached is not None and self.paths[self._cached[0]] == path:
            self._cached = None

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.dtype is None else x.to(self.dtype)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_handles={}, _cached=None)  # handles are per process
        return state


class ShardStream(IterableDataset):
    """`ActivationDataset.iterable`: batches read shard by shard, split across DataLoader workers."""

    def __init__(self, dataset: ActivationDataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> None:
        self.dataset, self.batch_size, self.shuffle, self.seed, self.drop_last = dataset, batch_size, shuffle, seed, drop_last

    def __iter__(self) -> Iterator[Rows]:
        ds = self.dataset
        order = list(range(len(ds.shards)))
        generator = torch.Generator().manual_seed(self.seed)
        if self.shuffle:
            order = [order[j] for j in torch.randperm(len(order), generator=generator).tolist()]
        worker = get_worker_info()
        if worker is not None:
            order = order[worker.id::worker.num_workers]
        pending: list[Rows] = []
        held = 0
        for s in order:
            start, stop = ds.offsets[s], ds.offsets[s + 1]
            rows = Rows(ds._shard_rows(s), ds.text_index[start:stop], ds.positions[start:stop])
            if self.shuffle:
                perm = torch.randperm(stop - start, generator=generator)
                rows = Rows(*(part[perm] for part in rows))
            pending.append(rows)
            held += stop - start
            while held >= self.batch_size:
                batch, pending = _take(pending, self.batch_size)
                held -= self.batch_size
                yield batch
        if held and not self.drop_last:
            yield _take(pending, held)[0]


def _take(pending: list[Rows], n: int) -> tuple[Rows, list[Rows]]:
    """The first ``n`` rows of ``pending`` as one `Rows`, and what is left."""
    joined = Rows(*(torch.cat(parts) for parts in zip(*pending)))
    head = Rows(*(part[:n] for part in joined))
    rest = Rows(*(part[n:] for part in joined))
    return head, ([rest] if len(rest.x) else [])


class _ShardIndex(NamedTuple):
    local: torch.Tensor  # [n, 2] int32: (batch row, index on the value's token axis)
    text: torch.Tensor  # [n] global text index
    position: torch.Tensor  # [n] position of the token in its text (padding not counted)
    mask: torch.Tensor  # [B, T] bool: the shard's real tokens


def _shard_index(path: Path, manifest: dict, shard: int) -> _ShardIndex:
    """Where the real tokens of one shard are, read from its attention mask alone (no activations)."""
    with safe_open(str(path), framework="pt") as handle:
        ids = handle.get_tensor("input_ids")
        mask = handle.get_tensor("attention_mask").bool() if "attention_mask" in set(handle.keys()) else torch.ones_like(ids, dtype=torch.bool)
    tokens = mask.shape[1]
    in_text = mask.long().cumsum(1) - 1  # a token's position in its text
    chosen = manifest.get("positions")
    columns = torch.arange(tokens) if chosen is None else torch.tensor([int(p) % tokens for p in chosen])
    valid = mask[:, columns]
    b, j = valid.nonzero(as_tuple=True)
    start = shard * int(manifest["batch_size"])
    return _ShardIndex(torch.stack([b, j], 1).to(torch.int32), b + start, in_text[b, columns[j]], mask)


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{directory} has no {MANIFEST}: not a finished cache_dataset directory "
                                "(run g3n.cache_dataset(model, texts, points, out_dir) first)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is unreadable ({error})") from None
    if not isinstance(manifest, dict) or "run" not in manifest:
        raise ValueError(f"{path} is not a cache_dataset manifest (no run fingerprint)")
    identity = {k: v for k, v in manifest.items() if k != "run"}
    if run_fingerprint(identity) != manifest["run"]:
        raise ValueError(f"{path} was edited: its contents do not match its run fingerprint")
    return manifest


def _resolve_point(manifest: dict, point: str, directory: Path) -> tuple[str, Point]:
    keys = list(manifest.get("points", []))
    if point not in keys:
        raise KeyError(f"{point!r} is not cached in {directory}; it holds {', '.join(keys)}")
    return point, BY_NAME[split_qualified(point)[1]]


def _row_shape(row: Point, shape: list[int], stream: int | None) -> list[int]:
    keep = [j for j, a in enumerate(row.axes) if a not in ("B", "T") and not (stream is not None and j == 0)]
    if stream is not None and stream >= shape[0]:
        raise ValueError(f"stream {stream} out of range: the stack has {shape[0]} streams")
    if row.axes.count("T") > 1:  # attn_pattern [B,H,T,T]: the key axis stays
        keep = [j for j, a in enumerate(row.axes) if j not in (row.batch_axis, row.axis("T"))]
    return [shape[j] for j in keep]


def _stamp(path: Path) -> tuple[int, int]:
    """What a reader compares to notice a shard changed: its size and modification time (ns)."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _ranks(ranks: Any) -> tuple[int, int]:
    if ranks is False or ranks is None:
        return 0, 1
    if ranks == "auto":
        return rank_world()
    rank, world = ranks
    if not 0 <= int(rank) < int(world):
        raise ValueError(f"ranks=(rank, world) needs 0 <= rank < world; got {ranks!r}")
    return int(rank), int(world)


def _verify(directory: Path, manifest: dict, shards: list[int], paths: list[Path]) -> None:
    """Every shard exists and matches its record, which names this run, this shard and its texts."""
    problems = []
    for i, path in zip(shards, paths):
        problem = verify_shard(path, manifest, i)
        if problem is None and not path.exists():
            problem = "missing (the run that wrote this directory did not finish: rerun cache_dataset to complete it)"
        if problem is not None:
            problems.append(f"{path.name} {problem}")
    if problems:
        listed = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"{directory}: {listed}. Rerun cache_dataset with the same arguments to recompute them")
