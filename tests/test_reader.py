"""`ActivationDataset` over a `cache_dataset` directory: every real token's row, in order, against a direct
trace of the same batch; padding left out; text index and position right; stream stacks on their batch axis;
verification as a resume verifies; DataLoader workers; torchrun ranks, each its shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader

import g3n_probe as g3n

TEXTS = ["def f(x):\n    return x", "import os", "class A:\n    pass", "for i in range(3):", "x = [1, 2]", "print('hi')",
         "while True: break", "a = b + c  # a longer line, to pad the others in its shard"]
POINTS = ["layers.1.altup_predict", "layers.0.ple_out", "layers.2.output"]


@pytest.fixture(scope="module")
def cached(probe, tmp_path_factory):
    out = tmp_path_factory.mktemp("acts") / "run"
    g3n.cache_dataset(probe, TEXTS, POINTS, out, batch_size=3, progress=False)
    return out


def _direct_rows(probe, key, stream=None):
    """Rows, texts and positions straight from traces of the shards' batches (texts 0-2, 3-5, 6-7)."""
    xs, texts, positions = [], [], []
    for start in range(0, len(TEXTS), 3):
        values = probe.cache(TEXTS[start:start + 3], [key], verbose=False)
        value, mask = values[key], values.attention_mask.bool()
        if value.dim() == 4:  # [S,B,T,D] → [B,T,S,D]: batch on dimension 1
            value = value.movedim(0, 2)
            value = value if stream is None else value[:, :, stream]
        xs.append(value[mask])
        b, t = mask.nonzero(as_tuple=True)
        texts.append(b + start)
        positions.append(mask.long().cumsum(1)[b, t] - 1)
    return torch.cat(xs), torch.cat(texts), torch.cat(positions)


@pytest.mark.parametrize("key, stream", [("layers.0.ple_out", None), ("layers.1.altup_predict", 2),
                                         ("layers.1.altup_predict", None), ("layers.2.output", 0)])
def test_rows_equal_a_direct_trace_with_padding_left_out(probe, cached, key, stream):
    ds = g3n.ActivationDataset(cached, key, stream=stream)
    x, texts, positions = _direct_rows(probe, key, stream)
    lengths = [len(ids) for ids in probe.tokenizer(TEXTS)["input_ids"]]
    assert len(ds) == sum(lengths) == len(x)  # every real token once, no padding
    batch = next(ds.batches(len(ds)))
    assert torch.equal(batch.x, x)
    assert torch.equal(batch.text, texts) and torch.equal(ds.text_index, texts)
    assert torch.equal(batch.position, positions)
    for i in (0, 5, len(ds) - 1, -1):  # random access agrees with the stream
        row = ds[i]
        assert torch.equal(row.x, x[i]) and int(row.text) == int(texts[i]) and int(row.position) == int(positions[i])
    assert ds.row_shape == tuple(x.shape[1:])
    for text, length in enumerate(lengths):  # positions run 0..len-1 within each text
        assert ds.positions[ds.text_index == text].tolist() == list(range(length))
        assert torch.equal(ds.tokens(text), torch.tensor(probe.tokenizer(TEXTS[text])["input_ids"]))


def test_stream_k_is_the_kth_column_of_all_streams(cached):
    every = g3n.ActivationDataset(cached, "layers.1.altup_predict")
    one = g3n.ActivationDataset(cached, "layers.1.altup_predict", stream=3)
    assert every[0].x.dim() == 2 and torch.equal(next(every.batches(10_000)).x[:, 3], next(one.batches(10_000)).x)


def test_batches_carry_rows_across_shards_and_shuffle_is_a_permutation(cached):
    ds = g3n.ActivationDataset(cached, "layers.0.ple_out")
    sizes = [len(b.x) for b in ds.batches(7)]
    assert sum(sizes) == len(ds) and all(s == 7 for s in sizes[:-1])
    assert sum(len(b.x) for b in ds.batches(7, drop_last=True)) == len(ds) // 7 * 7
    shuffled = torch.cat([b.x for b in ds.batches(7, shuffle=True, seed=3)])
    plain = next(ds.batches(len(ds))).x
    assert not torch.equal(shuffled, plain)
    assert torch.equal(shuffled.sort(0).values, plain.sort(0).values)


