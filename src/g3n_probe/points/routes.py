"""Routes: where a value appears in the stock forward, each beside the hook functions that serve it.

A route is a small picklable object on a row of the table. ``attach(scope, point, injection)`` puts
the point in place and returns what detaches it; ``applies(root)`` says why the row does not exist
in this kind of model (``logits`` on a base model), ``unavailable(config, name, layer)`` why it does not fire
now (`attention.AttentionWeights` under sdpa). Nothing of the stock forward is copied or replaced:

* `OutputOf`       a torch forward hook routes a stock module's output;
* `InputOf`        a torch forward pre-hook routes a module's first argument; ``in_place`` copies a
                   write into the original tensor, for inline values the stock forward uses twice;
* `MethodResult`   the return value of a stock *method*, through a `methods.MethodRoute`;
* `LayerArgument`  an argument of the decoder layer, served at the start of the layer's body;
* `ModuleItself`   the value already is a stock module's output: its own envoy is the point;
* `RootOutput`     a field of the root model's output (``logits``), by a forward hook on the root;
* `LayerStack`     the decoder layer's own ``.input`` / ``.output`` stream stacks: marked for the
                   batcher and checked on write;
* `KeyValueOutputOf` a key/value module's output, absent (with the store layer named) on KV-reuse layers.

Hooks are module-level functions bound with ``functools.partial`` (never closures), so an injected
model deep-copies (the copy's hooks serve the copy's points) and pickles like any other. A hook
whose point nobody watches (no trace, no torch hook on it) returns at once: the points' only cost.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._compat import child_modules, is_traced, tensor_version
from ..checkpoint import module_tree
from .hookpoint import HookPoint, serve
from .methods import MethodRoute, method_route
from .stacks import check_write, mark_stack
from .undo import RemoveTap


class Route:
    """The protocol every route follows (see the module doc)."""

    makes_point = True      # a HookPoint child is added for the row (False: the value has an envoy already)
    needs: str | None = None  # what the model must use for the value to exist ("eager" attention)

    def attach(self, scope: nn.Module, point: HookPoint | None, injection: Any) -> list:
        raise NotImplementedError

    def applies(self, root: nn.Module) -> str | None:
        return None  # None: the row exists in this kind of model; otherwise why not

    def unavailable(self, config: Any, name: str, layer: int | None = None) -> str | None:
        return None  # None: the point fires now (at ``layer``, for per-layer rows); otherwise why not

    def read(self, owner: Any, name: str) -> Any:
        """The value inside a trace, from the envoy of the row's scope."""
        return getattr(owner, name).output


class View:
    """How a point shows a stock tensor: ``split`` makes the served value, ``merge`` turns what came back
    into what the stock forward continues with. ``written`` says whether the point's value was replaced
    or edited in place; unwritten, ``merge`` must give back the original's exact bits, and the served
    value must stay on the gradient's path (so ``.grad`` on the point fires)."""

    def split(self, tensor: torch.Tensor, config: Any) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, result: torch.Tensor, original: torch.Tensor, written: bool) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class SplitLast(View):
    """Show the last dimension as ``(config.<count>, rest)``: per-head or per-layer views."""

    count: str  # a text-config attribute: num_attention_heads, num_hidden_layers

    def split(self, tensor: torch.Tensor, config: Any) -> torch.Tensor:
        return tensor.unflatten(-1, (getattr(config, self.count), -1))

    def merge(self, result: torch.Tensor, original: torch.Tensor, written: bool) -> torch.Tensor:
        return result.reshape(original.shape)


@dataclass(frozen=True)
class SquareTransposed(View):
    """Show the last dimension (S·S) as the S×S matrix a stock method applies, transposed as it
    transposes it (AltUp predict: ``reshape(..., S, S).permute(0, 1, 3, 2)``)."""

    count: str  # a text-config attribute: altup_num_inputs

    def split(self, tensor: torch.Tensor, config: Any) -> torch.Tensor:
        size = getattr(config, self.count)
        return tensor.unflatten(-1, (size, size)).transpose(-1, -2)

    def merge(self, result: torch.Tensor, original: torch.Tensor, written: bool) -> torch.Tensor:
        return result.transpose(-1, -2).reshape(original.shape)


