"""The host-resident per-layer table, traces without a KV cache, and the lean readout."""

from __future__ import annotations

import pytest
import torch

import g3n_probe as g3n
from g3n_probe.checkpoint.ple import is_host_resident
from reference import capture, edited, stock_forward


@pytest.fixture(scope="module")
def host_probe(tiny_dir):
    return g3n.load(tiny_dir, ple_device="cpu")


def test_host_lookup_is_installed_and_exact(host_probe, stock, ids):
    table = host_probe.hf_model.model.language_model.embed_tokens_per_layer
    assert is_host_resident(table)
    assert table.weight.device.type == "cpu"
    with host_probe.trace(ids):
        tokens = host_probe.ple_tokens.output.save()
        logits = host_probe.logits.output.save()
    expected = capture(stock, ids)
    assert torch.equal(tokens, expected[("ple_tokens", None)])
    assert torch.equal(logits, stock_forward(stock, ids).logits)


def test_host_lookup_write(host_probe, stock, ids):
    with host_probe.trace(ids):
        host_probe.ple_tokens.output = host_probe.ple_tokens.output * 0.5
        logits = host_probe.logits.output.save()
    with edited(stock, "ple_tokens", None, lambda v: v * 0.5):
        expected = stock_forward(stock, ids).logits
    assert torch.equal(logits, expected)


def test_host_lookup_with_invokes_and_generate(host_probe, stock, batch_ids):
    ids = batch_ids[:3]
    saved = []
    with host_probe.trace() as tracer:
        for row in range(3):
            with tracer.invoke(ids[row : row + 1]):
                saved.append(host_probe.ple_tokens.output.save())
    expected = capture(stock, ids)[("ple_tokens", None)]
    for row in range(3):
        assert torch.equal(saved[row], expected[row : row + 1])
    with host_probe.generate(ids[:1], max_new_tokens=3, do_sample=False) as tracer:
        out = tracer.result.save()
    with torch.no_grad():
        reference = stock.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=3, do_sample=False)
    assert torch.equal(out, reference)


def test_ids_outside_the_table_map_to_row_zero(host_probe, ids):
    """As in stock: vision/audio soft-token ids have no per-layer row and read row 0."""
    text_vocab = host_probe.text_config.vocab_size_per_layer_input
    with host_probe.trace(ids):
        tokens = host_probe.ple_tokens.output.save()
    table = host_probe.hf_model.model.language_model.embed_tokens_per_layer
    row0 = (table.weight[0] * table.embed_scale).reshape(tokens.shape[-2:])
    outside = (ids[0] >= text_vocab).nonzero().flatten()
    assert len(outside) >= 2
    for position in outside.tolist():
        assert torch.equal(tokens[0, position], row0)


def test_bad_ple_device(tiny_dir):
    with pytest.raises(ValueError, match="not a device"):
        g3n.load(tiny_dir, ple_device="warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            g3n.load(tiny_dir, ple_device="cuda")
        with pytest.raises(ValueError, match="CUDA is not available"):
            g3n.load(tiny_dir, device="cuda")


def test_default_ple_device():
    from g3n_probe.checkpoint.ple import resolve_ple_device

    assert resolve_ple_device(None, torch.device("cuda")) == torch.device("cpu")
    assert resolve_ple_device(None, torch.device("cpu")) == torch.device("cpu")


def test_traces_build_no_kv_cache(probe, ids):
    with probe.trace(ids):
        out = probe.output.save()
    assert out.cache is None
    with probe.trace(ids, use_cache=True):
        cached = probe.output.save()
    assert cached.cache is not None


@pytest.mark.parametrize("keep, positions", [(1, [-1]), (3, [-3, -2, -1]), ([0, 5, -1], [0, 5, -1])])
def test_lean_readout(probe, stock, ids, keep, positions):
    with probe.trace(ids, logits_to_keep=keep):
        merged = probe.streams_merged.output.save()
        logits = probe.logits.output.save()
    assert logits.shape == (1, len(positions), probe.text_config.vocab_size)
    stock_keep = keep if isinstance(keep, int) else torch.tensor(keep)
    assert torch.equal(logits, stock_forward(stock, ids, logits_to_keep=stock_keep).logits)
    # Against all positions' logits only float rounding differs (lm_head runs on fewer rows).
    full = stock_forward(stock, ids).logits[:, positions]
    assert torch.allclose(logits, full, rtol=0, atol=1e-6)
    assert merged.shape[1] == ids.shape[1]  # points upstream see every position


@pytest.mark.parametrize("keep", [-1, 99, [0, 99], []])
def test_lean_readout_positions_outside_the_sequence(probe, ids, keep):
    with pytest.raises(ValueError, match="logits_to_keep"):
        with probe.trace(ids, logits_to_keep=keep):
            probe.logits.output.save()
