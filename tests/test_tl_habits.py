"""TransformerLens habits (issue 30): ``run_with_cache``, ``cfg``, ``to_single_token``, ``model("text")`` and the
cache helpers, each against what TransformerLens documents and against the stock model run with plain hooks."""

from __future__ import annotations

import pickle

import pytest
import torch

import g3n_probe as g3n
from reference import stock_forward

TEXT = "hello world"


@pytest.fixture(scope="module")
def text_ids(probe):
    return probe.to_tokens(TEXT)


def _stock_outputs(stock, ids):
    """Every decoder layer's input and output stack, by plain torch hooks on the stock model."""
    kept, handles = {}, []
    for i, layer in enumerate(stock.model.language_model.layers):
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: kept.__setitem__(f"layers.{i}.input", a[0].clone())))
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: kept.__setitem__(f"layers.{i}.output", o.clone())))
    try:
        with torch.no_grad():
            logits = stock_forward(stock, ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, kept


def test_run_with_cache_returns_logits_and_a_cache(probe, stock, text_ids):
    logits, cache = probe.run_with_cache(TEXT)
    expected, stacks = _stock_outputs(stock, text_ids)
    assert torch.equal(logits, expected)
    assert "logits" in cache   # names_filter=None: every point, as TransformerLens caches every hook
    for key, value in stacks.items():
        assert torch.equal(cache[key], value), key
    assert cache["layers.3.input"].shape[0] == probe.cfg.n_streams   # AltUp stacks, [S,B,T,D]


def test_run_with_cache_names_filter(probe, stock, text_ids):
    logits, cache = probe.run_with_cache(TEXT, names_filter=lambda name: name.endswith("mlp_out"))
    assert set(cache) == {f"layers.{i}.mlp_out" for i in range(probe.cfg.n_layers)}
    assert torch.equal(logits, _stock_outputs(stock, text_ids)[0])
    _, one = probe.run_with_cache(TEXT, names_filter="layers.2.output", remove_batch_dim=True)
    assert list(one) == ["layers.2.output"] and one["layers.2.output"].dim() == 3   # [S,T,D]
    _, listed = probe.run_with_cache(text_ids, names_filter=["embed", "logits"])
    assert set(listed) == {"embed", "logits"}


def test_cfg_has_transformer_lens_names(probe):
    text = probe.text_config
    cfg = probe.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_vocab, cfg.n_ctx) == (
        text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.head_dim, text.vocab_size,
        text.max_position_embeddings)
    assert cfg.d_vocab_out == cfg.d_vocab and cfg.normalization_type == "RMS"


def test_to_single_token(probe):
    token = probe.to_single_token("h")
    assert probe.tokenizer.decode([token]) == "h"
    with pytest.raises(ValueError, match="not one"):
        probe.to_single_token("hello world")


def test_calling_the_model_on_text_returns_logits_as_transformer_lens(probe, stock, text_ids):
    expected = _stock_outputs(stock, text_ids)[0]
    assert torch.equal(probe(TEXT), expected)
    assert torch.equal(probe(TEXT, return_type="logits"), expected)
    assert probe(TEXT, return_type=None) is None
    loss = probe(TEXT, return_type="loss")
    reference = torch.nn.functional.cross_entropy(expected[0, :-1].float(), text_ids[0, 1:])
    assert torch.allclose(loss, reference, atol=1e-6)
    per_token = probe(TEXT, return_type="loss", loss_per_token=True)
    assert per_token.shape == (1, text_ids.shape[1] - 1)
    with pytest.raises(ValueError, match="return_type"):
        probe(TEXT, return_type="probs")


def test_calling_the_model_on_ids_stays_the_stock_call(probe, stock, text_ids):
    out = probe(input_ids=text_ids, attention_mask=torch.ones_like(text_ids))
    assert torch.equal(out.logits, _stock_outputs(stock, text_ids)[0])
    assert torch.equal(probe(text_ids, return_type="logits"), out.logits)


def test_stack_activation_and_accumulated_resid(probe, stock, text_ids):
    _, cache = probe.run_with_cache(TEXT)
    _, stacks = _stock_outputs(stock, text_ids)
    mlp = cache.stack_activation("mlp_out")
    assert mlp.shape[0] == probe.cfg.n_layers and torch.equal(mlp[2], cache["layers.2.mlp_out"])
    resid, labels = cache.accumulated_resid(return_labels=True)
    n = probe.cfg.n_layers
    assert resid.shape[0] == n + 1 and labels[-1] == f"layers.{n - 1}.output"
    assert torch.equal(resid[0], stacks["layers.0.input"]) and torch.equal(resid[-1], stacks[f"layers.{n - 1}.output"])
    assert cache.accumulated_resid(layer=2).shape[0] == 3
    with pytest.raises(ValueError, match="resid_mid"):
        cache.accumulated_resid(incl_mid=True)


def test_decompose_resid_is_the_exact_decomposition(probe, text_ids):
    _, cache = probe.run_with_cache(TEXT)
    target = torch.randn(probe.cfg.d_model, generator=torch.Generator().manual_seed(0))
    result = cache.decompose_resid(target, layer=3)
    direct = g3n.decompose(probe, text_ids, target, at="layers.3.input")
    assert torch.equal(result.values, direct.values)
    stack = cache["layers.3.input"]
    total = (stack.float() * target).sum(-1).sum(0)    # the target on every stream of the stack entering layer 3
    assert torch.allclose(result.total, total, atol=1e-4)
    assert torch.allclose(result.values.sum(0), total, atol=1e-4)
    restored = pickle.loads(pickle.dumps(cache))   # the model does not travel with the cache
    assert restored.model is None and torch.equal(restored["layers.3.input"], stack)


def test_apply_ln_to_stack_is_refused_with_the_reason(probe):
    _, cache = probe.run_with_cache(TEXT, names_filter="embed")
    with pytest.raises(NotImplementedError, match="AltUp streams"):
        cache.apply_ln_to_stack(torch.zeros(2, 1, 3, probe.cfg.d_model))