@dataclass(frozen=True)
class Offset(View):
    """Show ``tensor + amount``, as the stock code adds it inline right after the module (AltUp correct's
    ``correction_coefs(...) + 1.0``). A write ``w`` reaches the model as ``(w - amount) + amount``, which
    is ``w`` exactly for ``w`` within a factor of 2 of ``amount`` (Sterbenz) and to rounding elsewhere."""

    amount: float

    def split(self, tensor: torch.Tensor, config: Any) -> torch.Tensor:
        return tensor + self.amount

    def merge(self, result: torch.Tensor, original: torch.Tensor, written: bool) -> torch.Tensor:
        if written:
            return result - self.amount
        # The original's bits, with the served value on the gradient's path (adds an exact zero).
        return original.detach() + (result - result.detach()) if result.requires_grad else original


# ---- a module's output -----------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputOf(Route):
    path: str
    view: View | None = None

    def attach(self, scope: nn.Module, point: HookPoint, injection: Any) -> list:
        module = scope.get_submodule(self.path)
        return [module.register_forward_hook(functools.partial(_route_output, point, self.view))]


def _route_output(point: HookPoint, view: View | None, module: nn.Module, args: Any, output: Any) -> Any:
    if not point.observed():
        return None
    if view is None:
        result = serve(point, output)
        return None if result is output else result
    return _through_view(point, view, output)


def _through_view(point: HookPoint, view: View, original: torch.Tensor) -> torch.Tensor:
    """Serve ``view.split(original)``; what the stock forward continues with (the served view stays on
    the gradient's path)."""
    value = view.split(original, point.text_config)
    version = tensor_version(value)
    result = serve(point, value)
    return view.merge(result, original, written=result is not value or tensor_version(value) != version)


@dataclass(frozen=True)
class KeyValueOutputOf(OutputOf):
    """The output of a key/value module of the attention (``self_attn.k_norm``). KV-reuse layers have
    none: they read the keys and values of an earlier 'store' layer, which the point's error names."""

    def attach(self, scope: nn.Module, point: HookPoint, injection: Any) -> list:
        if scope.layer_idx in module_tree.kv_sources(point.text_config):
            return []   # the module does not exist here; `unavailable` says where the values come from
        return super().attach(scope, point, injection)

    def unavailable(self, config: Any, name: str, layer: int | None = None) -> str | None:
        source = module_tree.kv_sources(config).get(layer) if layer is not None else None
        if source is None:
            return None
        return (f"{name} does not exist: layer {layer} is a KV-reuse layer and computes no keys or values; it "
                f"reads those of store layer {source} (read layers.{source}.{name.rpartition('.')[2]})")


# ---- a module's input ------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputOf(Route):
    """A module's first argument. ``in_place``: a write is copied into the original tensor (an inline
    value the stock forward uses again later); ``private_copy_of`` names a keyword of the scope's
    forward through which a caller may hand that tensor in (``inputs_embeds``): it is copied on entry,
    so an in-place write never changes the caller's tensor."""

    path: str
    view: View | None = None
    in_place: bool = False
    private_copy_of: str | None = None

    def __post_init__(self) -> None:
        if self.in_place and self.view is not None:
            raise ValueError("InputOf: an in-place route hands out the tensor itself, not a view of it")

    def attach(self, scope: nn.Module, point: HookPoint, injection: Any) -> list:
        module = scope.get_submodule(self.path)
        hook = (functools.partial(_route_input_in_place, point) if self.in_place
                else functools.partial(_route_input, point, self.view))
        handles = [module.register_forward_pre_hook(hook)]
        if self.private_copy_of is not None:
            copy = functools.partial(_copy_keyword, point, self.private_copy_of)
            handles.append(scope.register_forward_pre_hook(copy, with_kwargs=True))
        return handles


def _route_input(point: HookPoint, view: View | None, module: nn.Module, args: tuple) -> tuple | None:
    if not point.observed():
        return None
    original = args[0]
    if view is not None:
        return (_through_view(point, view, original), *args[1:])
    result = serve(point, original)
    return None if result is original else (result, *args[1:])


