"""Text-only loading of the stock ``Gemma3nForConditionalGeneration``.

What runs is transformers' own class. This module only decides *what it is given*:

1. the checkpoint is found (a directory, or a hub id: cached, or fetched text-only by `g3n_probe.hub`)
   and checked: a Gemma 3n config, safetensors only (pickle files are refused, never opened), every
   text tensor present with the shape the config implies;
2. the model is constructed with `towers.tower_stubs` active, so no tower parameter exists;
3. only text-path tensors (``model.language_model.*``, ``model.embed_vision.*``,
   ``model.embed_audio.*``) are handed to the stock ``from_pretrained``, so no tower byte is read. On
   the host each is read straight from the file into storage of its own (`read_into_own_storage`:
   one pass over the bytes, no memory map left behind, no second copy). The k/v tensors real
   checkpoints still carry for KV-shared layers are skipped (transformers ignores them by design);
   any other stray or missing key is an error.

`load_text_model` returns the plain transformers model and a `LoadReport`; `load` wraps it in the
nnsight probe. `footprint` says where each component will live, without loading anything.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import arch
from ._util import SAFETENSORS_DTYPE_BYTES, parse_device
from .towers import TOWERS, TowerStub, tower_stubs

if TYPE_CHECKING:
    from .probe import Gemma3nProbe

TEXT_PREFIXES = ("model.language_model.", "model.embed_vision.", "model.embed_audio.")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_LAYER_KEY = re.compile(r"^model\.language_model\.layers\.(\d+)\.")
_KV_SHARED_KEY = re.compile(r"^model\.language_model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")


_FLOAT_STORAGE = {"F32", "BF16", "F16", "F64"}


class CheckpointError(ValueError):
    """The checkpoint is missing, corrupt, not Gemma 3n, or does not match its config."""


@dataclass
class LoadReport:
    """What a load read, for `g3n-probe info`, the benchmarks and the tests."""

    source: Path
    tensors_read: int = 0
    bytes_read: int = 0
    files_opened: list[str] = field(default_factory=list)
    skipped_kv_shared: list[str] = field(default_factory=list)
    tower_tensors_in_checkpoint: dict[str, int] = field(default_factory=dict)
    clipped_coefficients: int = 0


def resolve_source(source: str | os.PathLike | None, **hub_options: Any) -> Path:
    """A local checkpoint directory for ``source``: a path, or a hub id (cached, or fetched text-only by
    `g3n_probe.hub.resolve`, which takes ``hub_options``: revision, cache_dir, token, local_files_only,
    download)."""
    if source is None:
        return default_source()
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; a Gemma 3n checkpoint is a directory with config.json")
        return path
    from . import hub

    if not hub.looks_like_hub_id(str(source)):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    return hub.resolve(str(source), **hub_options)


BUNDLED = Path(__file__).parent / "data" / "default"


def default_source() -> Path:
    """The bundled default: the trained tiny Gemma 3n shipped in the package (see its model card,
    ``data/default/README.md``), or, if a build lacks it, the tiny synthetic checkpoint made on
    first use into a cache directory."""
    if (BUNDLED / "model.safetensors").exists():
        return BUNDLED
    from .synthetic import default_checkpoint

    return default_checkpoint()


def read_config(directory: Path):
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
    except Exception as error:  # noqa: BLE001 - transformers validates configs with several error types
        raise CheckpointError(f"{config_file}: transformers rejects this Gemma 3n config: "
                              f"{type(error).__name__}: {error}") from None


_POSITIVE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
             "vocab_size", "vocab_size_per_layer_input", "hidden_size_per_layer_input", "altup_num_inputs",
             "laurel_rank", "sliding_window")
_PER_LAYER = ("layer_types", "intermediate_size", "activation_sparsity_pattern")
MAX_LAYERS = 1024  # Gemma 3n has 30 (E2B) or 35 (E4B): more is a corrupt config, not a model


def _check_text_config(config_file: Path, text: dict) -> None:
    """Sanity-check the text config before anything is built: every problem names the file and key."""
    def bad(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{config_file}: text_config.{key} {why}")

    for key in _POSITIVE:
        if key in text and (isinstance(text[key], bool) or not isinstance(text[key], int) or text[key] <= 0):
            raise bad(key, f"must be a positive integer; got {text[key]!r}")
    layers = text.get("num_hidden_layers")
    if isinstance(layers, int) and layers > MAX_LAYERS:
        raise bad("num_hidden_layers", f"is {layers}; a Gemma 3n has at most a few dozen layers (limit {MAX_LAYERS})")
    for key in _PER_LAYER:
        value = text.get(key)
        if key in text and not isinstance(value, list) and not (key != "layer_types" and isinstance(value, (int, float))
                                                               and not isinstance(value, bool)):
            raise bad(key, f"must be a list with one entry per layer; got {value!r}")
        if isinstance(value, list) and layers is not None and len(value) != layers:
            raise bad(key, f"has {len(value)} entries for num_hidden_layers={layers}")
    streams, active = text.get("altup_num_inputs"), text.get("altup_active_idx")
    if active is not None and (not isinstance(active, int) or isinstance(active, bool)
                               or not 0 <= active < (streams if isinstance(streams, int) else 4)):
        raise bad("altup_active_idx", f"is {active!r}; it must index one of the {streams} AltUp streams")
    shared = text.get("num_kv_shared_layers")
    if shared is not None and (not isinstance(shared, int) or isinstance(shared, bool) or shared < 0
                               or (isinstance(layers, int) and shared >= layers)):
        raise bad("num_kv_shared_layers", f"is {shared!r}; it must be between 0 and num_hidden_layers - 1")


def weight_map(directory: Path) -> dict[str, str]:
    """Checkpoint key -> safetensors file name; pickle checkpoints are refused without being opened."""
    index = directory / "model.safetensors.index.json"
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
    single = directory / "model.safetensors"
    if single.exists():

        with open_safetensors(single) as handle:
            return {key: single.name for key in handle.keys()}
    pickles = sorted(p.name for p in directory.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle weights ({', '.join(pickles)}); g3n_probe never unpickles. "
            "Convert them to safetensors first (for example with transformers' save_pretrained "
            "in a trusted environment)."
        )
    raise CheckpointError(f"{directory} has no safetensors weights (model.safetensors or model.safetensors.index.json)")


def open_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {error}") from None


def is_text_key(key: str) -> bool:
    return key.startswith(TEXT_PREFIXES)


def expected_text_shapes(config) -> dict[str, torch.Size]:
    """The text-path tensors a checkpoint of ``config`` must hold (built on the meta device)."""
    from transformers import Gemma3nForConditionalGeneration

    with tower_stubs(), torch.device("meta"):
        skeleton = Gemma3nForConditionalGeneration(config)
    return {k: v.shape for k, v in skeleton.state_dict().items() if is_text_key(k)}


def _check_layer_count(directory: Path, config: Any, mapping: dict[str, str]) -> None:
    """The layers the weights hold must be the layers the config declares: checked before a skeleton is built."""
    stored = {int(m.group(1)) for key in mapping if (m := _LAYER_KEY.match(key))}
    declared = config.text_config.num_hidden_layers
    if stored and stored != set(range(declared)):
        raise CheckpointError(f"{directory}: config.json declares num_hidden_layers={declared}, but the weights hold "
                              f"layers {min(stored)}..{max(stored)} ({len(stored)} layers)")


def keys_read(keys: Any, config: Any) -> tuple[list[str], list[str]]:
    """The checkpoint keys the text path reads, and the KV-shared layers' k/v it skips (transformers
    builds no k/v there; real checkpoints still carry them). Neither list holds a tower key."""
    shared = {i for i, mode in enumerate(config.text_config.kv_sharing_modes) if mode == "reuse"}
    read, skipped = [], []
    for key in keys:
        if is_text_key(key):
            match = _KV_SHARED_KEY.match(key)
            (skipped if match and int(match.group(1)) in shared else read).append(key)
    return read, skipped


class _CountingHandle:
    """A safetensors handle that counts the tensors and bytes actually requested from it."""

    def __init__(self, handle: Any, report: LoadReport) -> None:
        self._handle = handle
        self._report = report

    def slice(self, key: str) -> Any:
        piece = self._handle.get_slice(key)
        self._report.tensors_read += 1
        itemsize = SAFETENSORS_DTYPE_BYTES.get(piece.get_dtype(), 4)
        self._report.bytes_read += math.prod(piece.get_shape()) * itemsize
        return piece


def load_text_model(
    source: str | os.PathLike | None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
    ple_device: str | torch.device | None = None,
    staging: Staging | None = None,
) -> tuple[Any, LoadReport]:
    """Build the stock ``Gemma3nForConditionalGeneration`` text-only from a safetensors checkpoint.

    On the host, every tensor is read into storage of its own (`read_into_own_storage`). On an
    accelerator, every tensor crosses from the file to the device through the bounded buffers of a
    `Staging`, and the per-layer table (by default, ``ple_device`` None) is read into host storage and
    never copied to the device (see `g3n_probe.ple`): the host never holds more than the table plus
    the staging buffers. ``staging`` injects the crossing (its ``device`` is the model's), so tests and
    benchmarks can stand in for an accelerator and record what is copied where.
    """
    from transformers import Gemma3nForConditionalGeneration

    from .ple import host_resident, resolve_ple_device

    directory = resolve_source(source)
    config = read_config(directory)
    device = staging.device if staging is not None else _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    table_device = resolve_ple_device(ple_device, device)
    mapping = weight_map(directory)
    report = LoadReport(source=directory)

    _check_layer_count(directory, config, mapping)
    read, report.skipped_kv_shared = keys_read(mapping, config)
    text_keys = {key: mapping[key] for key in read}
    tower_files = {kind: {k: f for k, f in mapping.items() if k.startswith(prefix)} for kind, prefix in TOWERS.items()}
    report.tower_tensors_in_checkpoint = {kind: len(v) for kind, v in tower_files.items()}
    stray = sorted(k for k in mapping if not is_text_key(k) and not k.startswith(tuple(TOWERS.values())))
    stray = [k for k in stray if k != "lm_head.weight"]

    expected = expected_text_shapes(config)
    missing = sorted(set(expected) - set(text_keys))
    unexpected = sorted(set(text_keys) - set(expected)) + stray
    if missing or unexpected:
        raise CheckpointError(
            f"{directory} does not match its Gemma 3n config: "
            + (f"missing {len(missing)} tensor(s): {', '.join(missing[:20])}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:20])}" if unexpected else "")
        )

    state: dict[str, Any] = {}
    handles = []
    table_key = f"{arch.TEXT_MODEL_PATHS['Gemma3nForConditionalGeneration']}.{arch.PER_LAYER_TABLE}.weight"
    if staging is None and device.type != "cpu":
        staging = Staging(device)
    host_table = None
    try:
        by_file: dict[str, list[str]] = {}
        for key, filename in text_keys.items():
            by_file.setdefault(filename, []).append(key)
        for filename, keys in by_file.items():
            path = directory / filename
            if not path.exists():
                raise CheckpointError(f"{path} is missing; it holds text tensors such as {keys[0]}")
            handle = open_safetensors(path)
            handles.append(handle)
            report.files_opened.append(filename)
            present = set(handle.keys())
            counting = _CountingHandle(handle, report)
            for key in keys:
                if key not in present:
                    raise CheckpointError(f"{path} does not contain {key}, although the index says it does")
                piece = counting.slice(key)
                if piece.get_dtype() not in _FLOAT_STORAGE:
                    raise CheckpointError(f"{key} in {filename} is stored as {piece.get_dtype()}; a Gemma 3n weight is "
                                          "floating point (F32, BF16 or F16): refusing to cast it")
                if tuple(piece.get_shape()) != tuple(expected[key]):
                    raise CheckpointError(
                        f"{key} in {filename} has shape {list(piece.get_shape())}; the config implies {list(expected[key])}"
                    )
                state[key] = piece
            if staging is not None:
                offsets = tensor_offsets(path)
                for key in keys:
                    if key == table_key and table_device.type == "cpu":
                        host_table = read_into_own_storage(path, [key], dtype)[key]
                        state[key] = _Placeholder(host_table.shape, dtype, device)
                    else:
                        state[key] = _Staged(staging, path, offsets[key], dtype)
            elif table_device.type == "cpu":
                # Read every tensor straight into storage of its own (see `read_into_own_storage`).
                state.update(read_into_own_storage(path, keys, dtype))
        with tower_stubs():
            model, info = Gemma3nForConditionalGeneration.from_pretrained(
                None,
                config=config,
                state_dict=state,
                dtype=dtype,
                device_map=device if staging is not None else table_device,
                attn_implementation=attn_implementation,
                output_loading_info=True,
            )
    except CheckpointError:
        raise
    except Exception as error:  # safetensors raises its own types when data is truncated
        if "safetensor" in type(error).__module__.lower() or "safetensor" in str(error).lower():
            raise CheckpointError(f"{directory}: a safetensors shard is corrupt or truncated: {error}") from None
        raise
    finally:
        state.clear()
        for handle in handles:
            handle.__exit__(None, None, None)
    leftover = [k for k in info.get("missing_keys", []) if k != "lm_head.weight"]
    if leftover:  # the pre-check above should make this unreachable
        raise CheckpointError(f"transformers left tensors uninitialised: {leftover[:20]}")

    for kind, files in tower_files.items():
        stub = getattr(model.model, f"{kind}_tower")
        if isinstance(stub, TowerStub):
            stub.checkpoint_dir = directory
            stub.tensor_files = files
    table = arch.per_layer_table(model)
    if host_table is not None:
        _swap_in(table, host_table)
    if table_device != device or ple_device is not None:
        host_resident(table, device)
    model.eval()
    return model, report


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_PIECE_BYTES = 32 * 1024**2
_READ_THREADS = 4


def tensor_offsets(path: Path) -> dict[str, tuple[str, list[int], int]]:
    """Key -> (safetensors dtype, shape, first byte) in the file, from its header (no data read)."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    base = 8 + length
    return {key: (entry["dtype"], entry["shape"], base + entry["data_offsets"][0])
            for key, entry in header.items() if key != "__metadata__"}


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
        item = _TORCH_DTYPES[stored].itemsize
        per_piece = _PIECE_BYTES // item
        for first in range(0, result[key].numel(), per_piece):
            pieces.append((key, first, min(per_piece, result[key].numel() - first), start + first * item))
    local = threading.local()
    fd = os.open(path, os.O_RDONLY)

    def read(piece: tuple[str, int, int, int]) -> None:
        key, first, count, offset = piece
        source_dtype = _TORCH_DTYPES[offsets[key][0]]
        flat = result[key].view(-1)[first:first + count]
        if source_dtype == dtype:
            read_exactly(fd, offset, flat.view(torch.uint8).numpy(), path)
            return
        staging = getattr(local, "staging", None)
        if staging is None:
            staging = local.staging = torch.empty(_PIECE_BYTES, dtype=torch.uint8)
        chunk = staging[: count * source_dtype.itemsize]
        read_exactly(fd, offset, chunk.numpy(), path)
        flat.copy_(chunk.view(source_dtype))

    try:
        with ThreadPoolExecutor(_READ_THREADS) as pool:
            list(pool.map(read, pieces))
    finally:
        os.close(fd)
    return result


class Staging:
    """The bounded host buffers every tensor crosses on its way from the file to an accelerator.

    ``slots`` buffers of ``slot_bytes`` (pinned on CUDA, so a piece of the stored dtype crosses as one
    DMA) are shared by transformers' loading threads (four), so at most ``slots * slot_bytes`` of weights
    are on the host at once, whatever the model's size. Each tensor is allocated on the device and filled
    piece by piece; a piece stored in another dtype is converted by the copy (through a temporary of one
    piece). `allocate` and `upload` are the only places device memory is touched: a stand-in overrides
    them to record what goes where.
    """

    def __init__(self, device: str | torch.device, slots: int = 4, slot_bytes: int = 32 * 1024**2) -> None:
        import queue

        if slots < 1 or slot_bytes < 8:
            raise ValueError(f"Staging needs at least one buffer of at least 8 bytes; got {slots} of {slot_bytes}")
        self.device = torch.device(device)
        self.slot_bytes = slot_bytes
        self._free: Any = queue.SimpleQueue()
        for _ in range(slots):
            self._free.put(torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda"))

    def allocate(self, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def upload(self, into: torch.Tensor, piece: torch.Tensor) -> None:
        into.copy_(piece)   # blocking: the buffer is free again when this returns

    def read(self, path: Path, entry: tuple[str, list[int], int], dtype: torch.dtype) -> torch.Tensor:
        stored, shape, offset = entry
        source = _TORCH_DTYPES[stored]
        out = self.allocate(shape, dtype)
        flat, per_piece = out.view(-1), self.slot_bytes // source.itemsize
        # A descriptor per read: after a failed build transformers does not wait for its workers.
        fd = os.open(path, os.O_RDONLY)
        buffer = self._free.get()
        try:
            for first in range(0, flat.numel(), per_piece):
                count = min(per_piece, flat.numel() - first)
                piece = buffer[: count * source.itemsize]
                read_exactly(fd, offset + first * source.itemsize, piece.numpy(), path)
                self.upload(flat[first:first + count], piece.view(source))
        finally:
            self._free.put(buffer)
            os.close(fd)
        return out


class _Staged:
    """A checkpoint tensor as transformers' loader takes it (``value[...]`` materialises it), read
    through a `Staging` straight onto its device, so the loader's own ``.to(device)`` has nothing to do."""

    def __init__(self, staging: Staging, path: Path, entry: tuple[str, list[int], int], dtype: torch.dtype) -> None:
        self._read = (staging, path, entry, dtype)

    def __getitem__(self, index: Any) -> torch.Tensor:
        staging, path, entry, dtype = self._read
        return staging.read(path, entry, dtype)


class _Placeholder:
    """The per-layer table's stand-in while transformers builds the model on the accelerator: one
    element, broadcast to the table's shape, so the table never occupies device memory; `_swap_in`
    then puts the host table in its place."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
        self._made = (shape, dtype, device)

    def __getitem__(self, index: Any) -> torch.Tensor:
        shape, dtype, device = self._made
        return torch.zeros(1, dtype=dtype, device=device).expand(shape)


def _swap_in(table: torch.nn.Module, host_table: torch.Tensor) -> None:
    """The host table as the table's parameter, carrying what transformers marked on the loaded one; its
    buffer (``embed_scale``, which transformers put on the device) joins it, as the host lookup needs."""
    placeholder = table.weight
    weight = torch.nn.Parameter(host_table, requires_grad=placeholder.requires_grad)
    weight.__dict__.update(placeholder.__dict__)
    table.weight = weight
    for name, buffer in table.named_buffers(recurse=False):
        if not buffer.is_meta:   # a meta stand-in's buffers have no value to move
            setattr(table, name, buffer.to(host_table.device))


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


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


SUPPORTED_DEVICES = ("cpu", "cuda")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return _default_device()
    resolved = parse_device(device, "device")
    if resolved.type not in SUPPORTED_DEVICES:
        raise ValueError(f"device={device!r} is not supported: g3n_probe loads onto {', '.join(SUPPORTED_DEVICES)}")
    return resolved


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if resolved not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise ValueError(f"dtype={dtype!r} is not supported: choose one of {names}")
    return resolved


def load(
    source: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    ple_device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
    altup_clip: str = "stock",
    tokenizer: Any = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    download: bool = True,
) -> Gemma3nProbe:
    """Load a Gemma 3n checkpoint text-only and return it as a `g3n_probe.Gemma3nProbe`.

    Args:
        source: a local checkpoint directory, or a hub id (``"google/gemma-3n-E2B"``); ``None`` loads the
            bundled default (a small trained Gemma 3n shipped in the package). A hub id is served from a full
            snapshot in the Hugging Face cache, else from g3n_probe's text-only cache, else fetched into it:
            only the bytes the text path reads (see `g3n_probe.hub`).
        device: ``None`` picks cuda when available, else cpu.
        dtype: ``None`` picks bfloat16 on cuda, float32 on cpu.
        ple_device: where the per-layer-embedding table lives. ``None``: the host ("cpu") when the
            model is on an accelerator (only the looked-up rows travel; see `g3n_probe.ple`),
            otherwise the model's device.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"`` (needed for ``attn_pattern``).
        altup_clip: ``"stock"`` (default) leaves AltUp coefficients as stored, as transformers does in
            eval mode; ``"reference"`` clips them once to ±``altup_coef_clip``, which is what Google's
            reference implementation's per-forward clip amounts to (see `g3n_probe.audit`).
        tokenizer: a tokenizer object, or a path to load one from; ``None`` loads the checkpoint's own
            if it has tokenizer files. Without any, token-id tensors work and text input says so.
        revision: a branch, tag or commit of a hub id (default ``main``).
        cache_dir: where fetched text-only checkpoints live (default ``$G3N_PROBE_CACHE/hub``, that is
            ``~/.cache/g3n_probe/hub``).
        token: a hub token; ``None`` uses ``HF_TOKEN`` or the stored login (Gemma is gated: accept its
            license on the hub first).
        local_files_only, download: ``local_files_only=True`` or ``download=False`` (or ``HF_HUB_OFFLINE=1``)
            use only what is cached and never touch the network.
    """
    from .probe import Gemma3nProbe

    if altup_clip not in ("stock", "reference"):
        raise ValueError(f"altup_clip={altup_clip!r}: choose 'stock' or 'reference'")
    tokenizer = _resolve_tokenizer(tokenizer)
    _resolve_dtype(dtype, _resolve_device(device))  # bad arguments are named before anything is fetched
    directory = resolve_source(source, revision=revision, cache_dir=cache_dir, token=token,
                               local_files_only=local_files_only, download=download)
    if tokenizer is None and _has_tokenizer_files(directory):
        # Before the weights: building Gemma's 262k-entry tokenizer briefly takes ~0.15 GiB, which on top
        # of the loaded weights set the load's peak.
        read_config(directory)   # a checkpoint that is not Gemma 3n is named as such, whatever its tokenizer
        tokenizer = _resolve_tokenizer(directory)
    module, report = load_text_model(directory, device=device, dtype=dtype, attn_implementation=attn_implementation,
                                     ple_device=ple_device)
    if altup_clip == "reference":
        from .audit import clip_coefficients

        report.clipped_coefficients = clip_coefficients(module)
    return Gemma3nProbe(module, tokenizer=tokenizer, load_report=report)


def _has_tokenizer_files(directory: Path) -> bool:
    return (directory / "tokenizer.json").exists() or (directory / "tokenizer.model").exists()


def _resolve_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as given; a path loaded with ``AutoTokenizer``; None stays None."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    path = Path(tokenizer).expanduser()
    if not path.is_dir() or not _has_tokenizer_files(path):
        raise CheckpointError(f"tokenizer={str(tokenizer)!r}: no tokenizer files (tokenizer.json or tokenizer.model) there")
    definition = path / "tokenizer.json"
    if definition.exists():
        try:
            parsed = json.loads(definition.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{definition} is not valid JSON: {error}") from None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("model"), dict):
            raise CheckpointError(f"{definition} is not a tokenizer definition (it has no 'model' section)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - tokenizers raise many types for a broken file
        raise CheckpointError(f"the tokenizer in {path} cannot be read: {type(error).__name__}: {error}") from None


def component_of(key: str) -> str:
    """The component a checkpoint key (or parameter/buffer name) belongs to."""
    if key.startswith("model.vision_tower."):
        return "vision tower"
    if key.startswith("model.audio_tower."):
        return "audio tower"
    if key.startswith(f"model.language_model.{arch.PER_LAYER_TABLE}."):
        return "per-layer table"
    if key.startswith("model.language_model.embed_tokens."):
        return "embed_tokens"
    if key.startswith(("model.embed_vision.", "model.embed_audio.")):
        return "multimodal embedders"
    return "text decoder"


COMPONENTS = ("text decoder", "embed_tokens", "per-layer table", "multimodal embedders", "vision tower", "audio tower")


def footprint(config: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
              ple_device: str | torch.device | None = None) -> dict[str, dict[str, Any]]:
    """Where `load` puts every component and its bytes, computed on the meta device (no GPU, no weights).

    Returns component -> ``{"params", "bytes", "where"}`` with ``where`` "accelerator" or "host". Buffers
    count with their module's component; the towers are stubs and hold nothing.
    """
    from transformers import Gemma3nForConditionalGeneration

    from .ple import resolve_ple_device

    device = torch.device(device)
    table_device = resolve_ple_device(ple_device, device)
    with tower_stubs(), torch.device("meta"):
        skeleton = Gemma3nForConditionalGeneration(config)
    result = {c: {"params": 0, "bytes": 0, "where": "host"} for c in COMPONENTS}
    tensors = [(name, t, True) for name, t in skeleton.named_parameters()] + \
        [(name, t, False) for name, t in skeleton.named_buffers()]
    for name, tensor, is_parameter in tensors:
        if name == "lm_head.weight":
            continue  # tied to embed_tokens
        component = component_of(name)
        entry = result[component]
        on = table_device if component == "per-layer table" else device
        entry["where"] = "host" if on.type == "cpu" else "accelerator"
        size = dtype.itemsize if tensor.is_floating_point() else tensor.element_size()
        if is_parameter:
            entry["params"] += tensor.numel()
        entry["bytes"] += tensor.numel() * size
    return result
