"""Activation caches keyed by point names, and dataset shards (resume, refusal, torchrun)."""

from __future__ import annotations

import json
import warnings
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import g3n_probe as g3n
from reference import capture

TEXTS = ["def f(x):\n    return x", "import os", "class A:\n    pass", "for i in range(3):", "x = [1, 2]", "print('hi')",
         "while True: break"]


def test_cache_values_match_reference(probe, stock, ids):
    values = probe.cache(ids, ["ple_tokens", "altup_predict", "layers.2.ple_out", "output", "logits"], layers=[1, 3])
    expected = capture(stock, ids)
    assert set(values) == {"ple_tokens", "layers.1.altup_predict", "layers.3.altup_predict", "layers.2.ple_out",
                           "layers.1.output", "layers.3.output", "logits"}
    for key, value in values.items():
        parts = key.split(".")
        name, layer = (parts[2], int(parts[1])) if len(parts) == 3 else (key, None)
        assert torch.equal(value, expected[(name, layer)]), key
    assert values.nbytes == sum(v.numel() * 4 for v in values.values())


def test_cache_positions_and_dtype(probe, stock, ids):
    values = probe.cache(ids, ["layers.0.altup_predict", "layers.0.mlp_act", "logits"], positions=[-1, 0],
                         dtype=torch.float16)
    expected = capture(stock, ids)
    assert values["layers.0.altup_predict"].shape == (4, 1, 2, 64)
    assert torch.equal(values["layers.0.altup_predict"], expected[("altup_predict", 0)][:, :, [-1, 0]].half())
    assert torch.equal(values["logits"], expected[("logits", None)][:, [-1, 0]].half())


def test_cache_states_size_and_refuses_over_max_bytes(probe, ids, capsys):
    with pytest.raises(MemoryError, match="max_bytes"):
        probe.cache(ids, ["altup_predict"], max_bytes=1000)
    assert "MiB" in capsys.readouterr().out


def test_cache_bad_names_and_layers(probe, ids):
    with pytest.raises(ValueError, match="valid names: .*altup_predict"):
        probe.cache(ids, ["altup_prediction"])
    with pytest.raises(ValueError, match="out of range"):
        probe.cache(ids, ["altup_predict"], layers=[99])
    with pytest.raises(ValueError, match="out of range"):
        probe.cache(ids, ["layers.12.ple_out"])
    with pytest.raises(ValueError, match="eager"):
        probe.cache(ids, ["attn_pattern"])
    with pytest.raises(ValueError, match="outside the sequence"):
        probe.cache(ids, ["logits"], positions=[100])


def test_cache_text_batch(probe):
    values = probe.cache(TEXTS[:3], ["layers.0.ple_out"])
    assert values["layers.0.ple_out"].shape[0] == 3
    assert values.attention_mask is not None and (values.attention_mask[:, -1] == 1).all()  # left padded


