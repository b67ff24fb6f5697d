"""One table drives the README, the CLI and the injection; the CLI runs."""

from __future__ import annotations

import re
from pathlib import Path

from g3n_probe.cli import main
from g3n_probe.points import POINTS, ModuleItself, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def test_readme_table_matches_points():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- points-table:start -->\n(.*?)\n<!-- points-table:end -->", readme, re.S)
    assert block, "README lost its points table markers"
    assert block.group(1).strip() == markdown_table().strip()


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    head = "\n".join(lines[:6])
    assert "make demo" in head and "make test" in head
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_injected_points_follow_the_table(probe):
    layer = probe._module.model.language_model.layers[0]
    from g3n_probe.points import HookPoint

    injected = [name for name, module in layer.named_children() if isinstance(module, HookPoint)]
    expected = [p.name for p in POINTS if p.scope == "layer" and not isinstance(p.route, ModuleItself)]
    assert injected == expected
    model_level = [name for name, module in probe._module.named_children() if isinstance(module, HookPoint)]
    assert model_level == [p.name for p in POINTS if p.scope == "model"]


def test_cli_points(tiny_dir, capsys):
    assert main(["points", str(tiny_dir), "--batch", "2", "--tokens", "5"]) == 0
    out = capsys.readouterr().out
    for point in POINTS:
        assert point.name in out
    assert "[4, 2, 5, 64]" in out  # a stack with the tiny checkpoint's shapes
    assert "4←3" in out and "5←2" in out  # KV sharing


def test_cli_info(tiny_dir, capsys):
    assert main(["info", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "per-layer table" in out and "audio tower" in out and "vision tower" in out
    assert "store" in out and "reuse" in out


def test_cli_demo(tiny_dir, tmp_path, capsys):
    out_png = tmp_path / "demo.png"
    assert main(["demo", "--model", str(tiny_dir), "--out", str(out_png)]) == 0
    assert out_png.exists() and out_png.stat().st_size > 1000
    assert "Logit lens" in capsys.readouterr().out


def test_cli_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().out
