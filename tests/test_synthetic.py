"""Synthetic checkpoints: real layout, non-vacuous weights, real shapes for e2b/e4b (on meta)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

import g3n_probe as g3n
from g3n_probe.checkpoint.synthetic import _checkpoint_shapes, build_tokenizer, preset_config
from g3n_probe.checkpoint.towers import tower_stubs


def test_files_and_index(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert all((tiny_dir / s).exists() for s in shards)
    assert all(s.startswith("model-") and s.endswith(".safetensors") for s in shards)
    total = 0
    for shard in shards:
        with safe_open(str(tiny_dir / shard), framework="pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == shard
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total


def test_no_parameter_is_zero(tiny_dir):
    """HF zero-initialises altup.correct_output_scale; with zeros the PLE would vanish and PLE
    tests would pass vacuously."""
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())["weight_map"]
    seen = 0
    for shard in set(index.values()):
        with safe_open(str(tiny_dir / shard), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.is_floating_point():
                    assert (t != 0).all(), key
                seen += "correct_output_scale" in key
    assert seen == 6


def test_tiny_has_every_mechanism():
    text = preset_config("tiny").text_config
    assert set(text.layer_types) == {"sliding_attention", "full_attention"}
    assert "store" in text.kv_sharing_modes and "reuse" in text.kv_sharing_modes
    assert any(s > 0 for s in text.activation_sparsity_pattern) and any(s == 0 for s in text.activation_sparsity_pattern)
    assert len(set(text.intermediate_size)) > 1
    assert text.altup_num_inputs == 4


def test_tiny_vocabulary_layout():
    config = preset_config("tiny")
    text = config.text_config
    assert config.vision_config.vocab_offset == text.vocab_size_per_layer_input
    assert config.audio_config.vocab_offset == config.vision_config.vocab_offset + config.vision_config.vocab_size
    assert text.vocab_size == config.audio_config.vocab_offset + config.audio_config.vocab_size
    assert config.eoi_token_id == config.vision_config.vocab_offset
    assert config.image_token_id == config.eoi_token_id + 1
    assert config.eoa_token_id == config.audio_config.vocab_offset
    assert config.audio_token_id == config.eoa_token_id + 1
    assert config.boi_token_id < text.vocab_size_per_layer_input and config.boa_token_id < text.vocab_size_per_layer_input


@pytest.mark.parametrize("preset", ["tiny", "e2b"])
def test_tokenizer_special_ids(preset):
    config = preset_config(preset)
    tok = build_tokenizer(config)
    ids = tok.convert_tokens_to_ids
    assert (ids("<pad>"), ids("<eos>"), ids("<bos>")) == (0, 1, 2)
    assert (ids("<start_of_turn>"), ids("<end_of_turn>")) == (105, 106)
    assert ids("<start_of_image>") == config.boi_token_id and ids("<end_of_image>") == config.eoi_token_id
    assert ids("<image_soft_token>") == config.image_token_id
    assert ids("<start_of_audio>") == config.boa_token_id and ids("<end_of_audio>") == config.eoa_token_id
    assert ids("<audio_soft_token>") == config.audio_token_id
    assert len(tok) == config.text_config.vocab_size
    text = "def f(x):\n    return x  # ünïcode"
    encoded = tok(text)["input_ids"]
    assert encoded[0] == 2
    assert tok.decode(encoded, skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_real_ids_in_e2b():
    config = preset_config("e2b")
    assert (config.boi_token_id, config.boa_token_id, config.eoi_token_id, config.image_token_id,
            config.eoa_token_id, config.audio_token_id) == (255_999, 256_000, 262_144, 262_145, 262_272, 262_273)


@pytest.mark.parametrize(
    "preset, language_model, table, layers",
    [("e2b", 4_435_182_688, 2_013_265_920, 30), ("e4b", 6_835_235_568, 2_348_810_240, 35)],
)
def test_real_shapes_on_meta(preset, language_model, table, layers):
    from transformers import Gemma3nForConditionalGeneration

    config = preset_config(preset)
    with tower_stubs(), torch.device("meta"):
        model = Gemma3nForConditionalGeneration(config)
    lm = model.model.language_model
    assert sum(p.numel() for p in lm.parameters()) == language_model
    assert lm.embed_tokens_per_layer.weight.numel() == table
    assert lm.embed_tokens.weight.numel() == 537_395_200
    assert config.text_config.num_hidden_layers == layers
    assert [i for i, m in enumerate(config.text_config.kv_sharing_modes) if m == "store"] == [18, 19]
    shapes = _checkpoint_shapes(config, preset)
    towers = {kind: sum(math.prod(s) for k, (s, _) in shapes.items() if k.startswith(f"model.{kind}_tower."))
              for kind in ("vision", "audio")}
    assert towers == {"vision": 294_126_912, "audio": 681_348_640}


def test_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'e8b'"):
        g3n.synthetic.save_checkpoint(tmp_path, "e8b")


def test_seed_is_reproducible(tmp_path):
    a = g3n.synthetic.save_checkpoint(tmp_path / "a", "tiny", seed=3)
    b = g3n.synthetic.save_checkpoint(tmp_path / "b", "tiny", seed=3)
    shards = sorted(a.glob("*.safetensors"))
    assert len(shards) >= 2, "the tiny preset writes several shards"
    for shard in shards:
        assert shard.read_bytes() == (b / shard.name).read_bytes()
    c = g3n.synthetic.save_checkpoint(tmp_path / "c", "tiny", seed=4)
    assert any(shard.read_bytes() != (c / shard.name).read_bytes() for shard in shards), "the seed changes the weights"


@pytest.mark.parametrize("preset,limit_gib", [("e2b", 4.6), ("e4b", 8.5)])
def test_accelerator_footprint_plan_for_the_real_shapes(preset, limit_gib):
    """`g3n-probe info --device cuda`'s plan, on the meta device: what the GPU holds, what the host holds."""
    import torch

    from g3n_probe.checkpoint.synthetic import preset_config
    from g3n_probe.loading import footprint

    plan = footprint(preset_config(preset), device="cuda", dtype=torch.bfloat16)
    on_gpu = sum(c["bytes"] for c in plan.values() if c["where"] == "accelerator")
    on_host = sum(c["bytes"] for c in plan.values() if c["where"] == "host")
    assert on_gpu <= limit_gib * 1024**3, f"{on_gpu / 1024**3:.3f} GiB on the accelerator"
    assert plan["per-layer table"]["where"] == "host"
    assert plan["vision tower"]["bytes"] == plan["audio tower"]["bytes"] == 0
    table = preset_config(preset).get_text_config()
    assert plan["per-layer table"]["params"] == table.vocab_size_per_layer_input * table.num_hidden_layers * 256
    assert on_host >= plan["per-layer table"]["params"] * 2
