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
