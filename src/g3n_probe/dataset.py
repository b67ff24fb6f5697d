"""Activation datasets: a point's values for many texts, streamed into verified safetensors shards.

`cache_dataset` writes shard i for texts [i·batch_size, (i+1)·batch_size), each atomically with a
record of its size and digest beside it, and a ``manifest.json`` that identifies the run completely;
a rerun resumes, a damaged shard is recomputed, a directory of another run is refused. Under
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
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm import tqdm

from ._util import atomic_write
from .activations import check_available, collect, estimate_bytes, select

MANIFEST = "manifest.json"
_CHECKSUM_CHUNK = 1 << 22  # words per step of the weight checksum


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of every parameter and buffer: name, dtype, shape and every byte of the values.

    Computed where each tensor lives (no copy to the host): per tensor, the plain and the
    position-weighted sums of its 32-bit words, so any changed value, and any two swapped ones,
    change the digest. A fingerprint against mixing models, not a cryptographic hash.
    """
    digest = hashlib.sha256()
    weights: dict[torch.device, torch.Tensor] = {}
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            if tensor.numel() == 0 or tensor.is_meta:
                continue
            data = tensor.detach().contiguous().view(-1).view(torch.uint8)
            if data.numel() % 4:
                data = torch.cat([data, data.new_zeros(4 - data.numel() % 4)])
            words = data.view(torch.int32)
            if tensor.device not in weights:
                weights[tensor.device] = torch.arange(1, _CHECKSUM_CHUNK + 1, dtype=torch.int32, device=tensor.device)
            ramp = weights[tensor.device]
            plain = weighted = torch.zeros((), dtype=torch.int64, device=tensor.device)
            for k, chunk in enumerate(words.split(_CHECKSUM_CHUNK)):
                total = chunk.sum(dtype=torch.int64)
                plain = plain + total
                # int32 products wrap around, which a checksum can afford; sums are exact in int64
                weighted = weighted + (chunk * ramp[: chunk.numel()]).sum(dtype=torch.int64) + total * (k + 1)
            digest.update(f"{int(plain)},{int(weighted)};".encode())
    return digest.hexdigest()


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
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
    """Everything a shard's values depend on; two runs may share a directory only if all of it is equal."""
    return {
        "format": 2,
        "points": keys,
        "weights": weights_digest(model.hf_model),
        "config": hashlib.sha256(model.hf_model.config.to_json_string(use_diff=False).encode()).hexdigest(),
        "tokenizer": tokenizer_digest(model.tokenizer),
        "texts": len(texts),
        "texts_sha256": hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
        "batch_size": batch_size,
        "positions": None if positions is None else [int(p) for p in positions],
        "dtype": str(dtype),
    }


_WHAT = {"points": "the points", "weights": "the model's weights", "config": "the model's config",
         "tokenizer": "the tokenizer", "texts": "the number of texts", "texts_sha256": "the texts",
         "batch_size": "the batch size", "positions": "the positions", "dtype": "the dtype", "format": "the cache format"}


def _shard_record(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _verified(path: Path) -> str | None:
    """None when ``path`` is a finished shard whose size and digest match its record; else why not."""
    record = _shard_record(path)
    if not path.exists():
        return "missing" if record.exists() else None
    if not record.exists():
        return "has no record of a finished write (interrupted, or not this cache's)"
    try:
        expected = json.loads(record.read_text())
        size, digest = int(expected["bytes"]), str(expected["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return "its record is unreadable"
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
    ``input_ids`` and ``attention_mask``. Each shard is written atomically, then a record of its
    size and digest beside it (``shard-….safetensors.json``).

    A rerun resumes: a shard counts as finished only if its record matches the file, so a damaged,
    truncated or foreign shard is recomputed (with a warning naming it), and temporary files of an
    interrupted write are removed. ``manifest.json`` identifies the run completely — a digest of
    every weight and buffer, the config, the tokenizer, the points, positions, dtype, batch size and
    the texts — and a directory made by a run that differs in any of them is refused, saying what
    differs. A run that fails before its first shard leaves the directory as it found it. Under
    ``torchrun`` each rank takes shards i ≡ rank (mod world). Returns this rank's shard paths.
    """
    out = Path(out_dir)
    texts = _check_dataset_arguments(texts, points, batch_size, positions, dtype, out)
    resolved = select(model, points, layers)
    check_available(model, resolved)
    dtype = dtype or model.hf_model.dtype
    run = _Run(model, texts, [key for key, _, _ in resolved], batch_size, positions, dtype, out, *_rank_world())
    run.identity = run_identity(model, texts, run.keys, batch_size, positions, dtype)
    _check_manifest(out / MANIFEST, run.identity)
    n_shards = math.ceil(len(texts) / batch_size)
    mine = [i for i in range(n_shards) if i % run.world == run.rank]
    paths = [out / f"shard-{i:06d}.safetensors" for i in mine]
    created_dir = not out.exists()
    if run.rank == 0 and out.exists():
        _remove_leftovers(out)
    _barrier(run.world)
    todo = _shards_to_write(mine, paths)
    if progress and todo:
        planned = _planned_bytes(model, texts, resolved, [i for i, _ in todo], batch_size, positions, dtype)
        print(f"cache_dataset: {len(todo)} shard(s) of up to {batch_size} texts to write, {planned / 1024**2:,.1f} MiB "
              f"({len(texts)} texts in all, {dtype})")
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
    except BaseException:
        if not run.wrote_any and run.rank == 0:
            _undo_start(out, out / MANIFEST if run.wrote_manifest else None, created_dir)
        raise
    finally:
        bar.close()
    if run.rank == 0 and not (out / MANIFEST).exists():  # nothing was left to write
        run.write_manifest()
    _barrier(run.world)
    return paths


def _check_manifest(manifest_file: Path, identity: dict[str, Any]) -> None:
    """A directory made by a run that differs from this one is refused, saying what differs."""
    if not manifest_file.exists():
        return
    try:
        existing = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{manifest_file} is unreadable ({error}); remove the directory or use another") from None
    differs = [_WHAT.get(k, k) for k in identity if not isinstance(existing, dict) or existing.get(k) != identity[k]]
    if differs:
        raise ValueError(f"{manifest_file.parent} holds shards of a different cache: {', '.join(differs)} differ from "
                         "this run's; refusing to resume into it: use another directory or remove it")


def _shards_to_write(mine: list[int], paths: list[Path]) -> list[tuple[int, Path]]:
    """This rank's shards that are not finished and verified (a damaged one is named and recomputed)."""
    todo = []
    for i, path in zip(mine, paths):
        problem = _verified(path)
        if path.exists() and problem is None:
            continue
        if problem is not None:
            warnings.warn(f"{path.name} {problem}: recomputing it", stacklevel=3)
        todo.append((i, path))
    return todo


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

    def write_manifest(self) -> None:
        atomic_write(self.out / MANIFEST, lambda p: Path(p).write_text(json.dumps(self.identity, indent=1)))

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
        metadata = {"texts": json.dumps([i * self.batch_size, i * self.batch_size + len(chunk)])}
        atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata))
        record = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
        atomic_write(_shard_record(path), lambda p: Path(p).write_text(json.dumps(record)))
        self.wrote_any = True
        mask = values.attention_mask
        return len(chunk), int(mask.sum()) if mask is not None else values.input_ids.numel()


def _planned_bytes(model: Any, texts: list[str], resolved: list, shards: list[int], batch_size: int,
                   positions: Sequence[int] | None, dtype: torch.dtype) -> int:
    """The bytes the given shards will hold: each padded to its longest text, as `cache` pads."""
    lengths = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
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
