"""mypy on the public modules: the façade, loading, the probe, the analyses, the circuits and the transcoders
(pyproject's [tool.mypy])."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "g3n_probe"
PUBLIC = ["__init__.py", "loading.py", "probe", "analysis", "circuits", "sae/transcoders.py", "sae/replaced.py"]


def test_public_modules_type_check():
    cache = Path(tempfile.gettempdir()) / "g3n_probe-mypy-cache"
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                             "--cache-dir", str(cache), *(str(PACKAGE / name) for name in PUBLIC)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
