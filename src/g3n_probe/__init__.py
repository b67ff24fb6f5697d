"""g3n_probe: Gemma 3n (E2B/E4B) as a first-class subject for mechanistic interpretability.

    import g3n_probe as g3n
    model = g3n.load("path/to/gemma-3n-E2B")          # text-only, stock transformers model
    with model.trace("The Eiffel Tower is in"):
        predicted = model.layers[3].altup_predict.output.save()   # [S,B,T,D]
        model.layers[5].ple_out.output[:] = 0                     # remove layer 5's PLE contribution
        logits = model.logits.output.save()
"""

from importlib.metadata import version as _version

from . import hub, matformer, patching, sae, synthetic
from .activations import ActivationCache
from .audit import AuditReport, audit
from .checkpoint import CheckpointError
from .dataset import cache_dataset
from .decompose import Decomposition, decompose
from .loading import LoadReport, load
from .points import POINTS, TABLE, HookPoint, Injection, InjectionError, Point, PointWriteError, inject
from .probe import Gemma3nProbe
from .reader import ActivationDataset
from .towers import TowerNotLoadedError

__version__ = _version("g3n_probe")

__all__ = [
    "POINTS",
    "TABLE",
    "ActivationCache",
    "ActivationDataset",
    "AuditReport",
    "audit",
    "cache_dataset",
    "Decomposition",
    "decompose",
    "hub",
    "matformer",
    "patching",
    "sae",
    "CheckpointError",
    "Gemma3nProbe",
    "HookPoint",
    "Injection",
    "InjectionError",
    "LoadReport",
    "Point",
    "PointWriteError",
    "TowerNotLoadedError",
    "inject",
    "load",
    "synthetic",
]
