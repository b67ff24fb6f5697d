"""Every intervention point: reads equal the stock model's values, writes equal the same edit done
with plain torch hooks on a stock model, both with torch.equal."""

from __future__ import annotations

import pytest
import torch

from g3n_probe.points import LAYER_POINTS, MODEL_POINTS
from reference import capture, edited, exists_at, stock_forward

LAYERS = (0, 3, 4, 5)  # sparse sliding, KV store (sliding), KV reuse (sliding), KV reuse (full)
SDPA_LAYER = [p.name for p in LAYER_POINTS if p.needs is None]
MODEL = [p.name for p in MODEL_POINTS]


def _envoy(model, name, layer):
    return getattr(model.layers[layer], name) if layer is not None else getattr(model, name)


def _edit(value: torch.Tensor) -> torch.Tensor:
    # Position- and channel-dependent, so a wrong slice or a transposed axis cannot pass.
    ramp = torch.linspace(0.5, 1.5, value.shape[-1], dtype=value.dtype)
    return value * ramp + 0.25


def test_untouched_logits_are_bit_identical(probe, stock, ids):
    with probe.trace(ids):
        output = probe.output.logits.save()  # the root's output comes before the logits point
        logits = probe.logits.output.save()
    expected = stock_forward(stock, ids).logits
    assert torch.equal(logits, expected)
    assert torch.equal(output, expected)


@pytest.mark.parametrize("name", MODEL)
def test_model_point_read(probe, stock, ids, name):
    expected = capture(stock, ids)[(name, None)]
    with probe.trace(ids):
        value = _envoy(probe, name, None).output.save()
    assert value.shape == expected.shape
    assert torch.equal(value, expected)


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_points_read_in_one_trace(probe, stock, ids, layer):
    """All of a layer's points, accessed in table order inside one trace."""
    expected = capture(stock, ids)
    saved = {}
    with probe.trace(ids):
        saved["input"] = probe.layers[layer].input.save()
        for name in SDPA_LAYER:
            if exists_at(name, layer):
                saved[name] = _envoy(probe, name, layer).output.save()
        saved["output"] = probe.layers[layer].output.save()
    for name, value in saved.items():
        assert torch.equal(value, expected[(name, layer)]), name


@pytest.mark.parametrize("layer", LAYERS)
def test_attn_pattern_read_eager(probe_eager, stock_eager, ids, layer):
    expected = capture(stock_eager, ids)
    with probe_eager.trace(ids):
        pattern = probe_eager.layers[layer].attn_pattern.output.save()
        z = probe_eager.layers[layer].attn_z.output.save()
        logits = probe_eager.logits.output.save()
    assert pattern.shape == (1, 2, ids.shape[1], ids.shape[1])
    assert torch.equal(pattern, expected[("attn_pattern", layer)])
    assert torch.equal(z, expected[("attn_z", layer)])
    assert torch.equal(logits, expected[("logits", None)])
    if probe_eager.text_config.layer_types[layer] == "sliding_attention":
        window = probe_eager.text_config.sliding_window
        assert torch.all(pattern[..., -1, : ids.shape[1] - window] == 0)


@pytest.mark.parametrize("name", MODEL)
def test_model_point_write(probe, stock, ids, name):
    with probe.trace(ids):
        output = probe.output.save() if name == "logits" else None  # served before the logits point
        envoy = _envoy(probe, name, None)
        envoy.output = _edit(envoy.output)
        if output is None:
            output = probe.output.save()
    logits = output.logits
    with edited(stock, name, None, _edit):
        expected = stock_forward(stock, ids).logits
    assert torch.equal(logits, expected)
    assert not torch.equal(logits, stock_forward(stock, ids).logits)


WRITES = [(name, layer) for name in SDPA_LAYER for layer in LAYERS if exists_at(name, layer)]


@pytest.mark.parametrize("name,layer", WRITES, ids=[f"{n}-{l}" for n, l in WRITES])
def test_layer_point_write(probe, stock, ids, name, layer):
    with probe.trace(ids):
        envoy = _envoy(probe, name, layer)
        envoy.output = _edit(envoy.output)
        logits = probe.logits.output.save()
    with edited(stock, name, layer, _edit):
        expected = stock_forward(stock, ids).logits
    assert torch.equal(logits, expected)
    with torch.no_grad():
        assert not torch.equal(logits, stock_forward(stock, ids).logits), "the edit changed nothing"


@pytest.mark.parametrize("name", ["resid_mid", "altup_correct", "ple_out", "altup_predict", "ple_input", "embed"])
def test_in_place_write_equals_assignment(probe, stock, ids, name):
    layer = None if name == "embed" else 2
    with probe.trace(ids):
        _envoy(probe, name, layer).output[..., :5] = 0
        logits = probe.logits.output.save()

    def zero(value):
        value = value.clone()
        value[..., :5] = 0
        return value

    with edited(stock, name, layer, zero):
        expected = stock_forward(stock, ids).logits
    assert torch.equal(logits, expected)


