"""The ``g3n-probe`` command line: presentation over the package's own functions.

- `commands`: the parser and the subcommands (``fetch``, ``info``, ``points``, ``demo``, ``audit``, ``bench``);
  `main` is the console script's entry point.
- `demo`: what the tool shows on one code prompt, in under a minute on a CPU.
- `bench`: memory and speed of the per-layer-table placements, side by side.
- `gpu_check`: every performance target, stock beside g3n_probe, in one run (``make gpu-check``).
"""

from .commands import main

__all__ = ["main"]
