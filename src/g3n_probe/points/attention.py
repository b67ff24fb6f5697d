"""Attention probabilities as a point, per model, with no config value and no process-wide state changed.

transformers' eager attention forms the probabilities P = softmax(QKᵀ·scale + mask) inside a function
(``eager_attention_forward``) and returns ``matmul(P, V)``; no module boundary surrounds P. So while a
watched layer's attention module runs, its own forward pre-hook enters a torch function mode and its
forward hook (``always_call=True``: an exception cannot leave it behind) leaves it. The mode is
thread-local and scoped to that one call. It follows the softmax result through the dtype cast and
dropout, and at the ``matmul(P, V)`` it passes P through the layer's ``attn_pattern`` point and
multiplies what comes back — the stock call on the stock tensors when nothing was written, so reads
are bit-exact, and a write changes the attention output as the stock code would compute it.

The config keeps exactly the implementation the user chose: under sdpa the point says it needs eager
attention, and a model switched to eager later routes it from then on. When nobody watches the
point, the pre-hook returns at once and no mode is entered.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._compat import attention_implementation
from .hookpoint import HookPoint, serve
from .routes import Route
from .undo import DeleteAttribute, set_plain

_MODE_ATTR = "_g3n_pattern_mode"


@dataclass(frozen=True)
class AttentionWeights(Route):
    """Eager attention probabilities of ``path`` (the layer's attention module), ``[B,H,T,T]``."""

    path: str
    needs = "eager"

    def unavailable(self, config: Any, name: str, layer: int | None = None) -> str | None:
        implementation = attention_implementation(config)
        if implementation == "eager":
            return None
        return (f"{name} needs the attention probabilities, which attn_implementation={implementation!r} never "
                "forms: load with g3n.load(..., attn_implementation='eager') (or inject into a model that uses "
                "eager attention, or switch this one with model.set_attn_implementation('eager'))")

    def attach(self, scope: nn.Module, point: HookPoint, injection: Any) -> list:
        attention = scope.get_submodule(self.path)
        set_plain(point, _MODE_ATTR, None)
        return [attention.register_forward_pre_hook(functools.partial(_enter_attention, point)),
                attention.register_forward_hook(functools.partial(_leave_attention, point), always_call=True),
                DeleteAttribute(point, _MODE_ATTR)]


def _enter_attention(point: HookPoint, attention: nn.Module, args: tuple) -> None:
    # cheapest first: under sdpa (no probabilities formed) nothing else is looked at
    if attention_implementation(point.text_config) != "eager" or point.__dict__.get(_MODE_ATTR) is not None \
            or not point.observed():
        return
    mode = _PatternMode(point)
    mode.__enter__()
    point.__dict__[_MODE_ATTR] = mode


def _leave_attention(point: HookPoint, attention: nn.Module, args: tuple, output: Any) -> None:
    mode = point.__dict__.get(_MODE_ATTR)
    if mode is not None:
        point.__dict__[_MODE_ATTR] = None
        mode.__exit__(None, None, None)


class _PatternMode(TorchFunctionMode):
    """Follows softmax results through ``.to`` and dropout; serves the one that meets ``matmul(P, V)``."""

    _FOLLOW = (torch.Tensor.to, torch.nn.functional.dropout)

    def __init__(self, point: HookPoint) -> None:
        super().__init__()
        self.point = point
        self.candidates: list[torch.Tensor] = []   # kept alive, so identity comparisons stay valid

    def _is_candidate(self, value: Any) -> bool:
        return any(value is c for c in self.candidates)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        first = args[0] if args else None
        if func is torch.matmul and self._is_candidate(first):
            self.candidates.clear()
            written = serve(self.point, first)
            return func(written, *args[1:], **kwargs)
        result = func(*args, **kwargs)
        if func is torch.nn.functional.softmax or (func in self._FOLLOW and self._is_candidate(first)):
            self.candidates.append(result)
        return result
