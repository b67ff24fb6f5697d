"""The documentation site, built once per test process for the tests that read it (tests/test_docs.py,
tests/test_docs_browser.py): ``mkdocs build --strict`` of this checkout into a temporary directory."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# .ci/run sets it: there the docs tools and chromium are installed, and a test that needs them must run.
REQUIRED = os.environ.get("G3N_REQUIRE_BROWSER") == "1"


def missing_docs_tools() -> list[str]:
    """The docs extra's modules this environment lacks."""
    return [name for name in ("mkdocs", "material", "mkdocstrings_handlers.python", "mkdocs_jupyter", "websocket")
            if importlib.util.find_spec(name.split(".")[0]) is None
            or (name.count(".") and importlib.util.find_spec(name) is None)]


@functools.lru_cache(maxsize=1)
def built_site() -> Path:
    """Build the site strictly (a warning or a broken link fails) and return its directory."""
    out = Path(tempfile.mkdtemp(prefix="g3n-site-")) / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return out
