"""Call-through routes for stock *methods*, which module hooks never see (``altup.predict`` is one).

A `MethodRoute` stands in an instance's ``__dict__`` for one of its methods and calls the stock
method through: ``before`` taps see the arguments, ``after`` taps may replace the result, and
``running`` counts the calls in progress (for `routes.MethodResult.inside`). It shows the stock
method's signature, and since it holds its module as a plain attribute, a deep copy or an unpickled
copy calls the copy's method. Several rows may share one route; the last to leave removes it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .undo import set_plain


class MethodRoute:
    """``owner.<name>``, called through with taps (see the module doc)."""

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


@dataclass
class ReleaseRoute:
    """One user's hold on a `MethodRoute`; the last release puts the stock method back."""

    route: MethodRoute

    def remove(self) -> None:
        route = self.route
        route.users -= 1
        if route.users == 0 and route.owner.__dict__.get(route.name) is route:
            if route.previous is None:
                del route.owner.__dict__[route.name]
            else:
                set_plain(route.owner, route.name, route.previous)


def method_route(owner: nn.Module, name: str) -> tuple[MethodRoute, list]:
    """The `MethodRoute` for ``owner.<name>`` (installed if needed) and what releases this use of it."""
    if not callable(getattr(owner, name, None)):
        raise AttributeError(f"{type(owner).__name__} has no method {name!r}")
    route = owner.__dict__.get(name)
    if not isinstance(route, MethodRoute):
        route = MethodRoute(owner, name, owner.__dict__.get(name))
        set_plain(owner, name, route)
    route.users += 1
    return route, [ReleaseRoute(route)]
