"""Text-only loading of the stock ``Gemma3nForConditionalGeneration``.

What runs is transformers' own class. This module only decides *what it is given*, in four named
steps of `load_text_model`:

1. **plan** (`plan_keys`): the checkpoint is checked (a Gemma 3n config, safetensors only, every text
   tensor present with the shape the config implies) and the keys the text path reads are chosen:
   ``model.language_model.*``, ``model.embed_vision.*``, ``model.embed_audio.*``, minus the k/v that
   KV-shared layers carry but never read. No tower byte is read.
2. **read** (`read_state`): on the host each tensor is read from the file straight into storage of
   its own (`checkpoint.read_into_own_storage`); on an accelerator each crosses a `staging.Staging`
   and the per-layer table stays on the host.
3. **build**: transformers' ``from_pretrained`` with those tensors, with `towers.tower_stubs` active,
   so no tower parameter exists.
4. **attach**: the stubs learn where their tensors are, the host table is swapped in and served
   (`g3n_probe.checkpoint.ple`), the model goes to ``eval()``.

`load` wraps the result in the nnsight probe. `footprint` says where each component will live,
without loading anything.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import hub
from ._util import parse_device
from .checkpoint import module_tree
from .checkpoint.module_tree import clip_coefficients
from .checkpoint.ple import host_resident, resolve_ple_device
from .checkpoint.reading import (
    COMPONENTS,
    DTYPE_BYTES,
    FLOAT_STORAGE,
    INDEX,
    SINGLE,
    CheckpointError,
    by_file,
    check_layer_count,
    component_of,
    keys_read,
    open_safetensors,
    read_config,
    read_into_own_storage,
    stray_keys,
    tensor_offsets,
    tower_files,
    weight_map,
)
from .checkpoint.staging import Staged, Staging, TablePlaceholder, swap_in
from .checkpoint.synthetic import default_checkpoint
from .checkpoint.towers import TowerStub, build_text_only, expected_text_shapes, tower_stubs
from .probe.gemma3n_probe import Gemma3nProbe

SUPPORTED_DEVICES = ("cpu", "cuda")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BUNDLED = Path(__file__).parent / "data" / "default"
_TABLE_KEY = f"{module_tree.TEXT_MODEL_PATHS['Gemma3nForConditionalGeneration']}.{module_tree.PER_LAYER_TABLE}.weight"


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


# ---- where the checkpoint is, and on what it loads -------------------------------------------------

def resolve_source(source: str | os.PathLike | None, **hub_options: Any) -> Path:
    """A local checkpoint directory for ``source``: a path, or a hub id (cached, or fetched text-only by
    `g3n_probe.hub.locate`, which takes ``hub_options``: revision, cache_dir, token, local_files_only,
    download, config_only)."""
    if source is None:
        return default_source()
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; a Gemma 3n checkpoint is a directory with config.json")
        return path
    if not hub.looks_like_hub_id(str(source)):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    return hub.locate(str(source), **hub_options)


def default_source() -> Path:
    """The bundled default: the trained tiny Gemma 3n shipped in the package (see its model card,
    ``data/default/README.md``), or, if a build lacks it, the tiny synthetic checkpoint made on
    first use into a cache directory."""
    if (BUNDLED / "model.safetensors").exists():
        return BUNDLED
    return default_checkpoint()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``: cuda when available, else cpu; anything else checked and named when unsupported."""
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    resolved = parse_device(device, "device")
    if resolved.type not in SUPPORTED_DEVICES:
        raise ValueError(f"device={device!r} is not supported: g3n_probe loads onto {', '.join(SUPPORTED_DEVICES)}")
    return resolved


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """``None``: bfloat16 on cuda, float32 elsewhere; a name (``"bfloat16"``) or a torch dtype otherwise."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if resolved not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise ValueError(f"dtype={dtype!r} is not supported: choose one of {names}")
    return resolved


# ---- the four steps --------------------------------------------------------------------------------

@dataclass
class KeyPlan:
    """What a text-only load reads from a checkpoint, decided before any tensor byte is read."""

    directory: Path
    text_keys: dict[str, str]            # key -> shard file, for every tensor the text path reads
    expected: dict[str, torch.Size]      # key -> the shape the config implies
    towers: dict[str, dict[str, str]]    # tower kind -> {key: shard file}


def plan_keys(directory: Path, config: Any, report: LoadReport) -> KeyPlan:
    """Step 1: the keys to read; every missing, stray or unexpected tensor named before anything is built."""
    mapping = weight_map(directory)
    check_layer_count(directory, config, mapping)
    read, report.skipped_kv_shared = keys_read(mapping, config)
    text_keys = {key: mapping[key] for key in read}
    towers = tower_files(mapping)
    report.tower_tensors_in_checkpoint = {kind: len(v) for kind, v in towers.items()}
    expected = expected_text_shapes(config)
    missing = sorted(set(expected) - set(text_keys))
    unexpected = sorted(set(text_keys) - set(expected)) + stray_keys(mapping)
    if missing or unexpected:
        listing = INDEX if (directory / INDEX).exists() else SINGLE   # the file that lists the tensors
        raise CheckpointError(
            f"{directory}: {listing} does not match the Gemma 3n config (config.json): "
            + (f"missing {len(missing)} tensor(s): {', '.join(missing[:20])}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:20])}" if unexpected else "")
        )
    return KeyPlan(directory, text_keys, expected, towers)


def _checked_shard(plan: KeyPlan, filename: str, keys: list[str], report: LoadReport) -> dict[str, Any]:
    """The lazy slices of one shard's keys, each checked for its dtype and shape (no data read)."""
    path = plan.directory / filename
    if not path.exists():
        raise CheckpointError(f"{path} is missing; {INDEX} names it for text tensors such as {keys[0]}")
    slices = {}
    with open_safetensors(path) as handle:
        report.files_opened.append(filename)
        present = set(handle.keys())
        for key in keys:
            if key not in present:
                raise CheckpointError(f"{path} does not contain {key}, although {INDEX} says it does")
            piece = handle.get_slice(key)
            if piece.get_dtype() not in FLOAT_STORAGE:
                raise CheckpointError(f"{key} in {filename} is stored as {piece.get_dtype()}; a Gemma 3n weight is "
                                      "floating point (F32, BF16 or F16): refusing to cast it")
            if tuple(piece.get_shape()) != tuple(plan.expected[key]):
                raise CheckpointError(f"{key} in {filename} has shape {list(piece.get_shape())}; "
                                      f"the config implies {list(plan.expected[key])}")
            report.tensors_read += 1
            report.bytes_read += math.prod(piece.get_shape()) * DTYPE_BYTES[piece.get_dtype()]
            slices[key] = piece
    return slices


