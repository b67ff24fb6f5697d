"""Stream stacks ([S,B,T,D]) carry their batch on dimension 1, and writes are checked before torch sees them.

nnsight narrows and widens every served tensor on dimension 0. For an AltUp stack that is the stream
axis: with two invokes a stack would come back unscoped, and with four (B == S) each invoke would
silently get one *stream* of everyone's rows. So every stack handed to nnsight is marked here
(`mark_stack`), and `StreamBatcher` narrows and widens marked tensors on their real batch axis.
"""

from __future__ import annotations

from typing import Any

import torch

from .._compat import AxisBatcher

STACK_BATCH_DIM = "_g3n_batch_dim"


class PointWriteError(ValueError):
    """A write to a point (or to a layer's stream stack) had the wrong type, shape, dtype or device."""


def checked_stream(stream: Any, stack: bool, where: str, streams: int | None = None) -> int | None:
    """``stream`` (None, or a stream index of the stack named by ``where``), refused where it cannot apply: a
    value that is not a stream stack, an index that is not a non-negative int, or (given the stack's
    ``streams``) one past the last stream."""
    if stream is None:
        return None
    if not stack:
        raise ValueError(f"{where} is not a stream stack: stream= applies to [S,B,T,D] values only")
    if isinstance(stream, bool) or not isinstance(stream, int) or stream < 0:
        raise ValueError(f"stream must be a stream index (0 is the active stream); got {stream!r}")
    if streams is not None and stream >= streams:
        raise ValueError(f"stream {stream} out of range: {where} has {streams} streams (0..{streams - 1})")
    return stream


def mark_stack(tensor: Any) -> Any:
    """Mark an [S,B,T,D] stream stack: its batch is dimension 1."""
    if isinstance(tensor, torch.Tensor):
        setattr(tensor, STACK_BATCH_DIM, 1)
    return tensor


def batch_dim(tensor: torch.Tensor) -> int:
    return getattr(tensor, STACK_BATCH_DIM, 0)


def check_write(where: str, written: Any, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
    """Raise `PointWriteError` naming ``where`` unless ``written`` has the expected shape, dtype, device."""
    if not isinstance(written, torch.Tensor):
        raise PointWriteError(f"{where}: wrote a {type(written).__name__}; expected a tensor of shape {tuple(shape)}")
    if written.shape != shape:
        raise PointWriteError(f"{where}: wrote shape {tuple(written.shape)}; expected {tuple(shape)}")
    if written.dtype != dtype:
        raise PointWriteError(f"{where}: wrote dtype {written.dtype}; expected {dtype} (use .to({dtype}))")
    if written.device != device:
        raise PointWriteError(f"{where}: wrote a tensor on {written.device}; expected {device}")


class StreamBatcher(AxisBatcher):
    """nnsight's batcher, narrowing and widening marked stream stacks on dimension 1 (see the module doc)."""

    def batch_dim(self, tensor: torch.Tensor) -> int:
        return batch_dim(tensor)

    def remark(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return mark_stack(tensor) if dim == 1 else tensor

    def check_rows(self, full: torch.Tensor, dim: int, size: int, edited: Any) -> None:
        expected = list(full.shape)
        expected[dim] = size
        if not isinstance(edited, torch.Tensor) or list(edited.shape) != expected:
            got = tuple(edited.shape) if isinstance(edited, torch.Tensor) else type(edited).__name__
            raise PointWriteError(f"an invoke wrote {got} where its rows have shape {tuple(expected)}")
