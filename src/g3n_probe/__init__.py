"""g3n_probe: Gemma 3n (E2B/E4B) as a first-class subject for mechanistic interpretability.

    import g3n_probe as g3n
    model = g3n.load("path/to/gemma-3n-E2B")          # text-only, stock transformers model
    with model.trace("The Eiffel Tower is in"):
        predicted = model.layers[3].altup_predict.output.save()   # [S,B,T,D]
        model.layers[5].ple_out.output[:] = 0                     # remove layer 5's PLE contribution
        logits = model.logits.output.save()

The package, one folder per concern, each importing only from the ones below it (import-linter's contract in
pyproject.toml; `│` separates siblings that never import each other):

    cli/                   the ``g3n-probe`` command line, demo, bench, GPU check: presentation only
    circuits/              attribution graphs over transcoders (above ``sae``: it reads them)
    analysis/ │ sae/       decompose, patching, matformer, audit │ SAEs, transcoders, the replacement model
    loading.py             ``g3n.load``: source → checked, text-only, point-injected ``Gemma3nProbe``
    probe/                 the nnsight model, its envoys, the exact logit lens, TransformerLens conventions
    activations/           one batch's values, the dataset writer and run identity, ``ActivationDataset``
    points/ │ hub/         the table of intervention points and injection │ fetching text-only checkpoints
    checkpoint/            files on disk → a text-only stock model; module-tree facts; synthetic checkpoints
    _util, _compat         small helpers; the seam holding every private nnsight/torch/transformers name

Public spellings live here (``g3n.load``, ``g3n.hub.fetch``, ``g3n.patching.sweep``, ``g3n.decompose``,
``g3n.sae.*``, ``g3n.synthetic.*``); module paths from before the folders still import (`_moved`).
"""

from importlib.metadata import version as _version

from . import _moved, circuits, hub, sae
from .activations import ActivationCache, ActivationDataset, cache_dataset
from .analysis import audit as _audit_module
from .analysis import decompose as _decompose_module
from .analysis import matformer, patching
from .analysis.audit import AuditReport, audit
from .analysis.decompose import Decomposition, decompose
from .checkpoint import CheckpointError, TowerNotLoadedError, synthetic
from .circuits import Graph, attribute
from .loading import LoadReport, load
from .points import POINTS, TABLE, HookPoint, Injection, InjectionError, Point, PointWriteError, inject
from .probe import Gemma3nProbe

# Module paths from before the folders (README "Architecture"): the public namespaces keep their old import
# paths (``import g3n_probe.patching``); every other old path still imports, with a DeprecationWarning
# (and old pickles still load), through `_moved`.
_moved.alias(__name__, patching=patching, matformer=matformer, synthetic=synthetic,
             decompose=_decompose_module, audit=_audit_module)

__version__ = _version("g3n_probe")

__all__ = [
    "POINTS",
    "TABLE",
    "ActivationCache",
    "ActivationDataset",
    "AuditReport",
    "attribute",
    "audit",
    "cache_dataset",
    "circuits",
    "Decomposition",
    "decompose",
    "hub",
    "matformer",
    "patching",
    "sae",
    "CheckpointError",
    "Gemma3nProbe",
    "Graph",
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