def read_state(plan: KeyPlan, device: torch.device, dtype: torch.dtype, table_device: torch.device,
               staging: Staging | None, report: LoadReport) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Step 2: what ``from_pretrained`` is given per key, and the host table when it stays on the host.

    On the host: tensors in storage of their own. On an accelerator: `Staged` reads through
    ``staging``, and the per-layer table read into host storage with a `TablePlaceholder` in its place.
    """
    state: dict[str, Any] = {}
    host_table = None
    for filename, keys in by_file(plan.text_keys).items():
        _checked_shard(plan, filename, keys, report)
        path = plan.directory / filename
        if staging is None:
            state.update(read_into_own_storage(path, keys, dtype))
            continue
        offsets = tensor_offsets(path)
        for key in keys:
            if key == _TABLE_KEY and table_device.type == "cpu":
                host_table = read_into_own_storage(path, [key], dtype)[key]
                state[key] = TablePlaceholder(host_table.shape, dtype, device)
            else:
                state[key] = Staged(staging, path, offsets[key], dtype)
    return state, host_table


def _build(config: Any, state: dict[str, Any], dtype: torch.dtype, device_map: torch.device,
           attn_implementation: str) -> Any:
    """Step 3: transformers' own ``from_pretrained``, given only the text tensors, towers stubbed."""
    from transformers import Gemma3nForConditionalGeneration

    with tower_stubs():
        # every key was checked against the config's shapes in `plan_keys`, so nothing is left uninitialised
        return Gemma3nForConditionalGeneration.from_pretrained(
            None, config=config, state_dict=state, dtype=dtype, device_map=device_map,
            attn_implementation=attn_implementation,
        )


