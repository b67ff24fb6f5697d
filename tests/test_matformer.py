"""MatFormer sub-models: slices of the parent, bit-equal to a model loaded from the sliced checkpoint."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import g3n_probe as g3n
from g3n_probe.analysis.matformer import submodel_config
from g3n_probe.checkpoint.synthetic import preset_config


def e4b_like():
    """E4B's layout scaled down: 10 layers (4 sliding + 1 full, twice), the last 5 reuse K/V
    (store layers 3 and 4), sparse early layers."""
    config = preset_config("tiny")
    text = config.text_config
    text.num_hidden_layers = 10
    text.layer_types = ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(10)]
    text.intermediate_size = [128] * 10
    text.activation_sparsity_pattern = [0.95] * 3 + [0.0] * 7
    text.num_kv_shared_layers = 5
    return config


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory):
    return g3n.synthetic.save_checkpoint(tmp_path_factory.mktemp("e4blike"), e4b_like(), seed=1)


def _slice_checkpoint_by_hand(parent_dir, out, skip, width):
    """An independent slicing of the checkpoint files (the reference for the sub-model)."""
    index = json.loads((parent_dir / "model.safetensors.index.json").read_text())["weight_map"]
    config = json.loads((parent_dir / "config.json").read_text())
    text = config["text_config"]
    n, p = text["num_hidden_layers"], text["hidden_size_per_layer_input"]
    kept = [i for i in range(n) if i not in skip]
    tensors = {}
    for key, filename in index.items():
        if not key.startswith(("model.language_model", "model.embed_")):
            continue
        with safe_open(str(parent_dir / filename), framework="pt") as f:
            t = f.get_tensor(key)
        if key.startswith("model.language_model.layers."):
            layer, rest = key.split(".")[3], ".".join(key.split(".")[4:])
            if int(layer) in skip:
                continue
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                t = t[:width]
            if rest == "mlp.down_proj.weight":
                t = t[:, :width]
            key = f"model.language_model.layers.{kept.index(int(layer))}.{rest}"
        if key.endswith("embed_tokens_per_layer.weight"):
            t = t.reshape(t.shape[0], n, p)[:, kept].reshape(t.shape[0], -1)
        if key.endswith("per_layer_model_projection.weight"):
            t = t.reshape(n, p, -1)[kept].reshape(len(kept) * p, -1)
        tensors[key] = t.contiguous()
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    text["num_hidden_layers"] = len(kept)
    text["layer_types"] = [text["layer_types"][i] for i in kept]
    text["intermediate_size"] = [width] * len(kept)
    text["activation_sparsity_pattern"] = [text["activation_sparsity_pattern"][i] for i in kept]
    text["num_kv_shared_layers"] = text["num_kv_shared_layers"] - len(skip)
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((parent_dir / name).read_bytes())
    return out


def test_submodel_equals_the_sliced_checkpoint(parent_dir, tmp_path):
    skip, width = [5, 6], 96
    parent = g3n.load(parent_dir)
    sub = g3n.matformer.submodel(parent, layers_to_skip=skip, ffn_widths=width)
    reference = g3n.load(_slice_checkpoint_by_hand(parent_dir, tmp_path / "sliced", skip, width))
    ids = torch.tensor([[2, 40, 41, 300, 512, 530, 9, 10, 11, 12, 13]])
    with sub.trace(ids):
        mlp = sub.layers[1].mlp_act.output.save()
        logits = sub.logits.output.save()
    with reference.trace(ids):
        expected = reference.logits.output.save()
    assert mlp.shape[-1] == width
    assert torch.equal(logits, expected)
    for (ka, va), (kb, vb) in zip(sorted(sub.hf_model.state_dict().items()), sorted(reference.hf_model.state_dict().items())):
        assert ka == kb and torch.equal(va, vb), ka
    kv = sub.text_config.kv_sharing_modes
    assert kv == ["store" if i in (3, 4) else None for i in range(5)] + ["reuse"] * 3
    # The parent is untouched.
    assert parent.text_config.num_hidden_layers == 10


def test_save_and_reload(parent_dir, tmp_path):
    parent = g3n.load(parent_dir)
    sub = g3n.matformer.submodel(parent, layers_to_skip=[7], ffn_widths=64)
    path = g3n.matformer.save(sub, tmp_path / "sub")
    again = g3n.load(path)
    ids = torch.tensor([[2, 5, 6, 7]])
    with sub.trace(ids):
        a = sub.logits.output.save()
    with again.trace(ids):
        b = again.logits.output.save()
    assert torch.equal(a, b)
    with pytest.raises(g3n.TowerNotLoadedError, match="no audio tower"):
        again.load_tower("audio")


def test_sparse_layers_are_sliced_not_masked(parent_dir):
    parent = g3n.load(parent_dir)
    sub = g3n.matformer.submodel(parent, ffn_widths=64)
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    with sub.trace(ids):
        gate = sub.layers[0].mlp_gate.output.save()
    # The gaussian top-k cut-off is computed over the sub-model's 64 units: about 5% survive.
    assert gate.shape[-1] == 64
    with parent.trace(ids):
        parent_gate = parent.layers[0].mlp_gate.output.save()
    assert not torch.equal(gate, parent_gate[..., :64])


def test_skipping_a_store_layer_is_refused(parent_dir):
    parent = g3n.load(parent_dir)
    with pytest.raises(ValueError, match=r"KV 'store' layers"):
        g3n.matformer.submodel(parent, layers_to_skip=[3])


def test_bad_arguments(parent_dir):
    parent = g3n.load(parent_dir)
    with pytest.raises(ValueError, match="out of range"):
        g3n.matformer.submodel(parent, layers_to_skip=[10])
    with pytest.raises(ValueError, match="FFN width"):
        g3n.matformer.submodel(parent, ffn_widths=1000)
    with pytest.raises(ValueError, match="E4B-shaped"):
        g3n.matformer.submodel(parent, preset="e2b")


def test_e2b_preset_is_e2b_inside_e4b():
    e4b, e2b = preset_config("e4b"), preset_config("e2b")
    spec = g3n.matformer.PRESETS["e2b"]
    sub, kept = submodel_config(e4b, spec["layers_to_skip"], spec["ffn_width"])
    a, b = sub.text_config, e2b.text_config
    assert kept == list(range(20)) + list(range(25, 35))
    for field in ("num_hidden_layers", "layer_types", "intermediate_size", "activation_sparsity_pattern",
                  "num_kv_shared_layers"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.kv_sharing_modes == b.kv_sharing_modes
    assert [i for i, m in enumerate(a.kv_sharing_modes) if m == "store"] == [18, 19]
    assert copy.deepcopy(e4b).text_config.num_hidden_layers == 35
