"""Stock code cannot tell: the attention implementation reads what the user set at every moment, and a
probe hands the bare model back. References are stock models with plain torch hooks (tests/reference.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.gemma3n import modeling_gemma3n

import g3n_probe as g3n
from reference import build_stock, edited, stock_forward
from test_injection import module_state


@pytest.fixture(scope="module")
def eager_stock(tiny_dir):
    return build_stock(tiny_dir, attn_implementation="eager")


def _implementations(model) -> tuple:
    return (model.config._attn_implementation, model.config.get_text_config()._attn_implementation)


def test_the_config_reads_what_the_user_set_at_every_stage(eager_stock, ids):
    model = copy.deepcopy(eager_stock)
    assert _implementations(model) == ("eager", "eager")
    probe = g3n.Gemma3nProbe(model)
    assert _implementations(model) == ("eager", "eager")
    seen = []
    with probe.trace(ids):
        probe.layers[2].attn_pattern.output.save()
        seen.append(_implementations(model))   # runs inside the forward, at the layer's point
    assert seen == [("eager", "eager")]
    probe.injection.remove()
    assert _implementations(model) == ("eager", "eager")


def test_output_attentions_through_config_and_call_on_an_injected_eager_model(eager_stock, ids):
    model = copy.deepcopy(eager_stock)
    g3n.inject(model)
    with torch.no_grad():
        theirs = stock_forward(eager_stock, ids, output_attentions=True)
        by_call = stock_forward(model, ids, output_attentions=True)
        model.config.output_attentions = True   # raised ValueError while the name was g3n_probe's own
        model.config.get_text_config().output_attentions = True
        try:
            by_config = stock_forward(model, ids)
        finally:
            model.config.output_attentions = model.config.get_text_config().output_attentions = False
    for ours in (by_call, by_config):
        assert torch.equal(ours.logits, theirs.logits)
        assert len(ours.attentions) == len(theirs.attentions)
        assert all(torch.equal(a, b) for a, b in zip(ours.attentions, theirs.attentions))


def test_a_model_switched_to_eager_after_injection_serves_the_pattern(tiny_dir, ids, eager_stock):
    model = build_stock(tiny_dir)   # sdpa
    probe = g3n.Gemma3nProbe(model)
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        with probe.trace(ids):
            probe.layers[1].attn_pattern.output.save()
    model.set_attn_implementation("eager")
    with torch.no_grad(), probe.trace(ids):
        pattern = probe.layers[1].attn_pattern.output.save()
    expected = stock_forward(eager_stock, ids, output_attentions=True).attentions[1]
    assert torch.equal(pattern, expected)


def _values_of(stock, ids, layer):
    """The layer's V as the attention sees it ([B,H,T,Dh], heads repeated), from plain hooks on v_proj/v_norm."""
    attention = stock.model.language_model.layers[layer].self_attn
    kept = {}
    handle = attention.v_norm.register_forward_hook(lambda m, a, out: kept.__setitem__("v", out))
    try:
        with torch.no_grad():
            stock_forward(stock, ids)
    finally:
        handle.remove()
    return modeling_gemma3n.repeat_kv(kept["v"].transpose(1, 2), attention.num_key_value_groups)


def test_a_pattern_write_equals_the_same_edit_done_with_plain_hooks(probe_eager, eager_stock, ids):
    """P' = P · ramp (position- and key-dependent): the attention output becomes P' @ V. The reference takes
    P from stock's output_attentions and V from a hook on v_norm, and writes P' @ V into o_proj's input."""
    layer = 3   # a KV store layer: its own V
    with torch.no_grad():
        stock_pattern = stock_forward(eager_stock, ids, output_attentions=True).attentions[layer]
    ramp = torch.linspace(0.25, 1.75, ids.shape[1])
    written = stock_pattern * ramp
    z = (written @ _values_of(eager_stock, ids, layer)).transpose(1, 2)   # [B,T,H,Dh]
    with torch.no_grad(), probe_eager.trace(ids):
        pattern = probe_eager.layers[layer].attn_pattern.output
        probe_eager.layers[layer].attn_pattern.output = pattern * ramp
        logits = probe_eager.logits.output.save()
    with edited(eager_stock, "attn_z", layer, lambda value: z.to(value.dtype)):
        with torch.no_grad():
            expected = stock_forward(eager_stock, ids).logits
    assert torch.allclose(logits, expected, rtol=0, atol=1e-5), (logits - expected).abs().max()
    assert not torch.allclose(logits, stock_forward(eager_stock, ids).logits, atol=1e-3)


def test_release_hands_back_the_bare_model(eager_stock, ids):
    never = module_state(copy.deepcopy(eager_stock))
    model = copy.deepcopy(eager_stock)
    probe = g3n.Gemma3nProbe(model)
    with probe.trace(ids):
        probe.layers[1].attn_pattern.output.save()
    assert module_state(model) != never   # nnsight's controllers and the points are on it
    bare = probe.release()
    assert bare is model
    assert module_state(model) == never
    assert g3n.Injection.of(model) is None
    with torch.no_grad():
        assert torch.equal(stock_forward(model, ids).logits, stock_forward(eager_stock, ids).logits)
    again = g3n.Gemma3nProbe(model)   # and it can be wrapped again
    with torch.no_grad(), again.trace(ids):
        logits = again.logits.output.save()
    assert torch.equal(logits, stock_forward(eager_stock, ids).logits)
