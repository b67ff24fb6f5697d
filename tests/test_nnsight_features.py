"""nnsight's own features on the probe: generate with per-step edits, session, cache, skip, scan,
gradients through points — and nothing outlives a trace, also when it raises."""

from __future__ import annotations

import pytest
import torch

from reference import edited, stock_forward


def test_generate_with_per_step_intervention(probe, stock, ids):
    steps = 3
    per_step = []
    with probe.generate(ids, max_new_tokens=steps, do_sample=False) as tracer:
        for _ in tracer.iter[0:steps]:
            per_step.append(probe.layers[2].altup_predict.output.shape)
        result = tracer.result.save()
    assert result.shape == (1, ids.shape[1] + steps)
    assert per_step[0][2] == ids.shape[1] and all(shape[2] == 1 for shape in per_step[1:])
    with torch.no_grad():
        reference = stock.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False)
    assert torch.equal(result, reference)


def test_generate_with_an_edit_on_one_step(probe, ids):
    with probe.generate(ids, max_new_tokens=3, do_sample=False) as tracer:
        for _ in tracer.iter[1]:
            probe.logits.output[:, -1, 100] = 1000.0
        edited_ids = tracer.result.save()
    assert int(edited_ids[0, ids.shape[1] + 1]) == 100


def test_session_carries_values_between_traces(probe, stock, ids):
    with probe.session():
        with probe.trace(ids):
            ple = probe.layers[3].ple_out.output.save()
        with probe.trace(ids):
            probe.layers[3].ple_out.output = ple * 2
            logits = probe.logits.output.save()
    with edited(stock, "ple_out", 3, lambda v: v * 2):
        expected = stock_forward(stock, ids).logits
    assert torch.equal(logits, expected)


def test_cache_keyed_by_point_paths(probe, ids):
    points = [probe.layers[1].altup_predict, probe.layers[1].ple_out, probe.embed]
    with probe.trace(ids) as tracer:
        cache = tracer.cache(modules=points)
        direct = probe.layers[1].ple_out.output.save()
    key = probe.layers[1].ple_out.path
    assert torch.equal(cache[key].output, direct)
    assert cache[probe.layers[1].altup_predict.path].output.shape == (4, 1, ids.shape[1], 64)


def test_skip_of_a_kv_store_layer_is_a_clear_error(probe, ids):
    store = probe.text_config.kv_sharing_modes.index("store")
    with pytest.raises(ValueError, match="KV 'store' layer"):
        with probe.trace(ids):
            probe.layers[store].skip(probe.layers[store].input)
    with probe.trace(ids):
        logits = probe.logits.output.save()
    assert torch.isfinite(logits).all()


def test_skip_of_an_ordinary_layer(probe, stock, ids):
    with probe.trace(ids):
        probe.layers[1].skip(probe.layers[1].input)
        logits = probe.logits.output.save()
    handle = stock.model.language_model.layers[1].register_forward_hook(lambda m, a, o: a[0])
    try:
        expected = stock_forward(stock, ids).logits
    finally:
        handle.remove()
    assert torch.equal(logits, expected)


def test_scan_gives_shapes(probe, ids):
    with probe.scan(ids):
        predicted = probe.layers[2].altup_predict.output.save()
        pattern_free = probe.layers[2].mlp_act.output.save()
    assert tuple(predicted.shape) == (4, 1, ids.shape[1], 64)
    assert tuple(pattern_free.shape) == (1, ids.shape[1], probe.text_config.intermediate_size[2])


def test_gradients_through_points(probe, stock, ids):
    with probe.trace(ids):
        ple = probe.layers[2].ple_out.output
        predicted = probe.layers[4].altup_predict.output
        logits = probe.logits.output
        with logits[0, -1, 7].backward():
            grad_predicted = predicted.grad.save()
            grad_ple = ple.grad.save()
    kept = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            kept[name] = output
        return hook

    layers = stock.model.language_model.layers
    handle = layers[2].post_per_layer_input_norm.register_forward_hook(keep("ple"))
    stock_predict = layers[4].altup.predict

    def predict(x):
        out = stock_predict(x)
        out.retain_grad()
        kept["predicted"] = out
        return out

    layers[4].altup.predict = predict
    try:
        stock_forward(stock, ids).logits[0, -1, 7].backward()
    finally:
        handle.remove()
        del layers[4].altup.predict
        stock.zero_grad(set_to_none=True)
    assert grad_ple.shape == (1, ids.shape[1], 64) and grad_ple.abs().sum() > 0
    assert torch.equal(grad_ple, kept["ple"].grad)
    assert grad_predicted.shape == (4, 1, ids.shape[1], 64)
    assert torch.equal(grad_predicted, kept["predicted"].grad)


def test_nothing_outlives_a_trace_that_raises(probe, stock, ids):
    with pytest.raises(RuntimeError, match="boom"):
        with probe.trace(ids):
            probe.layers[2].ple_out.output[:] = 0
            raise RuntimeError("boom")
    with probe.trace(ids):
        logits = probe.logits.output.save()
    assert torch.equal(logits, stock_forward(stock, ids).logits)
    for layer in probe.hf_model.model.language_model.layers:
        assert layer.__dict__.get("_g3n_per_layer_input") is None
