"""The intervention points: one table, one identity module, one owned injection.

Every Gemma-3n-specific value a researcher wants to read or edit has a name and a place in the
module tree. The place is a `HookPoint`, an identity module the value is passed through; each row of
the table (`table.TABLE`) carries a route that attaches the point where the value appears in the
stock forward (`routes`, `attention`), and `inject` is one loop over the rows that returns the
`Injection` owning everything it attached. Stream stacks carry their batch on dimension 1 (`stacks`).

Inside the package, bottom up: `undo`, `stacks` → `hookpoint` → `methods` → `routes` → `attention`
→ `table` → `injection`.
"""

from .attention import AttentionWeights
from .hookpoint import HookPoint, serve
from .injection import Injection, InjectionError, inject
from .methods import MethodRoute, method_route
from .routes import (
    InputOf,
    KeyValueOutputOf,
    LayerArgument,
    LayerStack,
    MethodResult,
    ModuleItself,
    Offset,
    OutputOf,
    RootOutput,
    Route,
    SplitLast,
    SquareTransposed,
    View,
    rekeep_arguments,
)
from .stacks import PointWriteError, StreamBatcher, batch_dim, check_write, checked_stream, mark_stack
from .table import (
    BY_NAME,
    LAYER,
    LAYER_POINTS,
    MODEL,
    MODEL_POINTS,
    POINTS,
    STACK_ROWS,
    TABLE,
    Point,
    concrete_shape,
    execution_rank,
    in_execution_order,
    listing,
    markdown_table,
    split_qualified,
)

# What users touch: the table and its lookups, the point and hook-point types, injection and its errors. The
# names imported above beyond these serve the package's own modules (routes, stacks, listings) and tests.
__all__ = [
    "BY_NAME", "LAYER", "LAYER_POINTS", "MODEL", "MODEL_POINTS", "POINTS", "TABLE",
    "HookPoint", "Injection", "InjectionError", "Point", "PointWriteError", "inject", "split_qualified",
]
