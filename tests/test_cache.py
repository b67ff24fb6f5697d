"""Activation caches keyed by point names, and dataset shards (resume, refusal, torchrun)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import warnings

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
    from g3n_probe.activations import writer as cache_module

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

    from g3n_probe.activations.writer import weights_digest

    module = probe.hf_model
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
        other.hf_model.model.language_model.layers[5].mlp.down_proj.weight[0, 0] += 0.5
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
    from g3n_probe.activations import writer as cache_module

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


# ---- shards are bound to their run; the weights digest is a real hash -------------------------------------


def test_weights_digest_is_sha256_of_every_byte_in_any_layout():
    import hashlib

    from g3n_probe.activations.writer import weights_digest

    values = torch.arange(6, dtype=torch.float32).reshape(2, 3) - 2.5
    contiguous, strided = torch.nn.Module(), torch.nn.Module()
    contiguous.w = torch.nn.Parameter(values.clone())
    strided.w = torch.nn.Parameter(values.t().contiguous().t())  # the same values, column-major in memory
    for module in (contiguous, strided):
        module.register_buffer("steps", torch.tensor([1, -2], dtype=torch.int16))
    assert not strided.w.is_contiguous()
    expected = hashlib.sha256(b"w|torch.float32|(2, 3)|" + values.numpy().tobytes() + b";"
                              + b"steps|torch.int16|(2,)|" + torch.tensor([1, -2], dtype=torch.int16).numpy().tobytes()
                              + b";").hexdigest()
    assert weights_digest(contiguous) == expected
    assert weights_digest(strided, piece_bytes=5) == expected  # streamed 5 bytes at a time, a row at a time


def test_accelerator_tensors_stream_through_two_bounded_host_buffers():
    """The staging path an accelerator tensor takes (pinned buffers and events under CUDA), run here on
    host pieces: the buffers alternate, stay at their bound, and the bytes hashed are every byte in order."""
    import hashlib

    from g3n_probe.activations.writer import _byte_pieces, _HostStaging

    values = torch.randn(7, 13, generator=torch.Generator().manual_seed(0)).t()  # non-contiguous, 364 bytes
    staging, digest = _HostStaging(piece_bytes=24), hashlib.sha256()
    staging.hash(digest, torch.device("xpu"), _byte_pieces(values, 24))  # not CUDA: plain buffers, copies in order
    assert digest.hexdigest() == hashlib.sha256(values.contiguous().numpy().tobytes()).hexdigest()
    assert [b.numel() for b in staging.buffers[torch.device("xpu")]] == [24, 24]


def _flip_two_signs(module):
    """Flip the sign of one positive and one negative weight at odd indices: the old sum-of-words checksum's blind spot."""
    weight = module.model.language_model.layers[5].mlp.down_proj.weight
    flat = weight.detach().view(-1)
    odd = torch.arange(flat.numel()) % 2 == 1
    positive = int(((flat > 0) & odd).nonzero()[0])
    negative = int(((flat < 0) & odd).nonzero()[0])
    with torch.no_grad():
        flat[[positive, negative]] *= -1


def test_weights_digest_sees_two_flipped_signs(probe, tiny_dir, tmp_path):
    from g3n_probe.activations.writer import weights_digest

    other = g3n.load(tiny_dir)
    assert weights_digest(other.hf_model) == weights_digest(probe.hf_model)
    _flip_two_signs(other.hf_model)
    assert weights_digest(other.hf_model) != weights_digest(probe.hf_model)
    out = tmp_path / "acts"
    _run(probe, out)
    with pytest.raises(ValueError, match="the model's weights differ"):
        _run(other, out)


def test_the_attention_implementation_is_part_of_the_identity(probe, probe_eager, tmp_path):
    from g3n_probe.activations.writer import run_identity

    mine, eager = (run_identity(m, TEXTS, ["layers.1.ple_out"], 3, None, torch.float32) for m in (probe, probe_eager))
    assert (mine["attention"], eager["attention"]) == ("sdpa", "eager")
    assert {k for k in mine if mine[k] != eager[k]} == {"attention"}
    out = tmp_path / "acts"
    _run(probe, out)
    with pytest.raises(ValueError, match="the attention implementation differ"):
        _run(probe_eager, out)