def test_resid_mid_write_reaches_mlp_input_and_residual(probe, ids):
    layer = 1
    with probe.trace(ids):
        predicted = probe.layers[layer].altup_predict.output.save()
        written = probe.layers[layer].resid_mid.output * 0 + 1.0
        probe.layers[layer].resid_mid.output = written
        mlp_in = probe.model.language_model.layers[layer].pre_feedforward_layernorm.input.save()
        mlp_out = probe.layers[layer].mlp_out.output.save()
        corrected = probe.layers[layer].altup_correct.output.save()
    assert torch.equal(mlp_in, torch.ones_like(mlp_in))  # the MLP input saw the write
    altup = probe.hf_model.model.language_model.layers[layer].altup
    with torch.no_grad():
        expected = type(altup).correct(altup, predicted, torch.ones_like(mlp_out) + mlp_out)
    assert torch.equal(corrected, expected)  # and so did the residual add feeding AltUp correct


def test_altup_correct_is_a_snapshot_before_ple(probe, stock, ids):
    expected = capture(stock, ids)
    with probe.trace(ids):
        corrected = probe.layers[2].altup_correct.output.save()
        ple = probe.layers[2].ple_out.output.save()
        out = probe.layers[2].output.save()
    assert torch.equal(corrected, expected[("altup_correct", 2)])
    assert torch.equal(out[0], corrected[0])
    assert torch.equal(out[1:], corrected[1:] + ple)
    assert not torch.equal(out[1:], corrected[1:])


def test_ple_out_zero_removes_ple_contribution(probe, ids):
    with probe.trace(ids):
        corrected = probe.layers[5].altup_correct.output.save()
        probe.layers[5].ple_out.output[:] = 0
        out = probe.layers[5].output.save()
    assert torch.equal(out, corrected)


def test_attn_pattern_write_changes_attention_output(probe_eager, stock_eager, ids):
    layer, head = 3, 1

    def zero_head(z):
        z = z.clone()
        z[:, :, head] = 0
        return z

    with probe_eager.trace(ids):
        probe_eager.layers[layer].attn_pattern.output[:, head] = 0
        z = probe_eager.layers[layer].attn_z.output.save()
        logits = probe_eager.logits.output.save()
    assert torch.all(z[:, :, head] == 0)
    with edited(stock_eager, "attn_z", layer, zero_head):
        expected = stock_forward(stock_eager, ids).logits
    assert torch.equal(logits, expected)


def test_attn_pattern_assignment_is_used(probe_eager, ids):
    layer = 4  # a KV-reuse layer: V comes from the store layer
    with probe_eager.trace(ids):
        pattern = probe_eager.layers[layer].attn_pattern.output
        uniform = torch.tril(torch.ones_like(pattern))
        probe_eager.layers[layer].attn_pattern.output = uniform / uniform.sum(-1, keepdim=True)
        z = probe_eager.layers[layer].attn_z.output.save()
    # With uniform causal attention, the first position attends only to itself and the last to all:
    # the per-head output at position 0 equals that head's value vector at position 0.
    assert z.shape[2] == probe_eager.text_config.num_attention_heads
    assert torch.isfinite(z).all()


def test_attn_pattern_under_sdpa_is_a_clear_error(probe, ids):
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        with probe.trace(ids):
            probe.layers[0].attn_pattern.output.save()
    with probe.trace(ids):
        logits = probe.logits.output.save()
    assert torch.isfinite(logits).all()


def test_every_table_row_is_reachable(probe, ids):
    """Every row's envoy exists on the probe and serves a tensor of the row's shape inside a trace."""
    from g3n_probe.points import TABLE, concrete_shape

    rows = [p for p in TABLE if probe.injection.unavailable(p) is None]
    assert {p.name for p in TABLE} - {p.name for p in rows} == {"attn_pattern"}  # sdpa: says why instead
    saved = {}
    with probe.trace(ids):
        for point in rows:
            saved[point.name] = point.read(probe, 0 if point.scope == "layer" else None).save()
    for point in rows:
        assert tuple(saved[point.name].shape) == concrete_shape(point, probe.text_config, 1, ids.shape[1]), point.name


def test_plain_torch_hooks_on_points_without_a_trace(probe, stock, ids):
    """HookPoints are ordinary modules: a torch forward hook sees (and may replace) the value with
    no trace at all, and altup_correct is still a pre-PLE snapshot for it."""
    layer = probe.hf_model.model.language_model.layers[2]
    seen = {}
    handles = [
        layer.altup_correct.register_forward_hook(lambda m, a, o: seen.__setitem__("correct", o)),
        layer.ple_out.register_forward_hook(lambda m, a, o: o * 0.5),
    ]
    try:
        with torch.no_grad():
            logits = probe.hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    finally:
        for handle in handles:
            handle.remove()
    expected = capture(stock, ids)
    assert torch.equal(seen["correct"], expected[("altup_correct", 2)])
    with edited(stock, "ple_out", 2, lambda v: v * 0.5):
        assert torch.equal(logits, stock_forward(stock, ids).logits)
