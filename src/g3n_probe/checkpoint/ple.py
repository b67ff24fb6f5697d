"""A host-resident per-layer-embedding (PLE) table.

The PLE table is [262144, L·256]: 3.75 GiB of E2B's weights in bfloat16, 4.375 GiB of E4B's, and
each forward reads only B·T of its rows. Gemma 3n was designed to keep it off the accelerator.
Accelerate's ``device_map={"...embed_tokens_per_layer": "cpu"}`` does not do that: it copies the
whole table to the GPU on every forward (measured 114.6 ms vs 26.8 ms per forward on an H100).

`host_resident` keeps the stock ``Gemma3nTextScaledWordEmbedding`` module (so ``state_dict`` keys
and the ``ple_tokens`` point are unchanged) with its weight in host memory, and puts two torch
hooks on it: the token ids go to the host, the *stock* lookup runs there (gather rows × √P), and
only the [B,T,L·P] result travels to the compute device. The
values are the stock values bit for bit (a gather and one elementwise multiply).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .._compat import hook_functions
from .._util import parse_device
from . import module_tree


def resolve_ple_device(ple_device: str | torch.device | None, device: torch.device) -> torch.device:
    """``None`` means the host when the model is on an accelerator, else the model's device."""
    if ple_device is None:
        return torch.device("cpu") if device.type not in ("cpu", "meta") else device
    resolved = parse_device(ple_device, "ple_device")
    if resolved.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"ple_device={ple_device!r}: the per-layer table lives on the host (cpu) or the model's device")
    if resolved.type == "cuda" and device.type == "cuda" and resolved != device and resolved.index is not None:
        raise ValueError(f"ple_device={ple_device!r} is another accelerator than the model's ({device})")
    return resolved


def host_resident(table: nn.Module, compute_device: torch.device) -> list:
    """Serve ``table`` (the stock per-layer embedding module, weight on the host) to ``compute_device``.

    Two torch hooks and no replaced ``forward``: a pre-hook sends the ids to the table's device, a
    forward hook sends the gathered rows to ``compute_device``. Returns the two hook handles.
    """
    return [table.register_forward_pre_hook(_ids_to_table),
            table.register_forward_hook(functools.partial(_rows_to_device, torch.device(compute_device)))]


def is_host_resident(table: nn.Module) -> bool:
    """Whether ``table`` is served by `host_resident`'s hooks."""
    return any(isinstance(hook, functools.partial) and hook.func is _rows_to_device
               for hook in hook_functions(table))


def _ids_to_table(table: nn.Module, args: tuple) -> tuple:
    return (args[0].to(table.weight.device), *args[1:])


def _rows_to_device(device: torch.device, module: nn.Module, args: tuple, rows: torch.Tensor) -> torch.Tensor:
    return rows.to(device, non_blocking=device.type == "cuda")


def move_except_table(model: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer of ``model`` to ``device`` except the per-layer table's."""
    language_model = module_tree.text_model(model)
    table = module_tree.per_layer_table(model)
    placeholder: Any = nn.Module()
    setattr(language_model, module_tree.PER_LAYER_TABLE, placeholder)
    try:
        model.to(device)
    finally:
        setattr(language_model, module_tree.PER_LAYER_TABLE, table)
