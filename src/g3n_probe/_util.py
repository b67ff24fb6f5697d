"""Small helpers shared by the loader, the per-layer table, the caches and the checkpoint writers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def parse_device(value: str | torch.device, name: str = "device") -> torch.device:
    """``torch.device(value)`` with errors that name the argument, and CUDA checked for presence."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{name}={value!r} is not a device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}={value!r}: CUDA is not available on this machine")
    return device


def atomic_write(target: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``target`` in one step (readable, 0644)."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_text_only(config: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A stock ``Gemma3nForConditionalGeneration`` built (initialised) on ``device`` in ``dtype``,
    with tower stubs: the starting point for in-memory models and sub-models."""
    from transformers import Gemma3nForConditionalGeneration

    from .towers import tower_stubs

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with tower_stubs(), torch.device(device):
            return Gemma3nForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
