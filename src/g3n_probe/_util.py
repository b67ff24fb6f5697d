"""Small helpers shared by the loader, the per-layer table, the caches, the hub fetch, the checkpoint writers
and the distributed readers and writers."""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist


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


def rank_world(from_environment: bool = True) -> tuple[int, int]:
    """(rank, world size) of this process: the initialised process group's, else (``from_environment``) what
    ``torchrun`` put in ``RANK`` and ``WORLD_SIZE``, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if from_environment:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return 0, 1


def renamed_keyword(old: str, new: str) -> Callable[[Callable], Callable]:
    """Decorator: ``old=`` still works for one release as ``new=``, with a DeprecationWarning (one word, one
    meaning across the API: the argument that names a point is ``point``)."""

    def rename(function: Callable) -> Callable:
        @functools.wraps(function)
        def renamed(*args: Any, **kwargs: Any) -> Any:
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(f"{function.__name__}() got both {old}= and {new}= (they are one argument)")
                warnings.warn(f"{function.__name__}({old}=...) is now {function.__name__}({new}=...); "
                              f"{old}= goes in a later release", DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return renamed

    return rename
