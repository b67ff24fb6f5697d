"""KV sharing is visible: a write to a store layer's keys reaches the layers that reuse them."""

from __future__ import annotations

import torch


def test_store_layer_key_write_reaches_reuse_layer(probe_eager, ids):
    text = probe_eager.text_config
    store, reuse = 3, 4
    assert text.kv_sharing_modes[store] == "store" and text.kv_sharing_modes[reuse] == "reuse"
    assert text.layer_types[store] == text.layer_types[reuse]
    with probe_eager.trace(ids):
        before = probe_eager.layers[reuse].attn_pattern.output.save()
    with probe_eager.trace(ids):
        probe_eager.model.language_model.layers[store].self_attn.k_norm.output[:] = 0
        store_pattern = probe_eager.layers[store].attn_pattern.output.save()
        after = probe_eager.layers[reuse].attn_pattern.output.save()
    assert not torch.equal(before, after)
    # Zero keys give zero scores: every query attends uniformly over the keys its mask allows,
    # in the store layer and in the reuse layer that reads the same K/V.
    for pattern in (store_pattern, after):
        allowed = pattern > 0
        counts = allowed.sum(-1, keepdim=True)
        assert torch.allclose(pattern[allowed], (1.0 / counts).expand_as(pattern)[allowed])
    assert int((after[0, 0, -1] > 0).sum()) <= text.sliding_window  # the sliding window still applies


def test_reuse_layers_have_no_kv_projections(probe):
    layers = probe._module.model.language_model.layers
    for i, mode in enumerate(probe.text_config.kv_sharing_modes):
        assert hasattr(layers[i].self_attn, "k_proj") == (mode != "reuse")