def test_dataloader_with_two_workers(cached):
    ds = g3n.ActivationDataset(cached, "layers.1.altup_predict", stream=1)
    plain = next(ds.batches(len(ds)))
    loaded = list(DataLoader(ds, batch_size=5, num_workers=2))
    assert torch.equal(torch.cat([b.x for b in loaded]), plain.x)
    assert torch.equal(torch.cat([b.text for b in loaded]), plain.text)
    streamed = list(DataLoader(ds.iterable(4), batch_size=None, num_workers=2))  # each worker its shards
    rows = torch.cat([b.x for b in streamed])
    assert len(rows) == len(ds) and torch.equal(rows.sort(0).values, plain.x.sort(0).values)


def test_a_run_with_positions(probe, tmp_path):
    out = tmp_path / "last"
    g3n.cache_dataset(probe, TEXTS, ["layers.0.ple_out"], out, batch_size=3, positions=[-2, -1], progress=False)
    ds = g3n.ActivationDataset(out, "layers.0.ple_out")
    lengths = [len(ids) for ids in probe.tokenizer(TEXTS)["input_ids"]]
    assert len(ds) == 2 * len(TEXTS)
    assert ds.positions.tolist() == [p for n in lengths for p in (n - 2, n - 1)]
    direct = probe.cache(TEXTS[:3], ["layers.0.ple_out"], verbose=False)["layers.0.ple_out"]
    assert torch.equal(next(ds.batches(6)).x, direct[:, -2:].reshape(6, -1))


def test_damaged_missing_and_foreign_shards_are_errors_naming_them(probe, cached, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cached, broken)
    shard = broken / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-000001.safetensors does not match its recorded digest"):
        g3n.ActivationDataset(broken, "layers.0.ple_out")
    g3n.ActivationDataset(broken, "layers.0.ple_out", verify=False)  # opting out reads it as it is
    shard.unlink()
    with pytest.raises(ValueError, match="shard-000001.safetensors missing"):
        g3n.ActivationDataset(broken, "layers.0.ple_out")
    other = tmp_path / "other"  # another run's shard 1 (other texts), with its record, in its place
    g3n.cache_dataset(probe, TEXTS[::-1], POINTS, other, batch_size=3, progress=False)
    for name in ("shard-000001.safetensors", "shard-000001.safetensors.json"):
        shutil.copy(other / name, broken / name)
    with pytest.raises(ValueError, match="shard-000001.safetensors was made by another run"):
        g3n.ActivationDataset(broken, "layers.0.ple_out")


def test_bad_arguments(cached, tmp_path):
    with pytest.raises(KeyError, match="'layers.3.mlp_out' is not cached .* holds layers.0.ple_out"):
        g3n.ActivationDataset(cached, "layers.3.mlp_out")
    with pytest.raises(ValueError, match="not a stream stack"):
        g3n.ActivationDataset(cached, "layers.0.ple_out", stream=1)
    with pytest.raises(ValueError, match="stream 7 out of range"):
        _ = g3n.ActivationDataset(cached, "layers.1.altup_predict", stream=7).row_shape
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        g3n.ActivationDataset(tmp_path, "layers.0.ple_out")
    edited = tmp_path / "edited"
    shutil.copytree(cached, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["texts"] = 5
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="was edited"):
        g3n.ActivationDataset(edited, "layers.0.ple_out")
    ds = g3n.ActivationDataset(cached, "layers.0.ple_out")
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]
    with pytest.raises(ValueError, match="batch_size"):
        ds.batches(0)


def test_torchrun_ranks_read_their_own_shards(tiny_dir, cached, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import json, pathlib, torch, torch.distributed as dist, g3n_probe as g3n
        dist.init_process_group("gloo")
        ds = g3n.ActivationDataset({str(cached)!r}, "layers.1.altup_predict", stream=0)
        rows = torch.cat([b.x for b in ds.batches(4)])
        dist.barrier()
        pathlib.Path({str(tmp_path)!r}, f"rank{{dist.get_rank()}}.json").write_text(json.dumps(
            {{"shards": ds.shards, "texts": ds.text_index.tolist(), "sum": float(rows.double().sum())}}))
        dist.destroy_process_group()
    """))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29637",
                           str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["shards"] == [0, 2] and ranks[1]["shards"] == [1]
    whole = g3n.ActivationDataset(cached, "layers.1.altup_predict", stream=0)
    assert sorted(ranks[0]["texts"] + ranks[1]["texts"]) == sorted(whole.text_index.tolist())
    assert set(ranks[1]["texts"]) == {3, 4, 5}
    total = float(next(whole.batches(len(whole))).x.double().sum())
    assert ranks[0]["sum"] + ranks[1]["sum"] == pytest.approx(total, rel=1e-12)
