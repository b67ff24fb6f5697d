"""Activation datasets: a point's values for many texts, streamed into verified safetensors shards.

`cache_dataset` writes shard i for texts [i·batch_size, (i+1)·batch_size), each atomically with a
record beside it (its size and digest, the run's fingerprint, its index and text range), and a
``manifest.json`` that identifies the run completely; a rerun resumes, a damaged shard or one bound
to another run, index or texts is recomputed, a directory of another run is refused. Under
``torchrun`` each rank takes its own shards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

from .._compat import attention_implementation
from .._util import atomic_write, rank_world
from .batch import check_available, collect, estimate_bytes, select

MANIFEST = "manifest.json"
_HASH_PIECE = 1 << 25  # bytes hashed per step, and the size of each host buffer an accelerator tensor streams through


def weights_digest(module: torch.nn.Module, piece_bytes: int = _HASH_PIECE) -> str:
    """SHA-256 over every parameter and buffer: its name, dtype and shape, then every byte of its values.

    The bytes are hashed in row-major order, so equal values give the same digest on any device and
    in any memory layout. Host tensors are hashed where they lie (no copy; a non-contiguous one is
    made contiguous ``piece_bytes`` at a time). Accelerator tensors stream through two host buffers
    of ``piece_bytes`` (pinned under CUDA), the copy of one piece overlapping the hashing of the
    previous one, so no tensor is ever copied whole. Cost: about 1.6 GB/s on one CPU core with SHA
    instructions, so 5.5 s for E2B's 8.9 GB of weights (measured; the README's Analysis section).
    """
    digest = hashlib.sha256()
    staging = _HostStaging(piece_bytes)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            if tensor.is_meta:  # no values to hash: say so, so that it differs from any real tensor
                digest.update(b"meta;")
                continue
            staging.hash(digest, tensor.device, _byte_pieces(tensor.detach(), piece_bytes))
            digest.update(b";")
    return digest.hexdigest()


def _byte_pieces(tensor: torch.Tensor, piece_bytes: int) -> Iterator[torch.Tensor]:
    """``tensor``'s bytes in row-major order as flat uint8 tensors of at most ``piece_bytes`` each,
    on the tensor's device; a non-contiguous tensor is copied one bounded slab of rows at a time."""
    if tensor.is_contiguous():
        flat = tensor.reshape(-1)
        if flat.numel() == 1:  # "contiguous" whatever its stride, and a byte view needs stride 1
            flat = flat.clone(memory_format=torch.contiguous_format)
        flat = flat.view(torch.uint8)
        for start in range(0, flat.numel(), piece_bytes):
            yield flat[start:start + piece_bytes]
        return
    row_bytes = max(1, tensor[0].numel() * tensor.element_size())
    for slab in tensor.split(max(1, piece_bytes // row_bytes)):
        if slab.numel() * slab.element_size() <= piece_bytes:
            yield from _byte_pieces(slab.contiguous(), piece_bytes)
        else:  # one row is already over the bound: go a dimension deeper
            yield from _byte_pieces(slab[0], piece_bytes)


class _HostStaging:
    """Two bounded host buffers that an accelerator tensor's pieces pass through on their way to the hash."""

    def __init__(self, piece_bytes: int) -> None:
        self.piece_bytes = piece_bytes
        self.buffers: dict[torch.device, list[torch.Tensor]] = {}

    def hash(self, digest: Any, device: torch.device, pieces: Iterable[torch.Tensor]) -> None:
        if device.type == "cpu":
            for piece in pieces:
                digest.update(piece.numpy())
            return
        cuda = device.type == "cuda"
        if device not in self.buffers:  # pinned memory is what lets the copy run while the host hashes
            self.buffers[device] = [torch.empty(self.piece_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        pending: tuple[torch.Tensor, Any] | None = None
        for k, piece in enumerate(pieces):
            # buffer k % 2 was last filled by piece k - 2, which was hashed in the previous step
            host = self.buffers[device][k % 2][: piece.numel()]
            host.copy_(piece, non_blocking=cuda)
            copied = _recorded_event(device) if cuda else None
            if pending is not None:
                _hash_when_copied(digest, *pending)
            pending = (host, copied)
        if pending is not None:
            _hash_when_copied(digest, *pending)


def _recorded_event(device: torch.device) -> Any:
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _hash_when_copied(digest: Any, host: torch.Tensor, copied: Any) -> None:
    if copied is not None:
        copied.synchronize()
    digest.update(host.numpy())


def tokenizer_digest(tokenizer: Any) -> str | None:
    """A digest of the tokenizer's full definition (vocabulary, merges, normalisation, special tokens)."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        for per_call in ("padding", "truncation"):  # transformers sets these on every call
            definition.pop(per_call, None)
        text = json.dumps(definition, sort_keys=True)
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    side = getattr(tokenizer, "padding_side", "")
    return hashlib.sha256(f"{text}|{special}|{side}".encode()).hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _rank_world() -> tuple[int, int]:
    """(rank, world) of the process group, started here under ``torchrun`` (``WORLD_SIZE`` > 1) when nobody has
    (the ranks meet at barriers); (0, 1) without one."""
    if dist.is_available() and not dist.is_initialized() and rank_world()[1] > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank_world() if dist.is_available() and dist.is_initialized() else (0, 1)


def _barrier(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.barrier()


def _check_dataset_arguments(texts: Any, points: Any, batch_size: Any, positions: Any, dtype: Any,
                             out: Path) -> list[str]:
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, not a {type(texts).__name__} "
                        "(a single string would be cached one character at a time: wrap it in a list)")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to cache: texts is empty")
    bad = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text]
    if bad:
        raise TypeError(f"texts must be non-empty strings; entries {bad[:10]} are not")
    if isinstance(points, str) or not isinstance(points, Sequence) or not points:
        raise TypeError("points must be a non-empty list of point names (for example ['ple_out'])")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if positions is not None and (isinstance(positions, (str, bytes)) or not isinstance(positions, Sequence)
                                  or not positions or not all(isinstance(p, int) and not isinstance(p, bool)
                                                              for p in positions)):
        raise TypeError(f"positions must be a non-empty list of integers (negative counts from the end); got {positions!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, …); got {dtype!r}")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {out} exists and is not a directory")
    return texts


def run_identity(model: Any, texts: list[str], keys: list[str], batch_size: int, positions: Any,
                 dtype: torch.dtype) -> dict[str, Any]:
    """Everything a shard's values depend on; two runs may share a directory only if all of it is equal.

    The attention implementation is part of it: eager and sdpa attention round differently (2.4e-5 on
    the tiny model), so a resume under the other one would mix values of two computations.
    """
    return {
        "format": 3,
        "points": keys,
        "weights": weights_digest(model.hf_model),
        "config": hashlib.sha256(model.hf_model.config.to_json_string(use_diff=False).encode()).hexdigest(),
        "attention": attention_implementation(model.hf_model.config.get_text_config()),
        "tokenizer": tokenizer_digest(model.tokenizer),
        "texts": len(texts),
        "texts_sha256": hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
        "batch_size": batch_size,
        "positions": None if positions is None else [int(p) for p in positions],
        "dtype": str(dtype),
    }


def run_fingerprint(identity: dict[str, Any]) -> str:
    """The run's identity in one digest: every shard's record carries it, binding the shard to its run."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


_WHAT = {"points": "the points", "weights": "the model's weights", "config": "the model's config",
         "attention": "the attention implementation", "tokenizer": "the tokenizer", "texts": "the number of texts",
         "texts_sha256": "the texts", "batch_size": "the batch size", "positions": "the positions", "dtype": "the dtype",
         "format": "the cache format"}


def _shard_record(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read_record(record: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _verified(path: Path, expected: dict[str, Any]) -> str | None:
    """None when ``path`` is a finished shard of this run, at its place, whose size and digest match its
    record; else why not. ``expected`` is what its record must say: the run, the shard index, the texts."""
    record = _shard_record(path)
    if not path.exists():
        return "missing" if record.exists() else None
    if not record.exists():
        return "has no record of a finished write (interrupted, or not this cache's)"
    recorded = _read_record(record)
    try:
        size, digest = int(recorded["bytes"]), str(recorded["sha256"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return "its record is unreadable"
    if recorded.get("run") != expected["run"]:
        return "was made by another run (its record's run fingerprint is not this run's)"
    if recorded.get("shard") != expected["shard"]:
        return f"is shard {recorded.get('shard')!r} by its record, not shard {expected['shard']} (moved or swapped)"
    if recorded.get("texts") != expected["texts"]:
        return f"holds texts {recorded.get('texts')!r} by its record, not texts {expected['texts']} of this run"
    if path.stat().st_size != size:
        return f"is {path.stat().st_size:,} bytes, its record says {size:,}"
    if file_digest(path) != digest:
        return "does not match its recorded digest (damaged or replaced)"
    return None


def _remove_leftovers(out: Path) -> list[str]:
    """Temporary files of interrupted writes (`atomic_write` names them ``.<target>.<random>.tmp``)."""
    removed = []
    for leftover in out.glob(".*.tmp"):
        if leftover.name.startswith((".shard-", f".{MANIFEST}.")):
            leftover.unlink(missing_ok=True)
            removed.append(leftover.name)
    return removed


def cache_dataset(model: Any, texts: Sequence[str], points: Sequence[str], out_dir: str | os.PathLike,
                  batch_size: int = 8, layers: Iterable[int] | None = None, positions: Sequence[int] | None = None,
                  dtype: torch.dtype | None = None, progress: bool = True) -> list[Path]:
    """Stream the points' activations for ``texts`` into safetensors shards under ``out_dir``.

    Shard i holds texts [i·batch_size, (i+1)·batch_size), padded on the left, with their
    ``input_ids`` and ``attention_mask``. Each shard is written atomically, then a record beside it
    (``shard-….safetensors.json``): its size and digest, the run's fingerprint (`run_fingerprint`),
    its index and its text range.

    A rerun resumes: a shard counts as finished only if its record matches the file and names this
    run, this index and these texts, so a damaged, truncated, foreign, moved or swapped shard is
    recomputed (with a warning naming it), and temporary files of an interrupted write are removed.
    ``manifest.json`` identifies the run completely — a SHA-256 of every weight and buffer, the
    config, the attention implementation, the tokenizer, the points, positions, dtype, batch size and
    the texts — and a directory made by a run that differs in any of them is refused, saying what
    differs; so is a directory holding shards but no manifest, unless every shard's record names this
    run. Every argument, ``positions`` against every shard's padded length included, is checked
    before any file is written, and a run that fails before its first shard leaves the directory as
    it found it. Under ``torchrun`` each rank takes shards i ≡ rank (mod world). Returns this rank's
    shard paths.
    """
    out = Path(out_dir)
    texts = _check_dataset_arguments(texts, points, batch_size, positions, dtype, out)
    resolved = select(model, points, layers)
    check_available(model, resolved)
    lengths = _token_lengths(model, texts)
    _check_positions(positions, lengths, batch_size)
    dtype = dtype or model.hf_model.dtype
    run = _Run(model, texts, [key for key, _, _ in resolved], batch_size, positions, dtype, out, *_rank_world())
    run.identity = run_identity(model, texts, run.keys, batch_size, positions, dtype)
    _check_directory(out, run.identity)
    mine = rank_shards(len(texts), batch_size, run.rank, run.world)
    paths = [shard_path(out, i) for i in mine]
    created_dir = not out.exists()
    if run.rank == 0 and out.exists():
        _remove_leftovers(out)
    _barrier(run.world)
    todo = _shards_to_write(run, mine, paths)
    if progress and todo:
        planned = _planned_bytes(model, lengths, resolved, [i for i, _ in todo], batch_size, positions, dtype)
        print(f"cache_dataset: {len(todo)} shard(s) of up to {batch_size} texts to write, {planned / 1024**2:,.1f} MiB "
              f"({len(texts)} texts in all, {dtype})")
    try:
        _write_all(run, todo, progress)
    except BaseException:
        if not run.wrote_any and run.rank == 0:
            _undo_start(out, out / MANIFEST if run.wrote_manifest else None, created_dir)
        raise
    if run.rank == 0 and not (out / MANIFEST).exists():  # nothing was left to write
        run.write_manifest()
    _barrier(run.world)
    return paths


def _write_all(run: "_Run", todo: list[tuple[int, Path]], progress: bool) -> None:
    """Write the shards in ``todo``, showing shards, texts/s and tokens/s."""
    bar = tqdm(total=len(todo), desc=f"caching (rank {run.rank}/{run.world})", unit="shard", disable=not progress,
               position=run.rank)
    start, done_texts, done_tokens = time.perf_counter(), 0, 0
    try:
        for i, path in todo:
            texts_written, tokens_written = run.write_shard(i, path)
            done_texts, done_tokens = done_texts + texts_written, done_tokens + tokens_written
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(texts_per_s=f"{done_texts / elapsed:.1f}", tokens_per_s=f"{done_tokens / elapsed:.0f}")
            bar.update(1)
    finally:
        bar.close()


def _token_lengths(model: Any, texts: list[str]) -> list[int]:
    """Every text's length in tokens, as `collect` will tokenize it (all up front, before any file)."""
    if model.tokenizer is None:
        raise ValueError("cache_dataset tokenizes its texts, and this model has no tokenizer: load a checkpoint "
                         "that has tokenizer files")
    return [len(ids) for ids in model.tokenizer(texts)["input_ids"]]


def _check_positions(positions: Sequence[int] | None, lengths: list[int], batch_size: int) -> None:
    """Each shard's texts are padded to its longest, and a position indexes that padded length: it must
    lie in [-T, T) for the T of every shard, not only of the first (checked before any file is written)."""
    if positions is None:
        return
    padded = [max(lengths[start:start + batch_size]) for start in range(0, len(lengths), batch_size)]
    shortest = min(padded)
    bad = [p for p in positions if not -shortest <= p < shortest]
    if bad:
        i = padded.index(shortest)
        raise ValueError(f"positions {bad} fall outside shard {i} (texts {i * batch_size}.."
                         f"{min((i + 1) * batch_size, len(lengths)) - 1}, {shortest} tokens at their longest): every "
                         f"position must lie in [-{shortest}, {shortest}) so that it exists in every shard; "
                         "count positions from the end (-1 is every text's last token)")


def _check_directory(out: Path, identity: dict[str, Any]) -> None:
    """A directory made by a run that differs from this one is refused, saying what differs; one with
    shards but no manifest is refused unless every shard's record names this run (never adopted)."""
    manifest_file = out / MANIFEST
    if manifest_file.exists():
        _check_manifest(manifest_file, identity)
    elif out.is_dir():
        _check_orphans(out, run_fingerprint(identity))


def _check_manifest(manifest_file: Path, identity: dict[str, Any]) -> None:
    try:
        existing = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{manifest_file} is unreadable ({error}); remove the directory or use another") from None
    differs = [_WHAT.get(k, k) for k in identity if not isinstance(existing, dict) or existing.get(k) != identity[k]]
    if differs:
        raise ValueError(f"{manifest_file.parent} holds shards of a different cache: {', '.join(differs)} differ from "
                         "this run's; refusing to resume into it: use another directory or remove it")


def _check_orphans(out: Path, fingerprint: str) -> None:
    """Shards without a manifest may be another run's: they are kept only if their records say this run
    made them (each is then verified as usual); otherwise the run stops rather than overwrite them."""
    foreign = []
    for shard in sorted(out.glob("shard-*.safetensors")):
        record = _read_record(_shard_record(shard))
        if record is None:
            foreign.append(f"{shard.name} (no readable record)")
        elif record.get("run") != fingerprint:
            foreign.append(f"{shard.name} (made by another run)")
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"{out} holds shards but no {MANIFEST}, and they are not this run's: {listed}; refusing to "
                         f"adopt or overwrite them: restore its {MANIFEST}, remove the shards or use another directory")


def _shards_to_write(run: "_Run", mine: list[int], paths: list[Path]) -> list[tuple[int, Path]]:
    """This rank's shards that are not finished and verified (a damaged one is named and recomputed)."""
    todo = []
    for i, path in zip(mine, paths):
        problem = _verified(path, run.binding(i))
        if path.exists() and problem is None:
            continue
        if problem is not None:
            warnings.warn(f"{path.name} {problem}: recomputing it", stacklevel=3)
        todo.append((i, path))
    return todo


def shard_path(directory: Path, i: int) -> Path:
    """Where shard ``i`` of a dataset directory lives."""
    return directory / f"shard-{i:06d}.safetensors"


def rank_shards(texts: int, batch_size: int, rank: int, world: int) -> list[int]:
    """The shards of ``texts`` texts in batches of ``batch_size`` that ``rank`` of ``world`` writes and reads:
    i ≡ rank (mod world)."""
    return [i for i in range(math.ceil(texts / batch_size)) if i % world == rank]


def shard_binding(run: str, i: int, batch_size: int, texts: int) -> dict[str, Any]:
    """What shard ``i``'s record says besides its size and digest: whose run, which shard, which texts."""
    start = i * batch_size
    return {"run": run, "shard": i, "texts": [start, min(start + batch_size, texts)]}


def verify_shard(path: Path, manifest: dict[str, Any], i: int) -> str | None:
    """None when shard ``i`` of the run ``manifest`` describes is finished and matches its record; else why not."""
    return _verified(path, shard_binding(manifest["run"], i, int(manifest["batch_size"]), int(manifest["texts"])))


@dataclass
class _Run:
    """One `cache_dataset` call: what every shard is computed from, and what it has written so far."""

    model: Any
    texts: list[str]
    keys: list[str]
    batch_size: int
    positions: Sequence[int] | None
    dtype: torch.dtype
    out: Path
    rank: int
    world: int
    identity: dict[str, Any] = field(default_factory=dict)
    wrote_any: bool = False
    wrote_manifest: bool = False

    def binding(self, i: int) -> dict[str, Any]:
        return shard_binding(run_fingerprint(self.identity), i, self.batch_size, len(self.texts))

    def write_manifest(self) -> None:
        manifest = {**self.identity, "run": run_fingerprint(self.identity)}  # the fingerprint the records carry
        atomic_write(self.out / MANIFEST, lambda p: Path(p).write_text(json.dumps(manifest, indent=1)))

    def write_shard(self, i: int, path: Path) -> tuple[int, int]:
        """Compute and write shard ``i`` (then its record); returns (texts, tokens) written."""
        chunk = self.texts[i * self.batch_size:(i + 1) * self.batch_size]
        values = collect(self.model, chunk, self.keys, positions=self.positions, dtype=self.dtype, verbose=False)
        tensors = {k: v.contiguous() for k, v in values.items()}
        tensors["input_ids"] = values.input_ids.contiguous()
        if values.attention_mask is not None:
            tensors["attention_mask"] = values.attention_mask.contiguous()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0 and not (self.out / MANIFEST).exists():
            self.write_manifest()
            self.wrote_manifest = True
        binding = self.binding(i)
        metadata = {"texts": json.dumps(binding["texts"]), "run": binding["run"], "shard": str(i)}
        atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata))
        record = {"bytes": path.stat().st_size, "sha256": file_digest(path), **binding}
        atomic_write(_shard_record(path), lambda p: Path(p).write_text(json.dumps(record)))
        self.wrote_any = True
        mask = values.attention_mask
        return len(chunk), int(mask.sum()) if mask is not None else values.input_ids.numel()


def _planned_bytes(model: Any, lengths: list[int], resolved: list, shards: list[int], batch_size: int,
                   positions: Sequence[int] | None, dtype: torch.dtype) -> int:
    """The bytes the given shards will hold: each padded to its longest text, as `activations.collect` pads."""
    total = 0
    for i in shards:
        rows = lengths[i * batch_size:(i + 1) * batch_size]
        tokens = max(rows)
        total += sum(estimate_bytes(model, resolved, len(rows), tokens, positions, dtype).values())
        total += 2 * len(rows) * tokens * 8  # input_ids and attention_mask (int64)
    return total


def _undo_start(out: Path, manifest_file: Path | None, created_dir: bool) -> None:
    """A run that failed before its first shard leaves the directory as it found it."""
    if not out.exists():
        return
    _remove_leftovers(out)
    if manifest_file is not None:
        manifest_file.unlink(missing_ok=True)
    if created_dir:
        try:
            out.rmdir()
        except OSError:
            pass  # someone else put files there meanwhile: leave them
