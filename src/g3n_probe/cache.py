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


def _fingerprint(model: Any) -> str:
    digest = hashlib.sha256(model._module.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, param in list(model._module.named_parameters())[:8]:
            digest.update(name.encode())
            digest.update(param.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def cache_dataset(model: Any, texts: Sequence[str], points: Sequence[str], out_dir: str | os.PathLike,
                  batch_size: int = 8, layers: Iterable[int] | None = None, positions: Sequence[int] | None = None,
                  dtype: torch.dtype | None = None, progress: bool = True) -> list[Path]:
    """Stream the points' activations for ``texts`` into safetensors shards under ``out_dir``.

    Shard i holds texts [i·batch_size, (i+1)·batch_size), padded on the left, with their
    ``input_ids`` and ``attention_mask``. Each shard is written atomically; a rerun resumes,
    skipping finished shards, and refuses a directory made for other points, texts or model
    (``manifest.json`` says which). Under ``torchrun`` each rank takes shards i ≡ rank (mod world).
    Returns this rank's shard paths.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    if not texts:
        raise ValueError("no texts to cache")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = resolve(model, points, layers)
    dtype = dtype or model._module.dtype
    manifest = {
        "points": [key for key, _, _ in resolved], "model": _fingerprint(model), "texts": len(texts),
        "texts_sha256": hashlib.sha256("\x00".join(texts).encode()).hexdigest(), "batch_size": batch_size,
        "positions": None if positions is None else list(positions), "dtype": str(dtype),
    }
    manifest_file = out / "manifest.json"
    if manifest_file.exists():
        existing = json.loads(manifest_file.read_text())
        differs = [k for k in manifest if existing.get(k) != manifest[k]]
        if differs:
            raise ValueError(f"{out} holds shards of a different cache ({', '.join(differs)} differ from this run's); "
                             "refusing to resume into it: use another directory or remove it")
    rank, world = _rank_world()
    if rank == 0 and not manifest_file.exists():
        atomic_write(manifest_file, lambda p: Path(p).write_text(json.dumps(manifest, indent=1)))
    n_shards = math.ceil(len(texts) / batch_size)
    mine = [i for i in range(n_shards) if i % world == rank]
    paths = []
    for i in tqdm(mine, desc=f"caching (rank {rank}/{world})", disable=not progress, position=rank):
        path = out / f"shard-{i:06d}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        chunk = list(texts[i * batch_size:(i + 1) * batch_size])
        values = cache(model, chunk, [key for key, _, _ in resolved], positions=positions, dtype=dtype, verbose=False)
        tensors = {k: v.contiguous() for k, v in values.items()}
        tensors["input_ids"] = values.input_ids.contiguous()
        if values.attention_mask is not None:
            tensors["attention_mask"] = values.attention_mask.contiguous()
        atomic_write(path, lambda p: save_file(tensors, p, metadata={"texts": json.dumps([i * batch_size, i * batch_size + len(chunk)])}))
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.barrier()
    return paths
