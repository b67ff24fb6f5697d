"""What detaches: small picklable records, undone in reverse order by `Injection.remove`.

Torch hook handles already have ``remove()``; these records cover the rest an injection adds (a tap on
a method route, a plain attribute, a child module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .._compat import remove_child


def set_plain(obj: Any, name: str, value: Any) -> None:
    """A plain instance attribute, never a registered submodule (that would move a point in the tree)."""
    object.__setattr__(obj, name, value)


@dataclass
class RemoveTap:
    taps: list
    tap: Callable

    def remove(self) -> None:
        if self.tap in self.taps:
            self.taps.remove(self.tap)


@dataclass
class DeleteAttribute:
    obj: Any
    name: str

    def remove(self) -> None:
        self.obj.__dict__.pop(self.name, None)


@dataclass
class RemoveModule:
    parent: nn.Module
    name: str

    def remove(self) -> None:
        remove_child(self.parent, self.name)
