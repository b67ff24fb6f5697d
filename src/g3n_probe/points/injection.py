"""`inject`: one loop over the table's rows, and the `Injection` that owns everything it attached.

Each row's route attaches itself and returns what detaches it; the injection keeps those records in
order, and `Injection.remove` undoes them in reverse, so the model is then exactly what it was (a
test compares the module tree, every ``__dict__`` and every hook dict with a never-injected model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from .._compat import child_modules
from ..checkpoint import module_tree
from .hookpoint import HookPoint
from .methods import ReleaseRoute
from .table import LAYER, STACK_ROWS, TABLE, Point
from .undo import RemoveModule, set_plain

_INJECTION_ATTR = "_g3n_injection"


class InjectionError(ValueError):
    """A row of the table could not be attached to the given model; the message names the row."""


@dataclass
class Injection:
    """Everything `inject` attached to one model, and the means to take it all off again.

    Attributes:
        root: the model injected into.
        text_path: where its ``Gemma3nTextModel`` sits ('' when the root is one).
        points: qualified point name (``"layers.3.altup_predict"``, ``"logits"``) -> `HookPoint`.
        absent: rows that do not exist in this kind of model -> why (``logits`` on a base model).
        stateful: per-forward state holders besides the points (the layer stacks' guards).
        attached: the detach records, in the order they were made.
        served: id(tensor) -> the point that served it in the current trace (for ``.grad`` errors).
        pending: what was attached for one forward (a splice made in a trace) and comes off when it ends; `remove`
            takes it off too, should that forward never come.
    """

    root: nn.Module
    text_path: str
    points: dict[str, HookPoint] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)
    stateful: list = field(default_factory=list)
    attached: list = field(default_factory=list)
    served: dict[int, HookPoint] = field(default_factory=dict)
    pending: list = field(default_factory=list)

    @staticmethod
    def of(model: nn.Module) -> Injection | None:
        """The injection living on ``model`` (its copies included), or None."""
        return model.__dict__.get(_INJECTION_ATTR)

    @property
    def text_model(self) -> nn.Module:
        return self.root.get_submodule(self.text_path) if self.text_path else self.root

    def unavailable(self, point: Point, layer: int | None = None) -> str | None:
        """Why ``point`` never fires in this model now (``attn_pattern`` under sdpa, ``logits`` on a
        base model, ``attn_k`` on a KV-reuse ``layer``), or None when it does (at ``layer``, if given)."""
        if point.name in self.absent:
            return self.absent[point.name]
        return point.route.unavailable(self.text_model.config, point.qualified(layer), layer)

    def explain_out_of_order(self, error: Exception) -> Exception:
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
        routes = {id(r.route): r.route for r in self.attached if isinstance(r, ReleaseRoute)}
        for holder in [*self.stateful, *routes.values(), *self.points.values()]:
            holder.reset()

    def remove(self) -> None:
        """Detach everything, in reverse order. The model is then exactly as before `inject`."""
        while self.pending:
            self.pending.pop().remove()
        while self.attached:
            self.attached.pop().remove()
        for point in self.points.values():
            point.attached = False
        self.points.clear()
        self.stateful.clear()
        self.root.__dict__.pop(_INJECTION_ATTR, None)

    def __repr__(self) -> str:
        return f"<Injection of {len(self.points)} points into {type(self.root).__name__}>"


def inject(model: nn.Module, points: Sequence[Point] = TABLE) -> Injection:
    """Attach every row of ``points`` to a stock Gemma 3n model and return the `Injection`.

    ``model`` is any of ``Gemma3nForConditionalGeneration``, ``Gemma3nForCausalLM``,
    ``Gemma3nModel`` or ``Gemma3nTextModel``, however it was loaded. Per-layer points become
    children of each decoder layer, model-level points children of ``model``. The layer-stack rows
    are always attached (nnsight's batcher relies on their marks). Attach before nnsight wraps the
    model (`g3n_probe.Gemma3nProbe` does this for you): nnsight installs its controller per module
    once, so modules added later are invisible to it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject takes a stock Gemma 3n model (an nn.Module), not {type(model).__name__}")
    if Injection.of(model) is not None:
        raise RuntimeError("intervention points are already injected into this model (Injection.of(model))")
    injection = Injection(root=model, text_path=module_tree.text_model_path(model))
    text = injection.text_model
    rows = [*STACK_ROWS, *(row for row in points if row not in STACK_ROWS)]
    try:
        for row in rows:
            scopes = list(enumerate(text.layers)) if row.scope == LAYER else [(None, text)]
            for index, scope in scopes:
                _attach_row(injection, row, index, scope)
    except BaseException:
        injection.remove()
        raise
    set_plain(model, _INJECTION_ATTR, injection)
    return injection


def _attach_row(injection: Injection, row: Point, index: int | None, scope: nn.Module) -> None:
    qualified = row.qualified(index)
    reason = row.route.applies(injection.root)
    if reason is not None:
        injection.absent[row.name] = reason
        return
    point = None
    if row.route.makes_point:
        parent = scope if row.scope == LAYER else injection.root
        if row.name in child_modules(parent) or row.name in parent.__dict__ or hasattr(type(parent), row.name):
            raise InjectionError(f"point {qualified}: {type(parent).__name__} already has an attribute {row.name!r}")
        point = HookPoint(row, index, injection.text_model.config)
        point.served = injection.served
        parent.add_module(row.name, point)
        injection.attached.append(RemoveModule(parent, row.name))
        injection.points[qualified] = point
    try:
        injection.attached += row.route.attach(scope, point, injection)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise InjectionError(f"point {qualified}: its route {row.route} cannot attach to this "
                             f"{type(injection.root).__name__}: {error}") from error