def _contents(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_shards_without_a_manifest_are_never_adopted(probe, tiny_dir, tmp_path, monkeypatch):
    from g3n_probe.activations import writer as cache_module

    out = tmp_path / "acts"
    paths = _run(probe, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(json.loads(p.with_name(p.name + ".json").read_text())["run"] == manifest["run"] for p in paths)
    (out / "manifest.json").unlink()
    before = _contents(out)
    other = g3n.load(tiny_dir)
    _flip_two_signs(other.hf_model)
    with pytest.raises(ValueError, match=r"holds shards but no manifest.json, and they are not this run's: "
                                         r"shard-000000.safetensors \(made by another run\)"):
        _run(other, out)
    assert _contents(out) == before, "a refused run writes and removes nothing"

    calls = []
    real = cache_module.collect
    monkeypatch.setattr(cache_module, "collect", lambda *a, **k: calls.append(1) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(probe, out)  # the same run: every record names it, so each shard is verified and kept
    assert calls == [] and json.loads((out / "manifest.json").read_text()) == manifest

    (out / "manifest.json").unlink()
    paths[2].with_name(paths[2].name + ".json").unlink()
    with pytest.raises(ValueError, match=r"shard-000002.safetensors \(no readable record\)"):
        _run(probe, out)


@pytest.mark.parametrize("case", ["swapped with their records", "copied from a run on other texts",
                                  "record names another index", "record names other texts"])
def test_a_shard_bound_to_another_run_index_or_texts_is_recomputed(probe, tmp_path, case):
    reference = _run(probe, tmp_path / "reference")
    out = tmp_path / "acts"
    paths = _run(probe, out)
    records = [p.with_name(p.name + ".json") for p in paths]
    if case == "swapped with their records":
        for a, b in ((paths[0], paths[1]), (records[0], records[1])):
            data_a, data_b = a.read_bytes(), b.read_bytes()
            a.write_bytes(data_b)
            b.write_bytes(data_a)
        expected = [(paths[0].name, "is shard 1 by its record"), (paths[1].name, "is shard 0 by its record")]
    elif case == "copied from a run on other texts":
        others = _run(probe, tmp_path / "others", texts=TEXTS[::-1])
        paths[1].write_bytes(others[1].read_bytes())
        records[1].write_bytes(others[1].with_name(others[1].name + ".json").read_bytes())
        expected = [(paths[1].name, "was made by another run")]
    else:
        record = json.loads(records[1].read_text())
        record.update({"shard": 2} if case == "record names another index" else {"texts": [0, 3]})
        records[1].write_text(json.dumps(record))
        expected = [(paths[1].name, "is shard 2 by its record" if "index" in case else r"holds texts \[0, 3\]")]
    with pytest.warns(UserWarning) as caught:
        _run(probe, out)
    messages = [str(w.message) for w in caught]
    for name, why in expected:
        assert any(re.match(rf"{name} {why}.*recomputing it", m) for m in messages), (name, messages)
    assert len(messages) == len(expected)
    for ours, theirs in zip(paths, reference):
        mine, want = load_file(str(ours)), load_file(str(theirs))
        assert mine.keys() == want.keys() and all(torch.equal(mine[k], want[k]) for k in mine), ours.name


def test_positions_are_checked_against_every_shard_before_any_file_is_written(probe, tmp_path):
    lengths = [len(ids) for ids in probe.tokenizer(TEXTS)["input_ids"]]
    assert [max(lengths[i:i + 3]) for i in range(0, len(TEXTS), 3)] == [23, 19, 18]
    out = tmp_path / "acts"
    for bad in (20, -19):  # valid in shard 0, not in the later, shorter ones
        with pytest.raises(ValueError, match=rf"positions \[{bad}\] fall outside shard 2 \(texts 6..6, 18 tokens"
                                             r".*\[-18, 18\)"):
            _run(probe, out, positions=[0, bad])
        assert not out.exists()
    with pytest.warns(UserWarning, match="is padding"):  # the bounds themselves are accepted
        paths = _run(probe, out, positions=[17, -18])
    assert load_file(str(paths[2]))["layers.1.ple_out"].shape[1] == 2
