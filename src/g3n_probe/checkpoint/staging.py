"""Weights from the file to an accelerator through bounded host buffers, and the per-layer table kept on the host.

A `Staging` owns a few fixed buffers (pinned on CUDA) that every tensor crosses on its way from the
file to the device, so the host never holds more than those buffers plus the per-layer table, whatever
the model's size. `Staged` is a checkpoint tensor as transformers' loader takes it (``value[...]``
materialises it) read through a `Staging`; `TablePlaceholder` holds the table's place on the device
while the model is built (one element, broadcast), and `swap_in` then puts the host table there.
"""

from __future__ import annotations

import os
import queue
from pathlib import Path
from typing import Any

import torch

from .reading import TORCH_DTYPES, read_exactly


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
        source = TORCH_DTYPES[stored]
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


class Staged:
    """A checkpoint tensor as transformers' loader takes it (``value[...]`` materialises it), read
    through a `Staging` straight onto its device, so the loader's own ``.to(device)`` has nothing to do."""

    def __init__(self, staging: Staging, path: Path, entry: tuple[str, list[int], int], dtype: torch.dtype) -> None:
        self._read = (staging, path, entry, dtype)

    def __getitem__(self, index: Any) -> torch.Tensor:
        staging, path, entry, dtype = self._read
        return staging.read(path, entry, dtype)


class TablePlaceholder:
    """The per-layer table's stand-in while transformers builds the model on the accelerator: one
    element, broadcast to the table's shape, so the table never occupies device memory; `swap_in`
    then puts the host table in its place."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
        self._made = (shape, dtype, device)

    def __getitem__(self, index: Any) -> torch.Tensor:
        shape, dtype, device = self._made
        return torch.zeros(1, dtype=dtype, device=device).expand(shape)


def swap_in(table: torch.nn.Module, host_table: torch.Tensor) -> None:
    """The host table as the table's parameter, carrying what transformers marked on the loaded one; its
    buffer (``embed_scale``, which transformers put on the device) joins it, as the host lookup needs."""
    placeholder = table.weight
    weight = torch.nn.Parameter(host_table, requires_grad=placeholder.requires_grad)
    weight.__dict__.update(placeholder.__dict__)
    table.weight = weight
    for name, buffer in table.named_buffers(recurse=False):
        if not buffer.is_meta:   # a meta stand-in's buffers have no value to move
            setattr(table, name, buffer.to(host_table.device))
