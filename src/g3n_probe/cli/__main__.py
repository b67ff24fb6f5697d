"""``python -m g3n_probe.cli``: the ``g3n-probe`` command."""

import sys

from .commands import main

sys.exit(main())
