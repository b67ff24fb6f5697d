"""The intervention points: one table, one identity module, one owned injection.

Every Gemma-3n-specific value a researcher wants to read or edit has a name and a place in the
module tree. The place is a `HookPoint` (TransformerLens' idea): an identity module the value is
passed *through*, so nnsight serves it at ``.output`` and whatever comes back — the same tensor,
edited in place, or a new one — is what the stock forward goes on with.

Nothing of the stock forward is copied or replaced. Each row of `POINTS` carries a *route*: a
small picklable object that knows where the value appears in the stock forward and attaches the
point there, returning what detaches it again:

* `OutputOf`       a torch forward hook on a stock module routes that module's output;
* `InputOf`        a torch forward pre-hook routes a module's first argument; ``in_place`` copies a
                   write into the original tensor, for inline values the stock forward uses twice;
* `MethodResult`   the return value of a stock *method* (``altup.predict`` is a method, invisible to
                   module hooks), through a `MethodRoute` call-through installed on the instance;
* `LayerArgument`  an argument of the decoder layer, served at the start of the layer's body;
* `ModuleItself`   the value already is a stock module's output: its own envoy is the point;
* `RootOutput`     a field of the root model's output (``logits``), by a forward hook on the root;
* `AttentionWeights` eager attention probabilities, through an attention function registered with
                   transformers' attention registry and selected on this model's text config only.

`inject` is one loop over the rows and returns an `Injection` that owns every hook, module,
method route and attribute it attached; `Injection.remove` puts the model back exactly as it was.
Hooks are module-level functions bound with ``functools.partial``, so an injected model deep-copies
(the copy's hooks serve the copy's points) and pickles like any other.

Stream stacks ([S,B,T,D]) carry their batch on dimension 1; every stack handed to nnsight is marked
with `mark_stack` so the probe's batcher narrows and widens invokes on the right axis.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import arch
from ._compat import (
    PATTERN_ATTENTION,
    attention_implementation,
    is_traced,
    register_attention,
    repeat_kv,
    set_attention_implementation,
    stock_eager_attention,
)

STACK_BATCH_DIM = "_g3n_batch_dim"
LAYER, MODEL = "layer", "model"


class PointWriteError(ValueError):
    """A write to a point (or to a layer's stream stack) had the wrong type, shape, dtype or device."""


class InjectionError(ValueError):
    """A row of the table could not be attached to the given model; the message names the row."""


# ==================================================================================================
# Routes: where a value appears in the stock forward
# ==================================================================================================


class Route:
    """What every route offers besides ``attach``: whether it applies to this kind of model."""

    def applies(self, root: nn.Module) -> str | None:
        return None  # None: it applies; otherwise why not


@dataclass(frozen=True)
class SplitLast:
    """Show the last dimension as ``(config.<count>, rest)``: per-head or per-layer views.

    The point hands out the split view and the stock forward continues with the merged result of
    what comes back, so the served tensor is on the gradient's path (``.grad`` works on it).
    """

    count: str  # a text-config attribute: num_attention_heads, num_hidden_layers

    def split(self, tensor: torch.Tensor, config: Any) -> torch.Tensor:
        return tensor.unflatten(-1, (getattr(config, self.count), -1))

    @staticmethod
    def merge(tensor: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(original.shape)


@dataclass(frozen=True)
class OutputOf(Route):
    path: str
    view: SplitLast | None = None

    def attach(self, scope: nn.Module, point: HookPoint, injection: Injection) -> list:
        module = scope.get_submodule(self.path)
        return [module.register_forward_hook(functools.partial(_route_output, point, self.view))]


@dataclass(frozen=True)
class InputOf(Route):
    """A module's first argument. ``in_place``: a write is copied into the original tensor (an inline
    value the stock forward uses again later); ``private_copy_of`` names a keyword of the scope's
    forward through which a caller may hand that tensor in (``inputs_embeds``): it is copied on entry,
    so an in-place write never changes the caller's tensor."""

    path: str
    view: SplitLast | None = None
    in_place: bool = False
    private_copy_of: str | None = None

    def __post_init__(self) -> None:
        if self.in_place and self.view is not None:
            raise ValueError("InputOf: an in-place route hands out the tensor itself, not a view of it")

    def attach(self, scope: nn.Module, point: HookPoint, injection: Injection) -> list:
        module = scope.get_submodule(self.path)
        if self.in_place:
            handles = [module.register_forward_pre_hook(functools.partial(_route_input_in_place, point))]
        else:
            handles = [module.register_forward_pre_hook(functools.partial(_route_input, point, self.view))]
        if self.private_copy_of is not None:
            copy = functools.partial(_copy_keyword, point, self.private_copy_of)
            handles.append(scope.register_forward_pre_hook(copy, with_kwargs=True))
        return handles


@dataclass(frozen=True)
class MethodResult(Route):
    """The return value of ``path`` (a method of a submodule); ``inside``: only the calls made while
    that other method of the same module runs (the AltUp router runs in both predict and correct);
    ``snapshot``: the stock forward continues with a copy, because it mutates the result in place."""

    path: str
    inside: str | None = None
    snapshot: bool = False

    def attach(self, scope: nn.Module, point: HookPoint, injection: Injection) -> list:
        owner_path, _, name = self.path.rpartition(".")
        owner = scope.get_submodule(owner_path)
        route, undo = method_route(owner, name)
        enclosing = None
        if self.inside is not None:
            enclosing, undo_enclosing = method_route(owner, self.inside)
            undo = undo + undo_enclosing
        tap = functools.partial(_route_result, point, enclosing, self.snapshot)
        route.after.append(tap)
        return [_RemoveTap(route.after, tap), *undo]


@dataclass(frozen=True)
class LayerArgument(Route):
    """An argument of the decoder layer (``per_layer_input``). A forward pre-hook keeps it; the point
    fires when ``served_by`` (the first call of the layer's body) runs, so nnsight sees it after the
    layer's ``.input``, in execution order. A write is copied into the tensor the body uses."""

    index: int
    keyword: str
    served_by: str

    def attach(self, scope: nn.Module, point: HookPoint, injection: Injection) -> list:
        owner_path, _, name = self.served_by.rpartition(".")
        route, undo = method_route(scope.get_submodule(owner_path), name)
        tap = functools.partial(_serve_pending, point)
        route.before.append(tap)
        keep = functools.partial(_keep_argument, point, self.index, self.keyword)
        return [scope.register_forward_pre_hook(keep, with_kwargs=True), _RemoveTap(route.before, tap), *undo]


@dataclass(frozen=True)
class ModuleItself(Route):
    """The value is the output of a stock module (``laurel``): its envoy already is the point."""

    path: str

    def attach(self, scope: nn.Module, point: HookPoint | None, injection: Injection) -> list:
        scope.get_submodule(self.path)  # fails, naming the row, if the module is not there
        return []


@dataclass(frozen=True)
class RootOutput(Route):
    """A field of the root model's output. A forward hook on the root leaves the stock ``forward``
    and its signature untouched; nnsight therefore serves this point after ``model.output``."""

    field: str

    def applies(self, root: nn.Module) -> str | None:
        if self.field == "logits" and not hasattr(root, "lm_head"):
            return f"{type(root).__name__} has no lm_head and returns hidden states, not {self.field}"
        return None

    def attach(self, scope: nn.Module, point: HookPoint, injection: Injection) -> list:
        return [injection.root.register_forward_hook(functools.partial(_route_field, point, self.field))]


@dataclass(frozen=True)
class AttentionWeights(Route):
    """Eager attention probabilities of ``path`` (the layer's attention module).

    On a model whose text config uses eager attention, the config is switched to
    `PATTERN_ATTENTION`, transformers' registry entry for `eager_with_pattern` (the stock eager
    function plus this point). Other models in the process, eager ones included, never call it.
    """

    path: str

    def attach(self, scope: nn.Module, point: HookPoint, injection: Injection) -> list:
        attention = scope.get_submodule(self.path)
        undo: list = []
        for config in injection.text_configs:
            # PATTERN_ATTENTION already there: a config copied from another injected model, eager at heart
            if attention_implementation(config) in ("eager", PATTERN_ATTENTION) and not any(
                    isinstance(u, _RestoreAttention) and u.config is config for u in injection.attached):
                set_attention_implementation(config, PATTERN_ATTENTION)
                undo.append(_RestoreAttention(config, "eager"))
        _set_plain(attention, _PATTERN_ATTR, point)
        return [*undo, _DeleteAttribute(attention, _PATTERN_ATTR)]


# ==================================================================================================
# The table
# ==================================================================================================


@dataclass(frozen=True)
class Point:
    """One row of the intervention-point table. Every point is writable."""

    name: str
    scope: str  # LAYER (under model.layers[i]) or MODEL
    shape: str  # symbolic: S streams, B batch, T tokens, D hidden, P per-layer width, F FFN width, ...
    produced: str  # where the value arises in the stock forward
    meaning: str
    route: Route  # relative to the decoder layer (LAYER) or the Gemma3nTextModel (MODEL)
    stack: bool = False  # [S,B,T,D]: batch on dimension 1
    needs: str | None = None  # "eager": only exists when attention probabilities are formed


_HEADS = SplitLast("num_attention_heads")
_PER_LAYER = SplitLast("num_hidden_layers")

POINTS: tuple[Point, ...] = (
    # ---- model level, before the layers -------------------------------------------------------
    Point("ple_tokens", MODEL, "[B,T,L,P]", "output of embed_tokens_per_layer",
          "per-layer token embeddings (table rows × √P)", OutputOf(arch.PER_LAYER_TABLE, view=_PER_LAYER)),
    Point("embed", MODEL, "[B,T,D]", "inputs_embeds, input of per_layer_model_projection",
          "token embedding entering the text model, vision/audio ids already swapped (stream 0 of the initial stack)",
          InputOf("per_layer_model_projection", in_place=True, private_copy_of="inputs_embeds")),
    Point("ple_inputs", MODEL, "[B,T,L,P]", "result of project_per_layer_inputs",
          "combined per-layer inputs the layers receive", MethodResult("project_per_layer_inputs")),
    Point("streams_in", MODEL, "[S,B,T,D]", "input of layers.0",
          "initial stack entering layer 0", InputOf("layers.0"), stack=True),
    # ---- per layer, under model.layers[i] ------------------------------------------------------
    Point("ple_input", LAYER, "[B,T,P]", "per_layer_input argument of the layer",
          "this layer's per-layer input P", LayerArgument(2, "per_layer_input", served_by="altup.predict")),
    Point("altup_router_predict", LAYER, "[B,T,S]", "altup.compute_router_modalities inside altup.predict",
          "AltUp router's modality coefficients for predict: tanh of the routed, normed active stream",
          MethodResult("altup.compute_router_modalities", inside="predict")),
    Point("altup_predict", LAYER, "[S,B,T,D]", "result of altup.predict (step 1)", "AltUp predict output",
          MethodResult("altup.predict"), stack=True),
    Point("laurel_branch", LAYER, "[B,T,D]", "output of laurel.post_laurel_norm",
          "the LAuReL low-rank branch alone, after its norm", OutputOf("laurel.post_laurel_norm")),
    Point("laurel", LAYER, "[B,T,D]", "output of laurel (step 3)", "stock LAuReL block output (normed + branch)",
          ModuleItself("laurel")),
    Point("attn_pattern", LAYER, "[B,H,T,T]", "eager attention softmax",
          "attention probabilities per head (sliding-window layers included); a write changes the attention output",
          AttentionWeights("self_attn"), needs="eager"),
    Point("attn_z", LAYER, "[B,T,H,Dh]", "input of self_attn.o_proj",
          "per-head attention output before o_proj", InputOf("self_attn.o_proj", view=_HEADS)),
    Point("attn_out", LAYER, "[B,T,D]", "output of post_attention_layernorm (step 4)",
          "attention output after the post-attention norm", OutputOf("post_attention_layernorm")),
    Point("resid_mid", LAYER, "[B,T,D]", "input of pre_feedforward_layernorm (step 5)",
          "(active + attn_out + laurel) / √2; a write reaches both the MLP input and the residual add",
          InputOf("pre_feedforward_layernorm", in_place=True)),
    Point("mlp_gate", LAYER, "[B,T,F]", "input of mlp.act_fn",
          "gate pre-activation after the gaussian top-k on sparse layers (the plain gate projection on dense layers)",
          InputOf("mlp.act_fn")),
    Point("mlp_act", LAYER, "[B,T,F]", "input of mlp.down_proj", "activation × up-projection",
          InputOf("mlp.down_proj")),
    Point("mlp_out", LAYER, "[B,T,D]", "output of post_feedforward_layernorm (step 6)",
          "MLP output after the post-feedforward norm", OutputOf("post_feedforward_layernorm")),
    Point("altup_router_correct", LAYER, "[B,T,S]", "altup.compute_router_modalities inside altup.correct",
          "AltUp router's modality coefficients for correct: tanh of the routed, normed layer output",
          MethodResult("altup.compute_router_modalities", inside="correct")),
    Point("altup_correct", LAYER, "[S,B,T,D]", "result of altup.correct (step 7)",
          "AltUp correct output before the in-place PLE add (a snapshot)",
          MethodResult("altup.correct", snapshot=True), stack=True),
    Point("ple_gate", LAYER, "[B,T,P]", "input of per_layer_projection (step 9)",
          "gelu(gate(first)) ⊙ P", InputOf("per_layer_projection")),
    Point("ple_out", LAYER, "[B,T,D]", "output of post_per_layer_input_norm (step 9)",
          "PLE contribution added to streams 1..S-1", OutputOf("post_per_layer_input_norm")),
    # ---- model level, after the layers ---------------------------------------------------------
    Point("streams_merged", MODEL, "[B,T,D]", "input of the text model's norm",
          "merged hidden after the unembed projections and mean, before the final norm", InputOf("norm")),
    Point("logits", MODEL, "[B,T,V]", "the root model's output.logits, after the soft cap",
          "soft-capped logits (served after model.output)", RootOutput("logits")),
)

LAYER_POINTS = tuple(p for p in POINTS if p.scope == LAYER)
MODEL_POINTS = tuple(p for p in POINTS if p.scope == MODEL)
#: Model-level points in execution order relative to the layers.
BEFORE_LAYERS = tuple(p for p in POINTS[: POINTS.index(LAYER_POINTS[0])] if p.scope == MODEL)
AFTER_LAYERS = tuple(p for p in POINTS[POINTS.index(LAYER_POINTS[-1]):] if p.scope == MODEL)


# ==================================================================================================
# The hook-point module
# ==================================================================================================


def mark_stack(tensor: Any) -> Any:
    """Mark an [S,B,T,D] stream stack: its batch is dimension 1 (see `probe.StreamBatcher`)."""
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


class HookPoint(nn.Module):
    """An identity module that makes a value a named, hookable, writable place.

    Calling it returns its input unchanged — unless an nnsight trace (or a torch forward hook on it)
    replaced the output, in which case the replacement is checked against the original's shape,
    dtype and device before the model continues with it.
    """

    def __init__(self, point: Point, layer: int | None, config: Any) -> None:
        super().__init__()
        self.point = point
        self.layer = layer
        self.text_config = config
        self.pending: torch.Tensor | None = None  # a LayerArgument kept until the layer's body starts
        self.served: dict | None = None  # the injection's record of what was served in a trace
        self.attached = True  # False once Injection.remove() took it off the model

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

    def available(self) -> str | None:
        """None when the point fires in this model; otherwise why it does not."""
        implementation = attention_implementation(self.text_config)
        if self.point.needs == "eager" and implementation != PATTERN_ATTENTION:
            if implementation == "eager":
                return (f"{self.qualified_name}: the model was switched to eager attention after the points were "
                        "injected; inject (or load) with eager attention to route the probabilities")
            return (
                f"{self.qualified_name} needs the attention probabilities, which "
                f"attn_implementation={implementation!r} never forms: load with "
                "g3n.load(..., attn_implementation='eager') (or inject into a model loaded with eager attention)"
            )
        return None

    def reset(self) -> None:
        self.pending = None

    def observed(self) -> bool:
        """Whether anyone can see this point's value now: an active trace or a torch hook on it."""
        return bool(self._forward_hooks or self._forward_pre_hooks) or is_traced(self)

    def extra_repr(self) -> str:
        return self.point.shape


# ==================================================================================================
# The hooks (module-level functions: picklable, and a deep copy binds them to the copy's points)
# ==================================================================================================


def _serve(point: HookPoint, value: torch.Tensor) -> torch.Tensor:
    """Pass ``value`` through ``point``; what comes back is what the model continues with."""
    if point.point.stack:
        mark_stack(value)
    result = point(value)
    if point.served is not None and not (point._forward_hooks or point._forward_pre_hooks):
        point.served[id(result)] = point  # watched, and not by a torch hook: by a trace
    return mark_stack(result) if point.point.stack else result


def _route_output(point: HookPoint, view: SplitLast | None, module: nn.Module, args: Any, output: Any) -> Any:
    if not point.observed():
        return None  # nobody can see or change it: skip the module call (the points' only cost)
    value = view.split(output, point.text_config) if view else output
    result = _serve(point, value)
    if view is not None:
        return view.merge(result, output)  # the served view stays on the gradient's path
    return None if result is value else result


def _route_input(point: HookPoint, view: SplitLast | None, module: nn.Module, args: tuple) -> tuple | None:
    if not point.observed():
        return None
    original = args[0]
    value = view.split(original, point.text_config) if view else original
    result = _serve(point, value)
    if view is not None:
        return (view.merge(result, original), *args[1:])
    return None if result is value else (result, *args[1:])


def _route_input_in_place(point: HookPoint, module: nn.Module, args: tuple) -> None:
    """For inline values the stock forward uses more than once (``resid_mid``, ``embed``): a write is
    copied into the original tensor, so every later use sees it."""
    if not point.observed():
        return None
    original = args[0]
    result = _serve(point, original)
    if result is not original:
        original.copy_(result)
    return None


def _route_result(point: HookPoint, enclosing: MethodRoute | None, snapshot: bool, result: Any) -> Any:
    if (enclosing is not None and not enclosing.running) or not point.observed():
        return result
    served = _serve(point, result)
    if snapshot:
        # The decoder layer adds the PLE contribution to this tensor in place; what the point
        # handed out must stay the pre-PLE value, so the body continues with a copy.
        copy = served.clone()
        return mark_stack(copy) if point.point.stack else copy
    return served


def _copy_keyword(point: HookPoint, keyword: str, scope: nn.Module, args: tuple, kwargs: dict):
    value = kwargs.get(keyword)
    if not isinstance(value, torch.Tensor) or not point.observed():
        return None
    return args, {**kwargs, keyword: value.clone()}


def _keep_argument(point: HookPoint, index: int, keyword: str, layer: nn.Module, args: tuple, kwargs: dict):
    point.pending = None
    if not point.observed():
        return None
    args = list(args)
    value = args[index] if len(args) > index else kwargs.get(keyword)
    if value is None:
        return None
    # A private copy, so a write can be copied into the tensor the body uses without touching the
    # model-level ple_inputs (of which it is a view) that a user may have saved.
    value = value.clone()
    if len(args) > index:
        args[index] = value
    else:
        kwargs[keyword] = value
    point.pending = value
    return tuple(args), kwargs


def rekeep_arguments(layer: nn.Module, value: tuple) -> tuple:
    """A trace replaced a layer's whole ``(args, kwargs)``: keep private copies of the new arguments, so
    their points serve (and a write to them reaches) what the layer's body will now use."""
    args, kwargs = value
    for point in layer._modules.values():
        if isinstance(point, HookPoint) and isinstance(point.point.route, LayerArgument):
            route = point.point.route
            kept = _keep_argument(point, route.index, route.keyword, layer, args, kwargs)
            if kept is not None:
                args, kwargs = kept
    return args, kwargs


def _serve_pending(point: HookPoint, args: tuple, kwargs: dict) -> None:
    value, point.pending = point.pending, None
    if value is not None:
        written = _serve(point, value)
        if written is not value:
            value.copy_(written)


def _route_field(point: HookPoint, name: str, module: nn.Module, args: Any, output: Any) -> None:
    value = getattr(output, name, None)
    if not isinstance(value, torch.Tensor) or not point.observed():
        return None
    written = _serve(point, value)
    if written is not value:
        setattr(output, name, written)
    return None


_PATTERN_ATTR = "_g3n_attn_pattern"


def eager_with_pattern(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention, with the probabilities passed through the layer's ``attn_pattern``.

    An untouched read returns the stock function's own result. Only when the probabilities were
    written is the output recomputed from them, as the stock function's last step does (``P @ V``).
    """
    output, weights = stock_eager_attention()(module, query, key, value, attention_mask, *args, **kwargs)
    point = module.__dict__.get(_PATTERN_ATTR)
    if point is None or not point.observed():
        return output, weights
    version = weights._version
    written = point(weights)
    if written is weights and weights._version == version:
        return output, weights
    values = repeat_kv(value, module.num_key_value_groups)
    return torch.matmul(written, values).transpose(1, 2).contiguous(), written


register_attention(PATTERN_ATTENTION, eager_with_pattern)


# ==================================================================================================
# Method routes: stock methods have no module hooks
# ==================================================================================================


class MethodRoute:
    """Stands in an instance's ``__dict__`` for one of its methods and calls the stock method through.

    ``before`` taps see the arguments, ``after`` taps may replace the result; ``running`` counts the
    calls in progress (for `MethodResult.inside`). It shows the stock method's signature, and since
    it holds its module as a plain attribute a deep copy or an unpickled copy calls the copy's method.
    """

    def __init__(self, owner: nn.Module, name: str, previous: Any) -> None:
        self.owner = owner
        self.name = name
        self.previous = previous  # an instance attribute that was there before, restored on removal
        self.before: list[Callable] = []
        self.after: list[Callable] = []
        self.users = 0
        self.running = 0
        self.__name__ = self.__qualname__ = name

    def stock(self) -> Callable:
        if self.previous is not None:
            return self.previous
        return getattr(type(self.owner), self.name).__get__(self.owner)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.stock())

    @property
    def __self__(self) -> nn.Module:  # what a bound method offers, for code that inspects one
        return self.owner

    @property
    def __func__(self) -> Callable:
        return getattr(type(self.owner), self.name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for tap in self.before:
            tap(args, kwargs)
        self.running += 1
        try:
            result = self.stock()(*args, **kwargs)
        finally:
            self.running -= 1
        for tap in self.after:
            result = tap(result)
        return result

    def reset(self) -> None:
        self.running = 0

    def __repr__(self) -> str:
        return f"<g3n_probe route of {type(self.owner).__name__}.{self.name}>"


def method_route(owner: nn.Module, name: str) -> tuple[MethodRoute, list]:
    """The `MethodRoute` for ``owner.<name>`` (installed if needed) and what releases this use of it."""
    if not callable(getattr(owner, name, None)):
        raise AttributeError(f"{type(owner).__name__} has no method {name!r}")
    route = owner.__dict__.get(name)
    if not isinstance(route, MethodRoute):
        route = MethodRoute(owner, name, owner.__dict__.get(name))
        _set_plain(owner, name, route)
    route.users += 1
    return route, [_ReleaseRoute(route)]


# ==================================================================================================
# What detaches: small picklable records, undone in reverse order by Injection.remove
# ==================================================================================================


def _set_plain(obj: Any, name: str, value: Any) -> None:
    # A plain instance attribute, never a registered submodule (that would move a point in the tree).
    object.__setattr__(obj, name, value)


@dataclass
class _RemoveTap:
    taps: list
    tap: Callable

    def remove(self) -> None:
        if self.tap in self.taps:
            self.taps.remove(self.tap)


@dataclass
class _ReleaseRoute:
    route: MethodRoute

    def remove(self) -> None:
        route = self.route
        route.users -= 1
        if route.users == 0 and route.owner.__dict__.get(route.name) is route:
            if route.previous is None:
                del route.owner.__dict__[route.name]
            else:
                _set_plain(route.owner, route.name, route.previous)


@dataclass
class _DeleteAttribute:
    obj: Any
    name: str

    def remove(self) -> None:
        self.obj.__dict__.pop(self.name, None)


@dataclass
class _RemoveModule:
    parent: nn.Module
    name: str

    def remove(self) -> None:
        self.parent._modules.pop(self.name, None)


@dataclass
class _RestoreAttention:
    config: Any
    implementation: str

    def remove(self) -> None:
        if attention_implementation(self.config) == PATTERN_ATTENTION:  # not if the user chose another since
            set_attention_implementation(self.config, self.implementation)


# ==================================================================================================
# The layers' own stream stacks
# ==================================================================================================


@dataclass
class StackGuard:
    """Marks the stream stacks entering and leaving one decoder layer (batch on dimension 1) and checks
    writes to the layer's ``.input`` / ``.output`` before torch sees them."""

    layer: int
    expected: tuple | None = None  # (shape, dtype, device) of the stack that entered, until the body starts

    def where(self, side: str) -> str:
        return f"layers.{self.layer}.{side} [S,B,T,D]"

    def reset(self) -> None:
        self.expected = None


def _enter_layer(guard: StackGuard, layer: nn.Module, args: tuple) -> None:
    # Only a trace can replace a layer's stacks, and only nnsight's batcher reads the mark: outside
    # one, tensors a user receives (output_hidden_states) stay unmarked, as stock.
    guard.expected = None
    if is_traced(layer) and args and isinstance(args[0], torch.Tensor):
        mark_stack(args[0])
        guard.expected = (args[0].shape, args[0].dtype, args[0].device)


def _check_layer_input(guard: StackGuard, args: tuple, kwargs: dict) -> None:
    expected, guard.expected = guard.expected, None
    if expected is not None and args:
        check_write(guard.where("input"), args[0], *expected)


def _leave_layer(guard: StackGuard, layer: nn.Module, args: tuple, output: Any) -> None:
    if not is_traced(layer):
        return
    if args and isinstance(args[0], torch.Tensor):
        check_write(guard.where("output"), output, args[0].shape, args[0].dtype, args[0].device)
    mark_stack(output)


def _mark_result(layer: nn.Module, result: Any) -> Any:
    return mark_stack(result) if is_traced(layer) else result


# ==================================================================================================
# Injection
# ==================================================================================================

_INJECTION_ATTR = "_g3n_injection"


@dataclass
class Injection:
    """Everything `inject` attached to one model, and the means to take it all off again.

    Attributes:
        root: the model injected into.
        text_path: where its ``Gemma3nTextModel`` sits ('' when the root is one).
        points: qualified point name (``"layers.3.altup_predict"``, ``"logits"``) -> `HookPoint`.
        absent: rows that do not apply to this kind of model -> why (``logits`` on a base model).
    """

    root: nn.Module
    text_path: str
    text_configs: list[Any] = field(default_factory=list)
    points: dict[str, HookPoint] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)
    guards: list[StackGuard] = field(default_factory=list)
    attached: list = field(default_factory=list)
    served: dict[int, HookPoint] = field(default_factory=dict)  # id(tensor) -> point, for .grad errors

    @staticmethod
    def of(model: nn.Module) -> Injection | None:
        """The injection living on ``model`` (its copies included), or None."""
        return model.__dict__.get(_INJECTION_ATTR)

    @property
    def text_model(self) -> nn.Module:
        return self.root.get_submodule(self.text_path) if self.text_path else self.root

    def unavailable(self, point: Point) -> str | None:
        """Why ``point`` never fires in this model (``attn_pattern`` under sdpa, ``logits`` on a base
        model), or None when it does."""
        qualified = point.name if point.scope == MODEL else f"layers.0.{point.name}"
        if qualified in self.absent:
            return self.absent[qualified]
        hook_point = self.points.get(qualified)
        return hook_point.available() if hook_point is not None else None

    def explain(self, error: Exception) -> Exception:
        """``error`` with the tensor ids nnsight names ``.grad`` locations by replaced by point names."""
        message = str(error)
        for match in set(re.findall(r"'(\d+)\.grad", message)):
            point = self.served.get(int(match))
            if point is not None:
                name = point.qualified_name
                message = message.replace(f"'{match}.grad", f"'{name}.grad")
                message += (f" ({name}: .grad must be read in reverse execution order, the point served last first;"
                            " see `g3n-probe points` for the order)")
        return type(error)(message) if message != str(error) else error

    def reset(self) -> None:
        """Forget per-forward state (kept arguments, pending checks, calls in progress): a forward
        that completes leaves none, one that was interrupted or skipped a layer's body may."""
        routes = {id(r.route): r.route for r in self.attached if isinstance(r, _ReleaseRoute)}
        for stateful in [*self.guards, *routes.values(), *self.points.values()]:
            stateful.reset()

    def remove(self) -> None:
        """Detach everything, in reverse order. The model is then exactly as before `inject`."""
        while self.attached:
            self.attached.pop().remove()
        for point in self.points.values():
            point.attached = False
        self.points.clear()
        self.guards.clear()
        self.root.__dict__.pop(_INJECTION_ATTR, None)

    def __repr__(self) -> str:
        return f"<Injection of {len(self.points)} points into {type(self.root).__name__}>"


def inject(model: nn.Module, points: Sequence[Point] = POINTS) -> Injection:
    """Attach every row of ``points`` to a stock Gemma 3n model and return the `Injection`.

    ``model`` is any of ``Gemma3nForConditionalGeneration``, ``Gemma3nForCausalLM``,
    ``Gemma3nModel`` or ``Gemma3nTextModel``, however it was loaded. Per-layer points become
    children of each decoder layer, model-level points children of ``model``. Attach before
    nnsight wraps the model (`g3n_probe.Gemma3nProbe` does this for you): nnsight installs its
    controller per module once, so modules added later are invisible to it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject takes a stock Gemma 3n model (an nn.Module), not {type(model).__name__}")
    if Injection.of(model) is not None:
        raise RuntimeError("intervention points are already injected into this model (Injection.of(model))")
    injection = Injection(root=model, text_path=arch.text_model_path(model))
    text = injection.text_model
    config = text.config
    injection.text_configs = list({id(c): c for c in (config, model.config.get_text_config())}.values())
    try:
        for index, layer in enumerate(text.layers):
            guard = StackGuard(index)
            injection.guards.append(guard)
            predict, undo = method_route(layer.altup, "predict")
            correct, undo_correct = method_route(layer.altup, "correct")
            check = functools.partial(_check_layer_input, guard)
            predict.before.append(check)
            mark = functools.partial(_mark_result, layer)
            correct.after.append(mark)
            injection.attached += [
                *undo, *undo_correct, _RemoveTap(predict.before, check), _RemoveTap(correct.after, mark),
                layer.register_forward_pre_hook(functools.partial(_enter_layer, guard)),
                layer.register_forward_hook(functools.partial(_leave_layer, guard)),
            ]
        for row in points:
            scopes = list(enumerate(text.layers)) if row.scope == LAYER else [(None, text)]
            for index, scope in scopes:
                _attach_row(injection, row, index, scope, config)
    except BaseException:
        injection.remove()
        raise
    _set_plain(model, _INJECTION_ATTR, injection)
    return injection


def _attach_row(injection: Injection, row: Point, index: int | None, scope: nn.Module, config: Any) -> None:
    qualified = row.name if index is None else f"layers.{index}.{row.name}"
    reason = row.route.applies(injection.root)
    if reason is not None:
        injection.absent[qualified] = reason
        return
    point = None
    if not isinstance(row.route, ModuleItself):
        parent = scope if row.scope == LAYER else injection.root
        if row.name in parent._modules or row.name in parent.__dict__ or hasattr(type(parent), row.name):
            raise InjectionError(f"point {qualified}: {type(parent).__name__} already has an attribute {row.name!r}")
        point = HookPoint(row, index, config)
        point.served = injection.served
        parent.add_module(row.name, point)
        injection.attached.append(_RemoveModule(parent, row.name))
        injection.points[qualified] = point
    try:
        injection.attached += row.route.attach(scope, point, injection)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise InjectionError(f"point {qualified}: its route {row.route} cannot attach to this "
                             f"{type(injection.root).__name__}: {error}") from error


# ==================================================================================================
# Table renderings
# ==================================================================================================


def markdown_table() -> str:
    """The README's table of points, rendered from `POINTS` (a test keeps the README in sync)."""
    lines = ["| where | name | shape | value | produced at |", "|---|---|---|---|---|"]
    for point in POINTS:
        where = "`model.layers[i]`" if point.scope == LAYER else "`model`"
        note = " (load with `attn_implementation=\"eager\"`)" if point.needs == "eager" else ""
        lines.append(f"| {where} | `{point.name}` | {point.shape} | {point.meaning}{note} | {point.produced} |")
    return "\n".join(lines)


def concrete_shape(point: Point, config: Any, batch: int = 1, tokens: int = 1, layer: int = 0) -> tuple[int, ...]:
    """The point's shape for a given text config, batch and sequence length."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = {
        "S": text.altup_num_inputs, "B": batch, "T": tokens, "D": text.hidden_size,
        "P": text.hidden_size_per_layer_input, "L": text.num_hidden_layers,
        "F": text.intermediate_size[layer], "V": text.vocab_size, "H": text.num_attention_heads,
        "Dh": text.head_dim,
    }
    return tuple(sizes[s] for s in point.shape.strip("[]").split(","))
