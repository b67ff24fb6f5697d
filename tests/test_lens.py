"""The exact lens: the model's own readout through the AltUp merge."""

from __future__ import annotations

import pytest
import torch

from reference import stock_forward


def test_lens_on_last_layer_reproduces_logits(probe, stock, ids):
    last = probe.text_config.num_hidden_layers - 1
    with probe.trace(ids):
        out = probe.layers[last].output.save()
        logits = probe.logits.output.save()
    with torch.no_grad():
        lensed = probe.lens(out, layer=last)
    assert torch.equal(lensed, logits)
    assert torch.equal(lensed, stock_forward(stock, ids).logits)


def test_lens_on_merged_stream_equals_model(probe, ids):
    with probe.trace(ids):
        merged = probe.streams_merged.output.save()
        logits = probe.logits.output.save()
    with torch.no_grad():
        assert torch.equal(probe.lens(merged), logits)


def test_single_stream_is_read_alone(probe, stock, ids):
    with probe.trace(ids):
        out = probe.layers[2].output.save()
    with torch.no_grad():
        lensed = probe.lens(out[0])
        lm = stock.model.language_model
        expected = torch.tanh(stock.lm_head(lm.norm(out[0])) / 30.0) * 30.0
        merged = probe.lens(out)
    assert torch.equal(lensed, expected)
    assert not torch.allclose(lensed, merged), "the naive stream-0 lens should differ from the merge"


def test_text_only_masks_soft_tokens_and_unused(probe, ids):
    with probe.trace(ids):
        out = probe.layers[3].output.save()
    with torch.no_grad():
        masked = probe.lens(out, text_only=True)
    text = probe.text_config
    assert torch.isinf(masked[..., text.vocab_size_per_layer_input:]).all()
    unused = probe.tokenizer.convert_tokens_to_ids("<unused7>")
    assert torch.isinf(masked[..., unused]).all()
    assert torch.isfinite(masked[..., :text.vocab_size_per_layer_input]).any()


def test_lens_bad_input(probe):
    with pytest.raises(ValueError, match="stack"):
        probe.lens(torch.zeros(3, 1, 2, 64))
    with pytest.raises(ValueError, match="out of range"):
        probe.lens(torch.zeros(4, 1, 2, 64), layer=99)
    with pytest.raises(ValueError, match="hidden size"):
        probe.lens(torch.zeros(1, 2, 65))


def test_logit_lens_table(probe):
    table = probe.logit_lens("def f(x):\n    return", k=3)
    layers = probe.text_config.num_hidden_layers
    assert table.rows == [str(i) for i in range(layers)] + ["model"]
    assert len(table.tokens) == len(probe.tokenizer("def f(x):\n    return")["input_ids"])
    assert table.probabilities.shape == (layers + 1, len(table.tokens), 3)
    assert all(0 <= p <= 1 for row in table.top for cell in row for _, p in cell)
    html = table._repr_html_()
    assert html.startswith("<table>") and "layer" in html
    text = str(table)
    assert "logit lens" in text and "model" in text
    assert (table.ids < probe.text_config.vocab_size_per_layer_input).all()


def test_logit_lens_last_position(probe):
    table = probe.logit_lens("abc", k=2, positions=[-1])
    assert len(table.tokens) == 1 and table.probabilities.shape[1] == 1


def test_logit_lens_without_a_tokenizer_says_so(stock):
    import copy

    import g3n_probe as g3n

    probe = g3n.Gemma3nProbe(copy.deepcopy(stock))
    with pytest.raises(ValueError, match="logit_lens names tokens, so it needs a tokenizer"):
        probe.logit_lens(torch.tensor([[2, 5, 6]]))
