"""Activation caches: a mapping of point values for one batch, and safetensors shards for a dataset.

Names are the table's (`g3n_probe.points.POINTS`) plus the layer stacks ``input`` and ``output``:
``"layers.3.altup_predict"`` for one layer, ``"altup_predict"`` for every selected layer, and the
model-level names as they are (``"ple_tokens"``, ``"logits"``). Values keep the point's layout
([S,B,T,D] stacks stay stacks); ``positions`` selects along the token axis (the query axis for
``attn_pattern``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ._util import atomic_write
from .points import LAYER, POINTS, ModuleItself, Point, concrete_shape

# The decoder layer's own .input / .output: the layer module is the place, so no route attaches.
_STACK_POINT = Point("stack", LAYER, "[S,B,T,D]", "decoder layer", "the stream stack entering or leaving the layer",
                     ModuleItself(""), stack=True)
LAYER_STACKS = {"input": _STACK_POINT, "output": _STACK_POINT}


class ActivationCache(dict):
    """``name -> tensor``, with the bytes it holds and the token ids it was computed on."""

    def __init__(self, values: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        super().__init__(values)
        self.input_ids = input_ids
        self.attention_mask = attention_mask

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values())

    def __repr__(self) -> str:
        lines = [f"ActivationCache({len(self)} tensors, {self.nbytes / 1024**2:.2f} MiB)"]
        lines += [f"  {name}: {list(v.shape)} {v.dtype}" for name, v in self.items()]
        return "\n".join(lines)


def valid_names() -> list[str]:
    return [p.name for p in POINTS] + list(LAYER_STACKS)


def resolve(model: Any, points: Sequence[str], layers: Iterable[int] | None = None) -> list[tuple[str, Point, int | None]]:
    """(cache key, point, layer) in execution order; a clear error for unknown names or layers."""
    n_layers = model.text_config.num_hidden_layers
    selected = list(range(n_layers)) if layers is None else sorted(set(layers))
    bad_layers = [i for i in selected if not 0 <= i < n_layers]
    if bad_layers:
        raise ValueError(f"layers {bad_layers} out of range: this model has layers 0..{n_layers - 1}")
    by_name = {p.name: p for p in POINTS}
    wanted: set[tuple[str, int | None]] = set()
    for name in points:
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "layers" and parts[1].lstrip("-").isdigit():
            layer, base = int(parts[1]), parts[2]
            if not 0 <= layer < n_layers:
                raise ValueError(f"{name}: layer {layer} out of range: this model has layers 0..{n_layers - 1}")
            layer_list = [layer]
        else:
            base, layer_list = name, selected
        point = by_name.get(base) or LAYER_STACKS.get(base)
        if point is None:
            raise ValueError(f"unknown point {name!r}; valid names: {', '.join(valid_names())} "
                             "(per layer as 'layers.<i>.<name>' or for every selected layer as '<name>')")
        if point.scope == "model" and base in by_name:
            wanted.add((base, None))
        else:
            wanted.update((base, i) for i in layer_list)
    order = {p.name: k for k, p in enumerate(POINTS)}
    first_layer = min(order[p.name] for p in POINTS if p.scope == "layer")

    def rank(item: tuple[str, int | None]) -> tuple:
        base, layer = item
        if layer is None:
            return (0 if order[base] < first_layer else 2, 0, order[base])
        within = -1 if base == "input" else (len(POINTS) if base == "output" else order[base])
        return (1, layer, within)

    resolved = []
    for base, layer in sorted(wanted, key=rank):
        point = by_name.get(base) or LAYER_STACKS[base]
        key = base if layer is None else f"layers.{layer}.{base}"
        resolved.append((key, point, layer))
    return resolved


def _token_axis(point: Point) -> int:
    return point.shape.strip("[]").split(",").index("T")


def _envoy(model: Any, point: Point, layer: int | None) -> Any:
    if point is _STACK_POINT:
        return model.layers[layer]
    return getattr(model.layers[layer], point.name) if layer is not None else getattr(model, point.name)


def encode_inputs(model: Any, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(inputs, torch.Tensor):
        ids = inputs if inputs.dim() == 2 else inputs[None]
        return ids, None
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    encoded = model.tokenizer(texts, return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"]


def estimate_bytes(model: Any, resolved: list, batch: int, tokens: int, positions: Sequence[int] | None,
                   dtype: torch.dtype) -> dict[str, int]:
    sizes = {}
    for key, point, layer in resolved:
        shape = list(concrete_shape(point, model.text_config, batch, tokens, layer or 0))
        if positions is not None:
            shape[_token_axis(point)] = len(positions)
        sizes[key] = math.prod(shape) * dtype.itemsize
    return sizes


def cache(model: Any, inputs: Any, points: Sequence[str], layers: Iterable[int] | None = None,
          positions: Sequence[int] | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
          max_bytes: int | None = None, verbose: bool = True) -> ActivationCache:
    """Run ``inputs`` once and return the chosen points' values, moved to ``device``/``dtype``.

    States the bytes it will hold before running, and refuses (``MemoryError``) when that exceeds
    ``max_bytes``. See the module docstring for names and ``positions``.
    """
    resolved = resolve(model, points, layers)
    for _, point, _ in resolved:
        reason = _point_reason(model, point)
        if reason:
            raise ValueError(reason)
    ids, mask = encode_inputs(model, inputs)
    batch, tokens = ids.shape
    if positions is not None:
        positions = [int(p) for p in positions]
        bad = [p for p in positions if not -tokens <= p < tokens]
        if bad:
            raise ValueError(f"positions {bad} fall outside the sequence of {tokens} tokens")
    dtype = dtype or model._module.dtype
    sizes = estimate_bytes(model, resolved, batch, tokens, positions, dtype)
    total = sum(sizes.values())
    if verbose:
        print(f"cache: {len(resolved)} tensors, {total / 1024**2:.2f} MiB ({batch}×{tokens} tokens, {dtype})")
    if max_bytes is not None and total > max_bytes:
        raise MemoryError(f"the cache would hold {total:,} bytes ({total / 1024**2:.1f} MiB), over max_bytes={max_bytes:,}; "
                          "choose fewer points, layers or positions")
    index = None if positions is None else torch.tensor([p % tokens for p in positions])
    if index is not None and mask is not None:
        padded = {int(p): (mask[:, p % tokens] == 0).nonzero().flatten().tolist() for p in positions}
        padded = {p: rows for p, rows in padded.items() if rows}
        if padded:
            warnings.warn(
                "positions " + "; ".join(f"{p} is padding in rows {rows}" for p, rows in padded.items())
                + ": texts are padded on the left, so count positions from the end (-1 is every row's last token)",
                stacklevel=2,
            )
    saved: dict[str, Any] = {}
    with torch.no_grad(), model.trace(ids if mask is None else {"input_ids": ids, "attention_mask": mask}):
        for key, point, layer in resolved:
            envoy = _envoy(model, point, layer)
            value = envoy.input if (point is _STACK_POINT and key.endswith(".input")) else envoy.output
            if index is not None:
                value = value.index_select(_token_axis(point), index.to(value.device))
            saved[key] = value.detach().to(device=device, dtype=dtype).save()
    return ActivationCache(dict(saved), ids, mask)


def _point_reason(model: Any, point: Point) -> str | None:
    """Why a point never fires in this model (``attn_pattern`` under sdpa), or None."""
    return model.injection.unavailable(point)


# ---- datasets ---------------------------------------------------------------------------------------

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
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    import torch.distributed as dist

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


def _identity(model: Any, texts: list[str], keys: list[str], batch_size: int, positions: Any,
              dtype: torch.dtype) -> dict[str, Any]:
    """Everything a shard's values depend on; two runs may share a directory only if all of it is equal."""
    return {
        "format": 2,
        "points": keys,
        "weights": weights_digest(model._module),
        "config": hashlib.sha256(model._module.config.to_json_string(use_diff=False).encode()).hexdigest(),
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
    from safetensors.torch import save_file
    from tqdm import tqdm

    out = Path(out_dir)
    texts = _check_dataset_arguments(texts, points, batch_size, positions, dtype, out)
    resolved = resolve(model, points, layers)
    for _, point, _ in resolved:
        reason = _point_reason(model, point)
        if reason:
            raise ValueError(reason)
    keys = [key for key, _, _ in resolved]
    dtype = dtype or model._module.dtype
    identity = _identity(model, texts, keys, batch_size, positions, dtype)
    manifest_file = out / MANIFEST
    if manifest_file.exists():
        try:
            existing = json.loads(manifest_file.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{manifest_file} is unreadable ({error}); remove the directory or use another") from None
        differs = [_WHAT.get(k, k) for k in identity if not isinstance(existing, dict) or existing.get(k) != identity[k]]
        if differs:
            raise ValueError(f"{out} holds shards of a different cache: {', '.join(differs)} differ from this run's; "
                             "refusing to resume into it: use another directory or remove it")

    rank, world = _rank_world()
    n_shards = math.ceil(len(texts) / batch_size)
    mine = [i for i in range(n_shards) if i % world == rank]
    paths = [out / f"shard-{i:06d}.safetensors" for i in mine]
    created_dir = not out.exists()
    if rank == 0 and out.exists():
        _remove_leftovers(out)
    _barrier(world)
    todo = []
    for i, path in zip(mine, paths):
        problem = _verified(path)
        if path.exists() and problem is None:
            continue
        if problem is not None:
            warnings.warn(f"{path.name} {problem}: recomputing it", stacklevel=2)
        todo.append((i, path))
    if progress and todo:
        planned = _planned_bytes(model, texts, resolved, [i for i, _ in todo], batch_size, positions, dtype)
        print(f"cache_dataset: {len(todo)} shard(s) of up to {batch_size} texts to write, {planned / 1024**2:,.1f} MiB "
              f"({len(texts)} texts in all, {dtype})")
    bar = tqdm(total=len(todo), desc=f"caching (rank {rank}/{world})", unit="shard", disable=not progress,
               position=rank)
    wrote_any = wrote_manifest = False
    start = time.perf_counter()
    done_texts = done_tokens = 0
    try:
        for i, path in todo:
            chunk = texts[i * batch_size:(i + 1) * batch_size]
            values = cache(model, chunk, keys, positions=positions, dtype=dtype, verbose=False)
            tensors = {k: v.contiguous() for k, v in values.items()}
            tensors["input_ids"] = values.input_ids.contiguous()
            if values.attention_mask is not None:
                tensors["attention_mask"] = values.attention_mask.contiguous()
            out.mkdir(parents=True, exist_ok=True)
            if rank == 0 and not manifest_file.exists():
                atomic_write(manifest_file, lambda p: Path(p).write_text(json.dumps(identity, indent=1)))
                wrote_manifest = True
            metadata = {"texts": json.dumps([i * batch_size, i * batch_size + len(chunk)])}
            atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata))
            record = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
            atomic_write(_shard_record(path), lambda p: Path(p).write_text(json.dumps(record)))
            wrote_any = True
            done_texts += len(chunk)
            done_tokens += int(values.attention_mask.sum()) if values.attention_mask is not None else values.input_ids.numel()
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(texts_per_s=f"{done_texts / elapsed:.1f}", tokens_per_s=f"{done_tokens / elapsed:.0f}")
            bar.update(1)
    except BaseException:
        if not wrote_any and rank == 0:
            _undo_start(out, manifest_file if wrote_manifest else None, created_dir)
        raise
    finally:
        bar.close()
    if rank == 0 and not manifest_file.exists():  # nothing was left to write
        atomic_write(manifest_file, lambda p: Path(p).write_text(json.dumps(identity, indent=1)))
    _barrier(world)
    return paths


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
