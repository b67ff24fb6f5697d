"""Text-only loading: stock class, no tower read or allocated, exact logits, clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import g3n_probe as g3n
from g3n_probe.checkpoint import CheckpointError
from g3n_probe.loading import load_text_model
from reference import stock_forward


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_stock_class_text_only(probe):
    from transformers import Gemma3nForConditionalGeneration

    from g3n_probe.checkpoint.towers import TowerStub

    module = probe.hf_model
    assert type(module) is Gemma3nForConditionalGeneration
    assert isinstance(module.model.vision_tower, TowerStub)
    assert isinstance(module.model.audio_tower, TowerStub)
    assert not any(True for _ in module.model.vision_tower.parameters())
    assert not any(True for _ in module.model.audio_tower.parameters())
    assert all(not name.startswith(("model.vision_tower", "model.audio_tower")) for name, _ in module.named_parameters())
    assert module.lm_head.weight is module.model.language_model.embed_tokens.weight
    assert not module.training


def test_state_dict_keys_are_the_checkpoint_text_keys(probe, tiny_dir):
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())["weight_map"]
    shared = {i for i, m in enumerate(probe.text_config.kv_sharing_modes) if m == "reuse"}
    text_keys = {
        k for k in index
        if k.startswith(("model.language_model.", "model.embed_vision.", "model.embed_audio."))
        and not any(k.startswith(f"model.language_model.layers.{i}.self_attn.{n}") for i in shared for n in ("k_", "v_"))
    }
    assert set(probe.hf_model.state_dict()) - {"lm_head.weight"} == text_keys


def test_logits_equal_stock_for_vision_and_audio_range_ids(probe, stock, ids):
    vocab_text = probe.text_config.vocab_size_per_layer_input
    assert (ids >= vocab_text).any() and (ids >= vocab_text + 16).any()
    with probe.trace(ids):
        logits = probe.logits.output.save()
    assert torch.equal(logits, stock_forward(stock, ids).logits)
    with torch.no_grad():
        plain = probe.hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(plain, logits)


def test_string_trace(probe):
    with probe.trace("def add(a, b):\n    return a + b"):
        logits = probe.logits.output.save()
    assert logits.shape[:2] == (1, len(probe.tokenizer("def add(a, b):\n    return a + b")["input_ids"]))


def test_no_timm_no_pil_and_no_tower_tensor_read(tiny_dir, tmp_path):
    """In a fresh interpreter where importing timm or PIL fails, the tiny checkpoint loads with its
    tower shards deleted, and neither module is imported."""
    ckpt = _copy(tiny_dir, tmp_path / "ckpt")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    tower_files = {f for k, f in index.items() if k.startswith(("model.vision_tower.", "model.audio_tower."))}
    text_files = {f for k, f in index.items() if not k.startswith(("model.vision_tower.", "model.audio_tower."))}
    assert tower_files and not (tower_files & text_files)
    for name in tower_files:
        (ckpt / name).unlink()
    script = textwrap.dedent(
        f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split('.')[0] in ('timm', 'PIL', 'torchvision'):
                    raise ImportError('blocked: ' + name)
        sys.meta_path.insert(0, Block())
        import torch, g3n_probe as g3n
        model = g3n.load({str(ckpt)!r})
        with model.trace(torch.tensor([[2, 40, 41, 512, 530]])):
            logits = model.logits.output.save()
        r = model.load_report
        assert not any(m.split('.')[0] in ('timm', 'PIL', 'torchvision') for m in sys.modules), 'tower deps imported'
        tower = [k for k in model.hf_model.state_dict() if 'tower' in k]
        assert not tower, tower
        print('OK', r.tensors_read, r.bytes_read, ','.join(r.files_opened))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _, count, nbytes, files = done.stdout.split()[-4:]
    expected = len(g3n.load(tiny_dir).hf_model.state_dict()) - 1  # lm_head is tied, not read
    assert int(count) == expected
    assert set(files.split(",")) == text_files


def test_load_report_counts_only_text_tensors(probe, tiny_dir):
    r = probe.load_report
    assert r.tower_tensors_in_checkpoint["audio"] > 0 and r.tower_tensors_in_checkpoint["vision"] > 0
    assert r.tensors_read == len(probe.hf_model.state_dict()) - 1
    params = sum(p.numel() * p.element_size() for p in probe.hf_model.parameters())
    assert r.bytes_read == params
    assert len(r.skipped_kv_shared) == 2 * 3  # two reuse layers x (k_proj, v_proj, k_norm)


def test_load_audio_tower_matches_stock(tiny_dir):
    model = g3n.load(tiny_dir)
    tower = model.load_tower("audio")
    assert sum(p.numel() for p in tower.parameters()) > 0
    from reference import build_stock

    stock = build_stock(tiny_dir)
    features = torch.randn(1, 64, stock.config.audio_config.input_feat_size, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 64, dtype=torch.bool)
    with torch.no_grad():
        ours = tower(features, mask).last_hidden_state
        theirs = stock.model.audio_tower(features, mask).last_hidden_state
    assert torch.equal(ours, theirs)
    assert model.model.audio_tower._module is tower
    with model.trace(torch.tensor([[2, 5, 6]])):
        logits = model.logits.output.save()
    assert logits.shape == (1, 3, model.text_config.vocab_size)


def test_unloaded_towers_say_how_to_load(probe):
    with pytest.raises(g3n.TowerNotLoadedError, match=r"load_tower\('audio'\)"):
        probe.hf_model.model.audio_tower(torch.zeros(1, 4, 16), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(g3n.TowerNotLoadedError, match="towers"):
        probe.hf_model.model.vision_tower(torch.zeros(1, 3, 8, 8))


def test_vision_tower_needs_the_towers_extra(tiny_dir):
    import importlib.util

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here")
    model = g3n.load(tiny_dir)
    with pytest.raises(g3n.TowerNotLoadedError, match="towers"):
        model.load_tower("vision")
    with pytest.raises(ValueError, match="unknown tower"):
        model.load_tower("lidar")


def test_tower_stub_keeps_config_and_locations(probe, tiny_dir):
    stub = probe.hf_model.model.audio_tower
    assert stub.config.model_type == "gemma3n_audio"
    assert stub.checkpoint_dir == tiny_dir
    assert all(k.startswith("model.audio_tower.") for k in stub.tensor_files)


def test_stubs_work_for_positional_and_keyword_config():
    from transformers.models.gemma3n import modeling_gemma3n

    from g3n_probe.checkpoint.synthetic import preset_config
    from g3n_probe.checkpoint.towers import TowerStub, tower_stubs

    config = preset_config("tiny")
    with tower_stubs():
        assert isinstance(modeling_gemma3n.AutoModel.from_config(config.audio_config), TowerStub)
        assert isinstance(modeling_gemma3n.AutoModel.from_config(config=config.vision_config), TowerStub)
        assert not isinstance(modeling_gemma3n.AutoModel.from_config(config=config.text_config), TowerStub)
    assert modeling_gemma3n.AutoModel.__name__ == "AutoModel"


def test_defaults_on_cpu(probe):
    assert probe.hf_model.device.type == "cpu"
    assert probe.hf_model.dtype == torch.float32


def test_bfloat16_load(tiny_dir):
    model = g3n.load(tiny_dir, dtype=torch.bfloat16)
    assert model.hf_model.dtype == torch.bfloat16
    with model.trace(torch.tensor([[2, 5, 6]])):
        logits = model.logits.output.save()
    assert logits.dtype == torch.bfloat16


def test_ple_device_other_than_the_model_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="ple_device"):
        g3n.load(tiny_dir, ple_device="meta")


# ---- bad checkpoints ----


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        g3n.load(tmp_path / "nope")


def test_hub_id_not_in_cache_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="Hugging Face cache") as error:
        g3n.load("google/gemma-3n-E2B")
    assert str(tmp_path / "hf") in str(error.value)


def test_hub_id_resolves_through_the_cache(tiny_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    snapshot = cache / "models--someone--tiny-g3n" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir, snapshot)
    (cache / "models--someone--tiny-g3n" / "refs").mkdir()
    (cache / "models--someone--tiny-g3n" / "refs" / "main").write_text("0" * 40)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = g3n.load("someone/tiny-g3n")
    assert model.load_report.source == snapshot


def test_config_that_is_not_gemma3n(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path / "c")
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type='llama'"):
        g3n.load(ckpt)


def test_config_without_altup(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path / "c")
    config = json.loads((ckpt / "config.json").read_text())
    for key in ("altup_num_inputs", "hidden_size_per_layer_input"):
        config["text_config"].pop(key)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="AltUp"):
        g3n.load(ckpt)


def test_missing_config(tmp_path):
    (tmp_path / "c").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        g3n.load(tmp_path / "c")


def test_garbled_config(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path / "c")
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        g3n.load(ckpt)


def _text_shard(ckpt: Path) -> Path:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    return ckpt / index["model.language_model.embed_tokens.weight"]


def test_truncated_safetensors(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path / "c")
    shard = _text_shard(ckpt)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        g3n.load(ckpt)


def test_corrupt_safetensors_header(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path / "c")
    shard = _text_shard(ckpt)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage-header}" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        g3n.load(ckpt)


def test_missing_text_tensor_is_named(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path / "c")
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"]["model.language_model.layers.2.laurel.linear_left.weight"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model.language_model.layers.2.laurel.linear_left.weight"):
        g3n.load(ckpt)


def test_unexpected_text_tensor_is_named(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path / "c")
    extra = ckpt / "extra.safetensors"
    save_file({"model.language_model.layers.0.surprise.weight": torch.zeros(2)}, str(extra))
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.language_model.layers.0.surprise.weight"] = extra.name
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="surprise"):
        g3n.load(ckpt)


def test_shape_mismatch_is_named(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path / "c")
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["laurel_rank"] = 4
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"laurel.linear_left.weight.*shape"):
        g3n.load(ckpt)


def test_pickle_only_checkpoint_is_refused_unopened(tiny_dir, tmp_path, monkeypatch):
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    shutil.copy(tiny_dir / "config.json", ckpt / "config.json")
    (ckpt / "pytorch_model.bin").write_bytes(b"not even a pickle")
    import pickle

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(CheckpointError, match="never unpickles"):
        g3n.load(ckpt)


def test_no_weights_at_all(tiny_dir, tmp_path):
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    shutil.copy(tiny_dir / "config.json", ckpt / "config.json")
    with pytest.raises(CheckpointError, match="no safetensors"):
        g3n.load(ckpt)


def test_single_file_checkpoint(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "c"
    ckpt.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, ckpt / name)
    state = {}
    for shard in tiny_dir.glob("*.safetensors"):
        state.update(load_file(shard))
    save_file(state, str(ckpt / "model.safetensors"))
    model, report = load_text_model(ckpt)
    assert report.files_opened == ["model.safetensors"]


def test_missing_text_shard(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path / "c")
    shard = _text_shard(ckpt)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name} is missing"):
        g3n.load(ckpt)


# ---- every bad input is named before anything is built --------------------------------------------


def _edit_index(ckpt: Path, edit) -> None:
    index_file = ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    edit(index)
    index_file.write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_index_entries_outside_the_checkpoint_are_refused(tiny_dir, tmp_path, where):
    ckpt = _copy(tiny_dir, tmp_path / "c")
    shard = _text_shard(ckpt)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(shard, outside)
    target = str(outside) if where == "absolute" else "../elsewhere.safetensors"
    key = "model.language_model.embed_tokens.weight"
    _edit_index(ckpt, lambda index: index["weight_map"].__setitem__(key, target))
    with pytest.raises(CheckpointError, match="points outside the checkpoint directory"):
        g3n.load(ckpt)


@pytest.mark.parametrize("weight_map,message", [
    (["a", "b"], "weight_map must map tensor names to shard files; got a list"),
    ({"model.language_model.norm.weight": 3}, r"weight_map\['model.language_model.norm.weight'\] must be a shard file name"),
])
def test_malformed_weight_maps_are_named(tiny_dir, tmp_path, weight_map, message):
    ckpt = _copy(tiny_dir, tmp_path / "c")
    _edit_index(ckpt, lambda index: index.__setitem__("weight_map", weight_map))
    with pytest.raises(CheckpointError, match=message):
        g3n.load(ckpt)


@pytest.mark.parametrize("key,value,message", [
    ("num_hidden_layers", 20000, "num_hidden_layers is 20000"),
    ("num_hidden_layers", 7, "declares num_hidden_layers=7, but the weights hold layers 0..5"),
    ("hidden_size", -64, "hidden_size must be a positive integer"),
    ("altup_active_idx", 9, "altup_active_idx is 9"),
    ("intermediate_size", [64, 64], "intermediate_size has 2 entries"),
    ("num_kv_shared_layers", 6, "num_kv_shared_layers is 6"),
])
def test_insane_configs_are_refused_naming_file_and_key(tiny_dir, tmp_path, monkeypatch, key, value, message):
    from g3n_probe import loading

    def no_skeleton(config):
        raise AssertionError("a model skeleton was built before the config was refused")

    monkeypatch.setattr(loading, "expected_text_shapes", no_skeleton)  # 20000 layers once took 211 s to build
    ckpt = _copy(tiny_dir, tmp_path / "c")
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"][key] = value
    if key == "num_hidden_layers" and value == 7:
        for per_layer in ("layer_types", "intermediate_size", "activation_sparsity_pattern"):
            config["text_config"][per_layer] = config["text_config"][per_layer] + config["text_config"][per_layer][-1:]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as raised:
        g3n.load(ckpt)
    assert "config.json" in str(raised.value) or "declares" in str(raised.value)


@pytest.mark.parametrize("content,message", [("{}", "not a tokenizer definition"), ("{not json", "not valid JSON")])
def test_broken_tokenizer_files_are_named(tiny_dir, tmp_path, content, message):
    ckpt = _copy(tiny_dir, tmp_path / "c")
    (ckpt / "tokenizer.json").write_text(content)
    with pytest.raises(CheckpointError, match=rf"tokenizer.json.*{message}|{message}"):
        g3n.load(ckpt)


def test_integer_stored_weights_are_refused_not_cast(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path / "c")
    shard = _text_shard(ckpt)
    from safetensors.torch import load_file

    tensors = load_file(str(shard))
    key = "model.language_model.embed_tokens.weight"
    tensors[key] = tensors[key].to(torch.int64)
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=rf"{key} in .* is stored as I64.*refusing to cast"):
        g3n.load(ckpt)


@pytest.mark.parametrize("kwargs,message", [
    ({"device": "meta"}, "device='meta' is not supported: g3n_probe loads onto cpu, cuda"),
    ({"device": "mps"}, "device='mps' is not supported"),
    ({"device": "xpu"}, "device='xpu' is not supported"),
    ({"device": "gpu"}, "device='gpu' is not a device"),
    ({"dtype": torch.float8_e4m3fn}, "not supported: choose one of float32, bfloat16, float16"),
    ({"dtype": "int8"}, "not supported: choose one of"),
    ({"dtype": "nonsense"}, "not supported: choose one of"),
])
def test_unsupported_devices_and_dtypes_list_the_supported_ones(tiny_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        g3n.load(tiny_dir, **kwargs)