def _attach(model: Any, plan: KeyPlan, host_table: torch.Tensor | None, device: torch.device,
            table_device: torch.device, serve_table: bool) -> Any:
    """Step 4: stubs learn their tensors' places; the host table is swapped in and served; eval mode."""
    for kind, files in plan.towers.items():
        stub = getattr(model.model, f"{kind}_tower")
        if isinstance(stub, TowerStub):
            stub.checkpoint_dir = plan.directory
            stub.tensor_files = files
    table = module_tree.per_layer_table(model)
    if host_table is not None:
        swap_in(table, host_table)
    if serve_table:
        host_resident(table, device)
    return model.eval()


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

    On the host, every tensor is read into storage of its own. On an accelerator, every tensor crosses
    from the file to the device through the bounded buffers of a `Staging`, and the per-layer table (by
    default, ``ple_device`` None) is read into host storage and never copied to the device (see
    `g3n_probe.checkpoint.ple`). ``staging`` injects the crossing (its ``device`` is the model's), so tests and
    benchmarks can stand in for an accelerator and record what is copied where.
    """
    directory = resolve_source(source)
    config = read_config(directory)
    device = staging.device if staging is not None else resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    table_device = resolve_ple_device(ple_device, device)
    report = LoadReport(source=directory)
    plan = plan_keys(directory, config, report)
    if staging is None and device.type != "cpu":
        staging = Staging(device)
    state, host_table = read_state(plan, device, dtype, table_device, staging, report)
    try:
        model = _build(config, state, dtype, device if staging is not None else table_device, attn_implementation)
    except CheckpointError:
        raise
    except Exception as error:  # safetensors raises its own types when data is truncated
        if "safetensor" in type(error).__module__.lower() or "safetensor" in str(error).lower():
            raise CheckpointError(f"{directory}: a safetensors shard is corrupt or truncated: {error}") from None
        raise
    finally:
        state.clear()
    serve_table = table_device != device or ple_device is not None
    return _attach(model, plan, host_table, device, table_device, serve_table), report


# ---- the entry point -------------------------------------------------------------------------------

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
        source: a local checkpoint directory, or a hub id (``"google/gemma-3n-E2B"``; served from a full
            snapshot in the Hugging Face cache, else g3n_probe's text-only cache, else fetched text-only,
            see `g3n_probe.hub`); ``None`` loads the bundled default (a small trained Gemma 3n).
        device: ``None`` picks cuda when available, else cpu. dtype: ``None`` picks bfloat16 on cuda, float32 on cpu.
        ple_device: where the per-layer-embedding table lives; ``None``: the host when the model is on an
            accelerator (only the looked-up rows travel; see `g3n_probe.checkpoint.ple`), otherwise the model's device.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"`` (needed for ``attn_pattern``).
        altup_clip: ``"stock"`` leaves AltUp coefficients as stored (transformers in eval mode);
            ``"reference"`` clips them once to ±``altup_coef_clip``, as Google's reference does per forward.
        tokenizer: a tokenizer object or a path; ``None`` loads the checkpoint's own if it has one.
            Without any, token-id tensors work and text input says so.
        revision, cache_dir, token: a hub id's branch/tag/commit, where fetched checkpoints live (default
            ``$G3N_PROBE_CACHE/hub``), and a hub token (``None``: ``HF_TOKEN`` or the stored login).
        local_files_only, download: ``local_files_only=True`` or ``download=False`` (or ``HF_HUB_OFFLINE=1``)
            use only what is cached and never touch the network.
    """
    if altup_clip not in ("stock", "reference"):
        raise ValueError(f"altup_clip={altup_clip!r}: choose 'stock' or 'reference'")
    tokenizer = _resolve_tokenizer(tokenizer)
    resolve_dtype(dtype, resolve_device(device))  # bad arguments are named before anything is fetched
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
    except Exception as error:  # tokenizers raise many types for a broken file
        raise CheckpointError(f"the tokenizer in {path} cannot be read: {type(error).__name__}: {error}") from None


def footprint(config: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
              ple_device: str | torch.device | None = None) -> dict[str, dict[str, Any]]:
    """Where `load` puts every component and its bytes, computed on the meta device (no GPU, no weights).

    Returns component -> ``{"params", "bytes", "where"}`` with ``where`` "accelerator" or "host". Buffers
    count with their module's component; the towers are stubs and hold nothing.
    """
    device = torch.device(device)
    table_device = resolve_ple_device(ple_device, device)
    skeleton = build_text_only(config, "meta")
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
