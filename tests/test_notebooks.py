"""Every notebook in notebooks/ runs top to bottom on the bundled default checkpoint."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("G3N_PROBE_DOCS", str(tmp_path / "docs"))
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    images = list((tmp_path / "docs").glob("*.png"))
    assert images, "the notebook should end in a saved plot"
    assert book.cells[0].cell_type == "markdown" and book.cells[-1].cell_type == "markdown"