def test_cache_dataset_and_resume(probe, tmp_path, monkeypatch):
    out = tmp_path / "acts"
    paths = g3n.cache_dataset(probe, TEXTS, ["layers.1.altup_predict", "ple_out"], out, batch_size=3, layers=[0, 2],
                              progress=False)
    assert [p.name for p in paths] == ["shard-000000.safetensors", "shard-000001.safetensors", "shard-000002.safetensors"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["points"] == ["layers.0.ple_out", "layers.1.altup_predict", "layers.2.ple_out"]
    shard = load_file(str(paths[1]))
    direct = probe.cache(TEXTS[3:6], ["layers.1.altup_predict"], verbose=False)
    assert torch.equal(shard["layers.1.altup_predict"], direct["layers.1.altup_predict"])
    assert torch.equal(shard["input_ids"], direct.input_ids)

    paths[1].unlink()  # an interrupted run: one shard missing
    calls = []
    from g3n_probe import dataset as cache_module

    real = cache_module.collect
    monkeypatch.setattr(cache_module, "collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.warns(UserWarning, match="shard-000001.safetensors missing: recomputing it"):
        g3n.cache_dataset(probe, TEXTS, ["layers.1.altup_predict", "ple_out"], out, batch_size=3, layers=[0, 2],
                          progress=False)
    assert len(calls) == 1 and paths[1].exists()


def test_cache_dataset_refuses_a_different_cache(probe, tmp_path):
    out = tmp_path / "acts"
    g3n.cache_dataset(probe, TEXTS[:2], ["layers.0.ple_out"], out, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="points"):
        g3n.cache_dataset(probe, TEXTS[:2], ["layers.0.mlp_out"], out, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="texts"):
        g3n.cache_dataset(probe, TEXTS[:3], ["layers.0.ple_out"], out, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="no texts"):
        g3n.cache_dataset(probe, [], ["layers.0.ple_out"], tmp_path / "empty", progress=False)


def test_cache_dataset_under_torchrun(tiny_dir, tmp_path):
    out = tmp_path / "dist"
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import torch, torch.distributed as dist, g3n_probe as g3n
        model = g3n.load({str(tiny_dir)!r})
        texts = {TEXTS!r}
        paths = g3n.cache_dataset(model, texts, ["layers.1.ple_out"], {str(out)!r}, batch_size=2, progress=False)
        import json, pathlib
        pathlib.Path({str(tmp_path)!r}, f"rank{{dist.get_rank()}}.json").write_text(json.dumps([p.name for p in paths]))
        dist.destroy_process_group()
    """))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
                           str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "rank0.json").read_text()) == ["shard-000000.safetensors", "shard-000002.safetensors"]
    assert json.loads((tmp_path / "rank1.json").read_text()) == ["shard-000001.safetensors", "shard-000003.safetensors"]
    model = g3n.load(tiny_dir)
    for i in range(4):
        shard = load_file(str(out / f"shard-{i:06d}.safetensors"))
        direct = model.cache(TEXTS[2 * i:2 * i + 2], ["layers.1.ple_out"], verbose=False)
        assert torch.equal(shard["layers.1.ple_out"], direct["layers.1.ple_out"])


# ---- a cache directory identifies its model completely; shards are verified ----------------------------


def _run(model, out, texts=TEXTS, **kwargs):
    kwargs.setdefault("batch_size", 3)
    return g3n.cache_dataset(model, texts, ["layers.1.ple_out"], out, progress=False, **kwargs)


def test_weights_digest_sees_one_changed_weight(probe):
    import copy

    from g3n_probe.dataset import weights_digest

    module = probe._module
    clone = copy.deepcopy(module)
    assert weights_digest(clone) == weights_digest(module)
    with torch.no_grad():
        clone.model.language_model.layers[5].mlp.down_proj.weight[7, 3] += 1e-3
    assert weights_digest(clone) != weights_digest(module)
    swapped = copy.deepcopy(module)
    with torch.no_grad():
        weight = swapped.model.language_model.layers[5].mlp.down_proj.weight
        weight[[0, 1]] = weight[[1, 0]].clone()
    assert weights_digest(swapped) != weights_digest(module)


def test_resume_refuses_another_model_naming_what_differs(probe, tiny_dir, tmp_path):
    out = tmp_path / "acts"
    _run(probe, out)
    other = g3n.load(tiny_dir)
    with torch.no_grad():
        other._module.model.language_model.layers[5].mlp.down_proj.weight[0, 0] += 0.5
    with pytest.raises(ValueError, match="the model's weights differ"):
        _run(other, out)
    with pytest.raises(ValueError, match="the positions"):
        _run(probe, out, positions=[-1])
    with pytest.raises(ValueError, match="the dtype"):
        _run(probe, out, dtype=torch.bfloat16)


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign", "no record", "deleted"])
def test_damaged_shards_are_recomputed_never_counted_as_done(probe, tmp_path, damage):
    from safetensors.torch import save_file

    reference = _run(probe, tmp_path / "reference")
    out = tmp_path / "acts"
    paths = _run(probe, out)
    victim = paths[1]
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-100])
    elif damage == "empty":
        victim.write_bytes(b"")
    elif damage == "foreign":
        save_file({"layers.1.ple_out": torch.zeros(3, 4, 64)}, str(victim))
    elif damage == "no record":
        victim.with_name(victim.name + ".json").unlink()
    else:
        victim.unlink()
    with pytest.warns(UserWarning, match=rf"{victim.name} .*recomputing it"):
        _run(probe, out)
    for ours, theirs in zip(paths, reference):
        assert load_file(str(ours)).keys() == load_file(str(theirs)).keys()
        for key, value in load_file(str(ours)).items():
            assert torch.equal(value, load_file(str(theirs))[key]), (ours.name, key)


def test_leftover_temporary_files_are_removed(probe, tmp_path):
    out = tmp_path / "acts"
    _run(probe, out)
    leftovers = [out / ".shard-000001.safetensors.abc123.tmp", out / ".manifest.json.xyz.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"partial")
    _run(probe, out)
    assert not any(leftover.exists() for leftover in leftovers)


@pytest.mark.parametrize("texts,batch_size,error", [
    ("one long string", 2, "texts must be a list of strings"),
    ([], 2, "texts is empty"),
    (["fine", 3], 2, "entries \\[1\\]"),
    (TEXTS, -1, "batch_size must be a positive integer"),
    (TEXTS, 0, "batch_size must be a positive integer"),
    (TEXTS, True, "batch_size must be a positive integer"),
])
def test_bad_arguments_fail_before_any_file_is_written(probe, tmp_path, texts, batch_size, error):
    out = tmp_path / "acts"
    with pytest.raises((TypeError, ValueError), match=error):
        g3n.cache_dataset(probe, texts, ["layers.1.ple_out"], out, batch_size=batch_size, progress=False)
    assert not out.exists()


def test_a_run_failing_before_its_first_shard_leaves_the_directory_as_found(probe, tmp_path, monkeypatch):
    from g3n_probe import dataset as cache_module

    out = tmp_path / "acts"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(cache_module, "collect", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        _run(probe, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    monkeypatch.undo()
    paths = _run(probe, out, batch_size=2)  # the corrected rerun is not refused as "a different cache"
    assert all(p.exists() for p in paths)


def test_resume_refuses_another_tokenizer(probe, tiny_dir, tmp_path):
    out = tmp_path / "acts"
    _run(probe, out)
    other = g3n.load(tiny_dir)
    other.tokenizer.add_tokens(["<g3n_extra>"])
    with pytest.raises(ValueError, match="the tokenizer differ"):
        _run(other, out)


def test_the_run_states_the_bytes_it_will_write(probe, tmp_path, capsys):
    import re

    out = tmp_path / "acts"
    paths = g3n.cache_dataset(probe, TEXTS, ["altup_predict", "layers.2.ple_out"], out, batch_size=3)
    stated = re.search(r"3 shard\(s\) of up to 3 texts to write, ([\d.,]+) MiB", capsys.readouterr().out)
    assert stated, "no size estimate printed"
    written = sum(p.stat().st_size for p in paths) / 1024**2
    assert abs(float(stated.group(1).replace(",", "")) - written) <= 0.02 * written + 0.05


def test_positions_that_are_padding_in_some_row_warn(probe):
    with pytest.warns(UserWarning, match=r"positions 0 is padding in rows \[1\].*count positions from the end"):
        probe.cache(["def f(x):\n    return x", "import os"], ["layers.0.ple_out"], positions=[0], verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe.cache(["def f(x):\n    return x", "import os"], ["layers.0.ple_out"], positions=[-1], verbose=False)
