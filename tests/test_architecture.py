"""The house: imports among the package's modules run one way (import-linter's layers contracts in
pyproject.toml), no function-local import of a project module, no file over 600 lines, no function
over 60 lines. A planted back-edge must fail the contract, or the contract checks nothing."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "g3n_probe"
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath) if pythonpath else os.environ.get("PYTHONPATH", "")}
    return subprocess.run([str(LINT), "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_imports_follow_the_layers():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_planted_back_edge_breaks_the_contract(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "g3n_probe", ignore=shutil.ignore_patterns("data", "__pycache__"))
    arch = copy / "g3n_probe" / "arch.py"
    arch.write_text(arch.read_text() + "\nfrom . import cli  # planted: a bottom layer importing the top\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    result = _lint(tmp_path, pythonpath=copy)
    assert result.returncode != 0
    assert "g3n_probe.arch -> g3n_probe.cli" in result.stdout and "BROKEN" in result.stdout


def _function_local_project_imports(tree: ast.Module) -> list[int]:
    top = {id(node) for node in tree.body}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and id(node) not in top and (node.level or "g3n_probe" in (node.module or "")):
            lines.append(node.lineno)
        if isinstance(node, ast.Import) and id(node) not in top and any(a.name.startswith("g3n_probe") for a in node.names):
            lines.append(node.lineno)
    return lines


def test_no_local_project_imports_and_no_long_files_or_functions():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        name = path.relative_to(PACKAGE)
        problems += [f"{name}:{line} imports a project module inside a function"
                     for line in _function_local_project_imports(tree)]
        if source.count("\n") > 600:
            problems.append(f"{name} has {source.count(chr(10))} lines (limit 600)")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                problems.append(f"{name}:{node.lineno} {node.name} is {node.end_lineno - node.lineno + 1} lines (limit 60)")
    assert not problems, "\n".join(problems)


def test_private_library_names_only_in_the_seam():
    """Underscore names of nnsight, torch and transformers are used only in _compat.py."""
    private = ("._module", "._add_envoy", "._narrow_tensor", "._widen_tensor", "._forward_hooks", "._forward_pre_hooks",
               "._modules", "._version", "._attn_implementation", "._batcher_class", "__wrapped__", "._nnsight_batch",
               "torch._subclasses", "modeling_gemma3n.AutoModel =", "_sanitize_parameters")
    offenders = [f"{path.relative_to(PACKAGE)}: {name}" for path in PACKAGE.rglob("*.py") if path.name != "_compat.py"
                 for name in private if name in path.read_text()]
    assert not offenders, offenders
