"""Module paths from before the folders (issue 29), kept one release for old imports and old pickles.

A pickle names each class and function by its module path (``g3n_probe.towers.TowerStub``); so does code
written against an older g3n_probe (``from g3n_probe.hub_http import FetchError``). Each old path below
imports the module that now holds those names, the very same module object, with a DeprecationWarning.
Imports nothing of the project's: it names modules as strings.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

#: old module path (under ``g3n_probe.``) → its new one. Old paths that are packages now (``checkpoint``,
#: ``hub``, ``activations``, ``probe``, ``cli``) re-export their public names instead.
MOVED = {
    "arch": "checkpoint.module_tree",
    "staging": "checkpoint.staging",
    "towers": "checkpoint.towers",
    "ple": "checkpoint.ple",
    "hub_files": "hub.cache_layout",
    "hub_http": "hub.http",
    "hub_write": "hub.transfers",
    "dataset": "activations.writer",
    "reader": "activations.activation_dataset",
    "lens": "probe.lens",
    "tl": "probe.tl",
    "decompose_view": "analysis.decompose_view",
    "patching_plan": "analysis.patching_plan",
    "patching_cache": "analysis.prefix_reuse",
    "demo": "cli.demo",
    "bench": "cli.bench",
    "gpu_check": "cli.gpu_check",
}


class _OldPath(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and loads it as the module that holds its names now."""

    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        short = name[len(self.package) + 1:] if name.startswith(self.package + ".") else None
        return importlib.util.spec_from_loader(name, self) if short in MOVED else None

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        new = f"{self.package}.{MOVED[module.__name__[len(self.package) + 1:]]}"
        warnings.warn(f"{module.__name__} is now {new}; the old path goes in a later release",
                      DeprecationWarning, stacklevel=2)
        sys.modules[module.__name__] = importlib.import_module(new)   # what the import statement returns


def alias(package: str, **public: ModuleType) -> None:
    """Install the old paths under ``package``; ``public`` ones (still public spellings) import silently."""
    for short, module in public.items():
        sys.modules.setdefault(f"{package}.{short}", module)
    if not any(isinstance(finder, _OldPath) and finder.package == package for finder in sys.meta_path):
        sys.meta_path.append(_OldPath(package))
