"""`HookPoint`: the identity module a value is passed *through* (TransformerLens' idea).

nnsight serves a HookPoint's value at ``.output``, and whatever comes back — the same tensor, edited in
place, or a new one — is what the stock forward goes on with. A new tensor is checked against the
original's shape, dtype and device first, so a bad write is an error naming the point, never a
failure deep inside torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._compat import has_hooks, is_traced
from .stacks import check_write, mark_stack


class HookPoint(nn.Module):
    """An identity module that makes a value a named, hookable, writable place.

    Attributes:
        point: its row of the table.
        layer: the decoder layer it belongs to (None for model-level points).
        text_config: the model's text config (read for view shapes and availability).
        pending: a layer argument kept until the layer's body starts (`routes.LayerArgument`).
        served: the injection's record of what a trace was served (for ``.grad`` errors).
        attached: False once `Injection.remove` took it off the model.
    """

    def __init__(self, point: Any, layer: int | None, config: Any) -> None:
        super().__init__()
        self.point = point
        self.layer = layer
        self.text_config = config
        self.pending: torch.Tensor | None = None
        self.served: dict | None = None
        self.attached = True

    @property
    def qualified_name(self) -> str:
        return self.point.name if self.layer is None else f"layers.{self.layer}.{self.point.name}"

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        result = super().__call__(value)
        if result is not value:
            check_write(f"point {self.qualified_name} {self.point.shape}", result, value.shape, value.dtype, value.device)
        return result

    def unavailable(self) -> str | None:
        """None when the point fires in this model now; otherwise why it does not."""
        return self.point.route.unavailable(self.text_config, self.qualified_name, self.layer)

    def reset(self) -> None:
        self.pending = None

    def observed(self) -> bool:
        """Whether anyone can see this point's value now: an active trace or a torch hook on it."""
        return has_hooks(self) or is_traced(self)

    def extra_repr(self) -> str:
        return self.point.shape


def serve(point: HookPoint, value: torch.Tensor) -> torch.Tensor:
    """Pass ``value`` through ``point``; what comes back is what the model continues with."""
    if point.point.stack:
        mark_stack(value)
    result = point(value)
    if point.served is not None and not has_hooks(point):
        point.served[id(result)] = point  # watched, and not by a torch hook: by a trace
    return mark_stack(result) if point.point.stack else result