def _route_input_in_place(point: HookPoint, module: nn.Module, args: tuple) -> None:
    """For inline values the stock forward uses more than once (``resid_mid``, ``embed``): a write is
    copied into the original tensor, so every later use sees it."""
    if not point.observed():
        return None
    original = args[0]
    result = serve(point, original)
    if result is not original:
        original.copy_(result)
    return None


def _copy_keyword(point: HookPoint, keyword: str, scope: nn.Module, args: tuple, kwargs: dict) -> Any:
    value = kwargs.get(keyword)
    if not isinstance(value, torch.Tensor) or not point.observed():
        return None
    return args, {**kwargs, keyword: value.clone()}


# ---- a method's result -----------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodResult(Route):
    """The return value of ``path`` (a method of a submodule); ``inside``: only the calls made while
    that other method of the same module runs (the AltUp router runs in both predict and correct);
    ``snapshot``: the stock forward continues with a copy, because it mutates the result in place."""

    path: str
    inside: str | None = None
    snapshot: bool = False

    def attach(self, scope: nn.Module, point: HookPoint, injection: Any) -> list:
        owner_path, _, name = self.path.rpartition(".")
        owner = scope.get_submodule(owner_path)
        route, undo = method_route(owner, name)
        enclosing = None
        if self.inside is not None:
            enclosing, undo_enclosing = method_route(owner, self.inside)
            undo = undo + undo_enclosing
        tap = functools.partial(_route_result, point, enclosing, self.snapshot)
        route.after.append(tap)
        return [RemoveTap(route.after, tap), *undo]


def _route_result(point: HookPoint, enclosing: MethodRoute | None, snapshot: bool, result: Any) -> Any:
    if (enclosing is not None and not enclosing.running) or not point.observed():
        return result
    served = serve(point, result)
    if snapshot:
        # The decoder layer adds the PLE contribution to this tensor in place; what the point
        # handed out must stay the pre-PLE value, so the body continues with a copy.
        copy = served.clone()
        return mark_stack(copy) if point.point.stack else copy
    return served


# ---- an argument of the decoder layer --------------------------------------------------------------

@dataclass(frozen=True)
class LayerArgument(Route):
    """An argument of the decoder layer (``per_layer_input``). A forward pre-hook keeps it; the point
    fires when ``served_by`` (the first call of the layer's body) runs, so nnsight sees it after the
    layer's ``.input``, in execution order. A write is copied into the tensor the body uses."""

    index: int
    keyword: str
    served_by: str

    def attach(self, scope: nn.Module, point: HookPoint, injection: Any) -> list:
        owner_path, _, name = self.served_by.rpartition(".")
        route, undo = method_route(scope.get_submodule(owner_path), name)
        tap = functools.partial(_serve_pending, point)
        route.before.append(tap)
        keep = functools.partial(_keep_argument, point, self.index, self.keyword)
        return [scope.register_forward_pre_hook(keep, with_kwargs=True), RemoveTap(route.before, tap), *undo]


def _keep_argument(point: HookPoint, index: int, keyword: str, layer: nn.Module, args: tuple, kwargs: dict) -> Any:
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


def _serve_pending(point: HookPoint, args: tuple, kwargs: dict) -> None:
    value, point.pending = point.pending, None
    if value is not None:
        written = serve(point, value)
        if written is not value:
            value.copy_(written)


def rekeep_arguments(layer: nn.Module, value: tuple) -> tuple:
    """A trace replaced a layer's whole ``(args, kwargs)``: keep private copies of the new arguments, so
    their points serve (and a write to them reaches) what the layer's body will now use."""
    args, kwargs = value
    for point in child_modules(layer).values():
        if isinstance(point, HookPoint) and isinstance(point.point.route, LayerArgument):
            route = point.point.route
            kept = _keep_argument(point, route.index, route.keyword, layer, args, kwargs)
            if kept is not None:
                args, kwargs = kept
    return args, kwargs


