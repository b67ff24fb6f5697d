"""The house: imports among the package's modules run one way (import-linter's layers contracts in
pyproject.toml), no function-local import of a project module, no file over 600 lines, no function
over 60 lines. A planted back-edge must fail the contract, or the contract checks nothing."""

from __future__ import annotations

import ast
import os
import pickle
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
    assert "3 kept, 0 broken" in result.stdout


def test_a_planted_back_edge_breaks_the_contract(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(PACKAGE, copy / "g3n_probe", ignore=shutil.ignore_patterns("data", "__pycache__"))
    facts = copy / "g3n_probe" / "checkpoint" / "module_tree.py"
    facts.write_text(facts.read_text() + "\nfrom .. import cli  # planted: a bottom layer importing the top\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    result = _lint(tmp_path, pythonpath=copy)
    assert result.returncode != 0
    assert "g3n_probe.checkpoint.module_tree -> g3n_probe.cli" in result.stdout and "BROKEN" in result.stdout


def _function_local_project_imports(tree: ast.Module) -> list[int]:
    top = {id(node) for node in tree.body}
    for node in tree.body:   # ``if TYPE_CHECKING:`` imports (annotations only) are module-level too
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            top |= {id(child) for child in node.body}
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


# Written by pickle.dumps(protocol=2) before the folders (issue 29): classes and functions a pickled model or
# result refers to, each by its old module path (the stub towers, the host-resident table's hooks, ...).
OLD_PICKLE = (b'\x80\x02]q\x00(cg3n_probe.towers\nTowerStub\nq\x01cg3n_probe.towers\nTowerNotLoadedError\nq\x02'
              b'cg3n_probe.ple\n_ids_to_table\nq\x03cg3n_probe.ple\n_rows_to_device\nq\x04cg3n_probe.probe\nGemma3nProbe\n'
              b'q\x05cg3n_probe.checkpoint\nCheckpointError\nq\x06cg3n_probe.staging\nTablePlaceholder\nq\x07'
              b'cg3n_probe.activations\nActivationCache\nq\x08cg3n_probe.reader\nActivationDataset\nq\t'
              b'cg3n_probe.decompose\nDecomposition\nq\ncg3n_probe.audit\nAuditReport\nq\x0bcg3n_probe.loading\n'
              b'LoadReport\nq\x0ccg3n_probe.lens\nLogitLensTable\nq\rcg3n_probe.hub_http\nFetchError\nq\x0e'
              b'cg3n_probe.points.routes\nOutputOf\nq\x0fcg3n_probe.points.hookpoint\nHookPoint\nq\x10e.')


def test_a_pickle_from_before_the_folders_loads():
    from g3n_probe import loading, points
    from g3n_probe.activations import activation_dataset, batch
    from g3n_probe.analysis import audit, decompose
    from g3n_probe.checkpoint import ple, reading, staging, towers
    from g3n_probe.hub import http
    from g3n_probe.probe import gemma3n_probe, lens

    assert pickle.loads(OLD_PICKLE) == [
        towers.TowerStub, towers.TowerNotLoadedError, ple._ids_to_table, ple._rows_to_device, gemma3n_probe.Gemma3nProbe,
        reading.CheckpointError, staging.TablePlaceholder, batch.ActivationCache, activation_dataset.ActivationDataset,
        decompose.Decomposition, audit.AuditReport, loading.LoadReport, lens.LogitLensTable, http.FetchError,
        points.routes.OutputOf, points.hookpoint.HookPoint]


def test_old_module_paths_import_the_new_modules():
    code = """if True:
        import importlib, warnings
        import g3n_probe as g3n
        from g3n_probe.analysis import decompose, patching
        import g3n_probe.patching, g3n_probe.matformer, g3n_probe.synthetic, g3n_probe.decompose
        assert g3n_probe.patching is patching and g3n.patching.sweep is patching.sweep
        assert g3n.decompose is decompose.decompose and g3n.hub.fetch and g3n.synthetic.save_checkpoint
        from g3n_probe.probe import Gemma3nProbe
        from g3n_probe.cli import main
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = importlib.import_module("g3n_probe.patching_cache")
        assert old is importlib.import_module("g3n_probe.analysis.prefix_reuse")
        assert [w.category for w in caught] == [DeprecationWarning], caught
        assert "g3n_probe.analysis.prefix_reuse" in str(caught[0].message)
        assert g3n.decompose is decompose.decompose   # an old path never shadows a facade name
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
