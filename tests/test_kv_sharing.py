"""KV sharing is visible: a write to a store layer's keys reaches the layers that reuse them."""

from __future__ import annotations

import pytest
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
    layers = probe.hf_model.model.language_model.layers
    for i, mode in enumerate(probe.text_config.kv_sharing_modes):
        assert hasattr(layers[i].self_attn, "k_proj") == (mode != "reuse")


def test_attn_k_and_v_on_reuse_layers_name_the_store_layer(probe, ids):
    from reference import TINY_KV_REUSE

    modes = probe.text_config.kv_sharing_modes
    assert tuple(i for i, mode in enumerate(modes) if mode == "reuse") == TINY_KV_REUSE
    for layer, store in ((4, 3), (5, 2)):
        for name in ("attn_k", "attn_v"):
            with pytest.raises(ValueError, match=rf"layer {layer} is a KV-reuse layer .* store layer {store} "
                                                 rf"\(read layers\.{store}\.{name}\)"):
                with probe.trace(ids):
                    getattr(probe.layers[layer], name).output.save()
    with probe.trace(ids):   # and the model is fine afterwards: the store layer's keys are there
        keys = probe.layers[3].attn_k.output.save()
    assert keys.shape == (1, ids.shape[1], probe.text_config.num_key_value_heads, probe.text_config.head_dim)


def test_a_key_write_through_attn_k_equals_the_stock_hook_edit(probe, stock, ids):
    """attn_k of store layer 3, halved: the reuse layer 4 reads the same edited keys (plain-hook reference)."""
    from reference import edited, stock_forward

    with torch.no_grad(), probe.trace(ids):
        probe.layers[3].attn_k.output[:] = probe.layers[3].attn_k.output * 0.5
        logits = probe.logits.output.save()
    with edited(stock, "attn_k", 3, lambda k: k * 0.5), torch.no_grad():
        expected = stock_forward(stock, ids).logits
    assert torch.equal(logits, expected)
