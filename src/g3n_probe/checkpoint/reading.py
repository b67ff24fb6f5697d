"""What a Gemma 3n checkpoint directory holds, read without building a model.

Shared by the loader, the hub fetch, the towers, the CLI and the benchmarks, so each fact about the
files is written once:

* the config (`read_config`: a clear error for anything that is not Gemma 3n, sanity checks that
  name the file and key before anything is built);
* where each tensor is (`weight_map`, `by_file`; pickle checkpoints refused without being opened);
* which keys the text path reads (`keys_read`: text prefixes, minus the k/v that KV-shared layers
  carry but never read), and which component a key belongs to (`component_of`);
* safetensors headers (`parse_header`: every entry checked against its dtype, shape, the file's
  size and its neighbours) and positional reads (`read_exactly`), for local files and remote ones alike.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import torch

from . import module_tree

TEXT_PREFIXES = ("model.language_model.", "model.embed_vision.", "model.embed_audio.")
TOWER_PREFIXES = {"vision": "model.vision_tower.", "audio": "model.audio_tower."}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
#: What an index's metadata says when g3n_probe's fetch left towers out (`fetched_text_only`).
FETCH_NOTE = "g3n_probe"

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
FLOAT_STORAGE = frozenset(TORCH_DTYPES)
MAX_HEADER_BYTES = 100 * 1024**2   # safetensors' own limit
PIECE_BYTES = 32 * 1024**2   # one positional read
READ_THREADS = 4

_LAYER_KEY = re.compile(r"^model\.language_model\.layers\.(\d+)\.")
_KV_SHARED_KEY = re.compile(r"^model\.language_model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")


class CheckpointError(ValueError):
    """The checkpoint is missing, corrupt, not Gemma 3n, or does not match its config."""


# ---- the config ------------------------------------------------------------------------------------

_POSITIVE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
             "vocab_size", "vocab_size_per_layer_input", "hidden_size_per_layer_input", "altup_num_inputs",
             "laurel_rank", "sliding_window")
_PER_LAYER = ("layer_types", "intermediate_size", "activation_sparsity_pattern")
MAX_LAYERS = 1024  # Gemma 3n has 30 (E2B) or 35 (E4B): more is a corrupt config, not a model


def read_config(directory: Path) -> Any:
    """The checkpoint's ``Gemma3nConfig``; a clear error for anything that is not Gemma 3n."""
    from transformers import Gemma3nConfig

    config_file = directory / "config.json"
    if not config_file.exists():
        raise CheckpointError(f"{directory} has no config.json; is it a Hugging Face checkpoint?")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_file} is not valid JSON: {error}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != "gemma3n":
        raise CheckpointError(
            f"{config_file} describes model_type={model_type!r}, not a Gemma 3n checkpoint "
            "(model_type 'gemma3n', Gemma3nForConditionalGeneration)"
        )
    text = raw.get("text_config") or {}
    if "altup_num_inputs" not in text and "hidden_size_per_layer_input" not in text:
        raise CheckpointError(f"{config_file} has no AltUp/per-layer-embedding settings: not a Gemma 3n checkpoint")
    _check_text_config(config_file, text)
    try:
        return Gemma3nConfig.from_pretrained(directory)
    except Exception as error:  # transformers validates configs with several error types
        raise CheckpointError(f"{config_file}: transformers rejects this Gemma 3n config: "
                              f"{type(error).__name__}: {error}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_text_config(config_file: Path, text: dict) -> None:
    """Sanity-check the text config before anything is built: every problem names the file and key."""
    def bad(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{config_file}: text_config.{key} {why}")

    for key in _POSITIVE:
        if key in text and (not _is_int(text[key]) or text[key] <= 0):
            raise bad(key, f"must be a positive integer; got {text[key]!r}")
    layers = text.get("num_hidden_layers")
    if _is_int(layers) and layers > MAX_LAYERS:
        raise bad("num_hidden_layers", f"is {layers}; a Gemma 3n has at most a few dozen layers (limit {MAX_LAYERS})")
    for key in _PER_LAYER:
        value = text.get(key)
        scalar_ok = key != "layer_types" and isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in text and not isinstance(value, list) and not scalar_ok:
            raise bad(key, f"must be a list with one entry per layer; got {value!r}")
        if isinstance(value, list) and layers is not None and len(value) != layers:
            raise bad(key, f"has {len(value)} entries for num_hidden_layers={layers}")
    streams, active = text.get("altup_num_inputs"), text.get("altup_active_idx")
    if active is not None and (not _is_int(active) or not 0 <= active < (streams if _is_int(streams) else 4)):
        raise bad("altup_active_idx", f"is {active!r}; it must index one of the {streams} AltUp streams")
    shared = text.get("num_kv_shared_layers")
    if shared is not None and (not _is_int(shared) or shared < 0 or (_is_int(layers) and shared >= layers)):
        raise bad("num_kv_shared_layers", f"is {shared!r}; it must be between 0 and num_hidden_layers - 1")


# ---- where the tensors are -------------------------------------------------------------------------

def weight_map(directory: Path) -> dict[str, str]:
    """Checkpoint key -> safetensors file name; pickle checkpoints are refused without being opened."""
    index = directory / INDEX
    if index.exists():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index} is not a valid safetensors index: {type(error).__name__}: {error}") from None
        if not isinstance(mapping, dict):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard files; got a {type(mapping).__name__}")
        root = directory.resolve()
        for key, filename in mapping.items():
            if not isinstance(filename, str) or not filename:
                raise CheckpointError(f"{index}: weight_map[{key!r}] must be a shard file name; got {filename!r}")
            target = (directory / filename).resolve()
            if Path(filename).is_absolute() or root not in target.parents:
                raise CheckpointError(f"{index}: weight_map[{key!r}] = {filename!r} points outside the checkpoint "
                                      f"directory {directory}; shards must be files inside it")
        return dict(mapping)
    single = directory / SINGLE
    if single.exists():
        return {key: single.name for key in keys_in(single)}
    pickles = sorted(p.name for p in directory.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle weights ({', '.join(pickles)}); g3n_probe never unpickles. "
            "Convert them to safetensors first (for example with transformers' save_pretrained "
            "in a trusted environment)."
        )
    raise CheckpointError(f"{directory} has no safetensors weights ({SINGLE} or {INDEX})")


def by_file(mapping: dict[str, str], keys: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Shard file -> its keys (all of ``mapping``'s, or only ``keys``), in the mapping's order."""
    wanted = None if keys is None else set(keys)
    grouped: dict[str, list[str]] = {}
    for key, filename in mapping.items():
        if wanted is None or key in wanted:
            grouped.setdefault(filename, []).append(key)
    return grouped


def open_safetensors(path: Path) -> Any:
    """A safetensors handle (a context manager); a `CheckpointError` for a file that is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {error}") from None


def keys_in(path: Path) -> set[str]:
    """The tensor names of a safetensors file (safetensors checks on open that the header matches the bytes)."""
    with open_safetensors(path) as handle:
        return set(handle.keys())


def is_text_key(key: str) -> bool:
    return key.startswith(TEXT_PREFIXES)


def check_layer_count(directory: Path, config: Any, mapping: dict[str, str]) -> None:
    """The layers the weights hold must be the layers the config declares: checked before a skeleton is built."""
    stored = {int(m.group(1)) for key in mapping if (m := _LAYER_KEY.match(key))}
    declared = config.text_config.num_hidden_layers
    if stored and stored != set(range(declared)):
        raise CheckpointError(f"{directory}: config.json declares num_hidden_layers={declared}, but the weights hold "
                              f"layers {min(stored)}..{max(stored)} ({len(stored)} layers)")


def keys_read(keys: Iterable[str], config: Any) -> tuple[list[str], list[str]]:
    """The checkpoint keys the text path reads, and the KV-shared layers' k/v it skips (transformers
    builds no k/v there; real checkpoints still carry them). Neither list holds a tower key."""
    shared = set(module_tree.kv_sources(config.text_config))
    read, skipped = [], []
    for key in keys:
        if is_text_key(key):
            match = _KV_SHARED_KEY.match(key)
            (skipped if match and int(match.group(1)) in shared else read).append(key)
    return read, skipped


def tower_files(mapping: dict[str, str]) -> dict[str, dict[str, str]]:
    """Tower kind -> {checkpoint key: shard file} for the towers' tensors."""
    return {kind: {k: f for k, f in mapping.items() if k.startswith(prefix)} for kind, prefix in TOWER_PREFIXES.items()}


def stray_keys(mapping: dict[str, str]) -> list[str]:
    """Keys that belong to neither the text path, a tower, nor the tied ``lm_head``."""
    towers = tuple(TOWER_PREFIXES.values())
    return sorted(k for k in mapping if not is_text_key(k) and not k.startswith(towers) and k != "lm_head.weight")


COMPONENTS = ("text decoder", "embed_tokens", "per-layer table", "multimodal embedders", "vision tower", "audio tower")


def component_of(key: str) -> str:
    """The component a checkpoint key (or parameter/buffer name) belongs to."""
    for kind, prefix in TOWER_PREFIXES.items():
        if key.startswith(prefix):
            return f"{kind} tower"
    if key.startswith(f"model.language_model.{module_tree.PER_LAYER_TABLE}."):
        return "per-layer table"
    if key.startswith("model.language_model.embed_tokens."):
        return "embed_tokens"
    if key.startswith(("model.embed_vision.", "model.embed_audio.")):
        return "multimodal embedders"
    return "text decoder"


def fetched_text_only(directory: Path) -> str | None:
    """If ``directory`` is a text-only fetch, what its index says it left out; else None."""
    try:
        return json.loads((directory / INDEX).read_text())["metadata"][FETCH_NOTE]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- safetensors headers and bytes -----------------------------------------------------------------

def header_length(first8: bytes, size: int, where: str) -> int:
    """The header length a safetensors file's first 8 bytes give, checked against the file's size."""
    if size < 8 or len(first8) < 8:
        raise CheckpointError(f"{where} is {size} bytes: not a safetensors file")
    length = int.from_bytes(first8[:8], "little")
    if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
        raise CheckpointError(f"{where}: header length {length} does not fit a {size}-byte file")
    return length


def parse_header(text: bytes, size: int, where: str) -> dict[str, tuple[str, list[int], int, int]]:
    """Key -> (dtype, shape, first byte, end byte) in the file, from the JSON header after the length.

    Every entry is checked as safetensors checks it on open: dtype × shape = bytes, inside the file's
    data, and no two tensors sharing bytes. ``__metadata__`` is returned under its own key as given.
    """
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{where}: the safetensors header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: the safetensors header is not a JSON object")
    base = 8 + len(text)
    entries: dict[str, Any] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            entries[key] = entry
            continue
        try:
            start, end = (int(x) for x in entry["data_offsets"])
            count = math.prod(int(dim) for dim in entry["shape"])
            itemsize = DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{where}: the header's entry for {key} is malformed: {entry!r}") from None
        if not 0 <= start <= end or end - start != count * itemsize or base + end > size:
            raise CheckpointError(f"{where}: the header's entry for {key} does not match its bytes ({entry['dtype']} "
                                  f"{entry['shape']}, offsets {start}..{end}, file {size} bytes)")
        entries[key] = (entry["dtype"], [int(d) for d in entry["shape"]], base + start, base + end)
    spans = sorted((v[2], v[3], k) for k, v in entries.items() if k != "__metadata__" and v[3] > v[2])
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{where}: tensors {first} and {second} share bytes in the header; "
                                  "refusing an overlapping safetensors file")
    return entries


def check_as_safetensors_does(text: bytes, size: int, where: str) -> None:
    """What `parse_header` lets through but safetensors refuses on open (so the loader refuses too):
    dims and offsets that are not non-negative JSON integers (``"4"``, ``2.0``, ``true``, ``-2``),
    ``__metadata__`` that is not a map of strings, and tensors that leave gaps or do not end where the
    file does. The hub fetch runs it on a remote header before a byte of its tensors moves."""
    header = json.loads(text)
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{where}: the header's __metadata__ must map names to strings; got {metadata!r}")
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        numbers = list(entry["shape"]) + list(entry["data_offsets"])
        if len(entry["data_offsets"]) != 2 or not all(_is_int(n) and n >= 0 for n in numbers):
            raise CheckpointError(f"{where}: the header's entry for {key} is malformed (shape and data_offsets "
                                  f"must be non-negative integers): {entry!r}")
        spans.append((entry["data_offsets"][0], entry["data_offsets"][1], key))
    end = 0
    for start, stop, key in sorted(spans):
        if start != end:
            raise CheckpointError(f"{where}: the header leaves bytes {end}..{start} before {key} to no tensor; "
                                  "safetensors refuses a file with gaps")
        end = stop
    if 8 + len(text) + end != size:
        raise CheckpointError(f"{where}: the header's tensors end at byte {8 + len(text) + end}, the file at {size}")


def tensor_offsets(path: Path) -> dict[str, tuple[str, list[int], int]]:
    """Key -> (safetensors dtype, shape, first byte) in a local file, from its header (no data read)."""
    size = path.stat().st_size
    where = f"{path} is not a readable safetensors file (corrupt or truncated?)"
    with open(path, "rb") as handle:
        length = header_length(handle.read(8), size, where)
        entries = parse_header(handle.read(length), size, where)
    return {key: entry[:3] for key, entry in entries.items() if key != "__metadata__"}


def tensor_bytes(entry: tuple[str, list[int], int]) -> int:
    dtype, shape, _ = entry[:3]
    return math.prod(shape) * DTYPE_BYTES[dtype]


def read_exactly(fd: int, offset: int, into: Any, path: Path) -> None:
    """Fill ``into`` (a writable buffer) from ``fd`` at ``offset``; a short file is a `CheckpointError`.

    The bytes are then dropped from the page cache: they now live in ``into``, and a page cache growing
    by the model's size made the second half of an E2B load read 2.6× slower here (0.37 against 0.97
    GB/s; with the pages dropped, 1.2 GB/s throughout). A reload therefore reads from disk again;
    ``G3N_PROBE_KEEP_PAGE_CACHE=1`` keeps the pages (several processes loading one checkpoint at once)."""
    view, done = memoryview(into).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise CheckpointError(f"{path} ends before the data its header promises (truncated?)")
        done += got
    if view and hasattr(os, "posix_fadvise") and not os.environ.get("G3N_PROBE_KEEP_PAGE_CACHE"):
        try:
            os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)
        except OSError:
            pass   # advice only: the bytes are read either way


def read_into_own_storage(path: Path, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each tensor read from the file straight into a fresh, allocator-aligned host tensor of ``dtype``.

    Why not the memory map: on CPU, transformers keeps weights of the checkpoint's dtype as views into
    the mapped file, at whatever alignment their offsets give, and BLAS kernels round differently for
    differently aligned operands (a single-row lm_head differed in the last bit). Copying out of the
    map fixed that but held both copies at once (peak RSS 12.5 GiB for E2B's 8.3 GiB). Reading into
    our own storage costs one pass over the bytes and no second copy. Reads go in 32 MiB pieces from
    four threads at once: on this machine's virtual disk, cold, that read E2B's text at 1.1 GB/s against
    0.95 GB/s from eight threads in 16 MiB pieces (and 0.55 GB/s from one thread, another day).
    A tensor stored in another dtype is read through a staging buffer per thread and converted.
    """
    offsets = tensor_offsets(path)
    result = {key: torch.empty(offsets[key][1], dtype=dtype) for key in keys}
    pieces = []
    for key in keys:
        stored, _, start = offsets[key]
        item = TORCH_DTYPES[stored].itemsize
        per_piece = PIECE_BYTES // item
        for first in range(0, result[key].numel(), per_piece):
            pieces.append((key, first, min(per_piece, result[key].numel() - first), start + first * item))
    local = threading.local()
    fd = os.open(path, os.O_RDONLY)

    def read(piece: tuple[str, int, int, int]) -> None:
        key, first, count, offset = piece
        source_dtype = TORCH_DTYPES[offsets[key][0]]
        flat = result[key].view(-1)[first:first + count]
        if source_dtype == dtype:
            read_exactly(fd, offset, flat.view(torch.uint8).numpy(), path)
            return
        staging = getattr(local, "staging", None)
        if staging is None:
            staging = local.staging = torch.empty(PIECE_BYTES, dtype=torch.uint8)
        chunk = staging[: count * source_dtype.itemsize]
        read_exactly(fd, offset, chunk.numpy(), path)
        flat.copy_(chunk.view(source_dtype))

    try:
        with ThreadPoolExecutor(READ_THREADS) as pool:
            list(pool.map(read, pieces))
    finally:
        os.close(fd)
    return result


def stored_components(directory: Path) -> dict[str, dict[str, int]]:
    """Parameters and bytes per component as stored, from the safetensors headers (no tensor data);
    ``absent`` counts the tensors whose shard is not there (a config-only or text-only directory)."""
    result = {c: {"params": 0, "bytes": 0, "absent": 0} for c in COMPONENTS}
    for filename, keys in by_file(weight_map(directory)).items():
        path = directory / filename
        if not path.exists():
            for key in keys:
                result[component_of(key)]["absent"] += 1
            continue
        offsets = tensor_offsets(path)
        for key in keys:
            if key not in offsets:
                raise CheckpointError(f"{path} does not contain {key}, although the index says it does")
            entry = result[component_of(key)]
            entry["params"] += math.prod(offsets[key][1])
            entry["bytes"] += tensor_bytes(offsets[key])
    return result
