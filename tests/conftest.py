from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.manual_seed(0)

import g3n_probe as g3n  # noqa: E402
from reference import build_stock  # noqa: E402

# Test lanes (markers registered in pyproject.toml): a lane's tests by a piece of their node id. Every lane is
# also `slow`, and so is each test in SLOW (over ~3 s on the 2-core machine). `make test-fast` runs -m "not slow".
LANES = {
    "notebooks": ["tests/test_notebooks.py::"],
    "fuzz": ["tests/test_fuzz.py::"],
    "torchrun": ["torchrun"],
    "grid": ["tests/test_patching.py::test_token_reuse_equals_one_stock_forward_per_patch_for_"],
    "gpu_check_cpu": ["tests/test_bench.py::test_the_check_runs_end_to_end_on_cpu"],
}
SLOW = [
    "tests/test_docs.py::test_the_site_builds_strictly",
    "tests/test_docs_browser.py::",
    "tests/test_graph_viewer.py::test_graph_serve_command_runs_until_stopped",
    "tests/test_graph_viewer.py::test_viewer_in_a_browser",
    "tests/test_architecture.py::test_old_module_paths_import_the_new_modules",
    "tests/test_architecture.py::test_a_planted_back_edge_breaks_the_contract",
    "tests/test_loading.py::test_no_timm_no_pil_and_no_tower_tensor_read",
    "tests/test_accelerator_load.py::test_pieces_smaller_than_a_row_still_reassemble_the_tensor",
    "tests/test_types.py::",
]


def pytest_collection_modifyitems(config, items):
    for item in items:
        lanes = [lane for lane, pieces in LANES.items() if any(piece in item.nodeid for piece in pieces)]
        for lane in lanes:
            item.add_marker(lane)
        if lanes or any(piece in item.nodeid for piece in SLOW):
            item.add_marker("slow")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return g3n.synthetic.save_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def probe(tiny_dir):
    return g3n.load(tiny_dir)


@pytest.fixture(scope="session")
def probe_eager(tiny_dir):
    return g3n.load(tiny_dir, attn_implementation="eager")


@pytest.fixture(scope="session")
def stock(tiny_dir):
    return build_stock(tiny_dir)


@pytest.fixture(scope="session")
def stock_eager(tiny_dir):
    return build_stock(tiny_dir, attn_implementation="eager")


@pytest.fixture(scope="session")
def ids():
    # Text ids, vision soft-token ids (512..527) and audio soft-token ids (528..543), longer than the
    # tiny sliding window (8) so sliding layers differ from full ones.
    return torch.tensor([[2, 50, 60, 512, 513, 530, 543, 7, 9, 10, 11, 12, 300, 301]])


@pytest.fixture(scope="session")
def batch_ids(ids):
    gen = torch.Generator().manual_seed(1)
    rows = [ids[0]] + [torch.randint(3, 544, (ids.shape[1],), generator=gen) for _ in range(3)]
    return torch.stack(rows)