# ---- a stock module's own envoy ----------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleItself(Route):
    """The value is the output of a stock module (``laurel``): its envoy already is the point."""

    path: str
    makes_point = False

    def attach(self, scope: nn.Module, point: None, injection: Any) -> list:
        scope.get_submodule(self.path)  # fails, naming the row, if the module is not there
        return []


# ---- a field of the root's output ------------------------------------------------------------------

@dataclass(frozen=True)
class RootOutput(Route):
    """A field of the root model's output. A forward hook on the root leaves the stock ``forward``
    and its signature untouched; nnsight therefore serves this point after ``model.output``.
    ``requires``: the root's submodule that produces the field (absent on some classes)."""

    field: str
    requires: str

    def applies(self, root: nn.Module) -> str | None:
        if not hasattr(root, self.requires):
            return f"{type(root).__name__} has no {self.requires} and returns hidden states, not {self.field}"
        return None

    def attach(self, scope: nn.Module, point: HookPoint, injection: Any) -> list:
        return [injection.root.register_forward_hook(functools.partial(_route_field, point, self.field))]


def _route_field(point: HookPoint, name: str, module: nn.Module, args: Any, output: Any) -> None:
    value = getattr(output, name, None)
    if not isinstance(value, torch.Tensor) or not point.observed():
        return None
    written = serve(point, value)
    if written is not value:
        setattr(output, name, written)
    return None


# ---- the decoder layer's own stream stacks ---------------------------------------------------------

@dataclass(frozen=True)
class LayerStack(Route):
    """The stack entering (``side="input"``) or leaving (``"output"``) a decoder layer: the layer's own
    envoy serves it. Stacks handed to nnsight are marked (batch on dimension 1) and a write is checked
    before torch sees it: the input's when the layer's body starts (its first call, ``altup.predict``)."""

    side: str
    makes_point = False

    def attach(self, scope: nn.Module, point: None, injection: Any) -> list:
        if self.side == "input":
            guard = _StackGuard(scope)
            predict, undo = method_route(scope.altup, "predict")
            check = functools.partial(_check_layer_input, guard)
            predict.before.append(check)
            injection.stateful.append(guard)
            return [*undo, RemoveTap(predict.before, check),
                    scope.register_forward_pre_hook(functools.partial(_enter_layer, guard))]
        correct, undo = method_route(scope.altup, "correct")
        mark = functools.partial(_mark_result, scope)
        correct.after.append(mark)
        return [*undo, RemoveTap(correct.after, mark), scope.register_forward_hook(_leave_layer)]

    def read(self, owner: Any, name: str) -> Any:
        return getattr(owner, self.side)


@dataclass
class _StackGuard:
    """The stack that entered one layer (shape, dtype, device), until the layer's body starts."""

    layer: nn.Module
    expected: tuple | None = None

    def reset(self) -> None:
        self.expected = None


def _stack_name(layer: nn.Module, side: str) -> str:
    return f"layers.{layer.layer_idx}.{side} [S,B,T,D]"


def _enter_layer(guard: _StackGuard, layer: nn.Module, args: tuple) -> None:
    # Only a trace can replace a layer's stacks, and only nnsight's batcher reads the mark: outside
    # one, tensors a user receives (output_hidden_states) stay unmarked, as stock.
    guard.expected = None
    if is_traced(layer) and args and isinstance(args[0], torch.Tensor):
        mark_stack(args[0])
        guard.expected = (args[0].shape, args[0].dtype, args[0].device)


def _check_layer_input(guard: _StackGuard, args: tuple, kwargs: dict) -> None:
    expected, guard.expected = guard.expected, None
    if expected is not None and args:
        check_write(_stack_name(guard.layer, "input"), args[0], *expected)


def _leave_layer(layer: nn.Module, args: tuple, output: Any) -> None:
    if not is_traced(layer):
        return
    if args and isinstance(args[0], torch.Tensor):
        check_write(_stack_name(layer, "output"), output, args[0].shape, args[0].dtype, args[0].device)
    mark_stack(output)


def _mark_result(layer: nn.Module, result: Any) -> Any:
    return mark_stack(result) if is_traced(layer) else result
