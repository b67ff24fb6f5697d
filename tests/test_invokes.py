"""Several invokes: each sees only its own rows of every point, stream stacks included, and a write
in one invoke changes only that invoke. Four invokes is the case where the batch equals the number
of AltUp streams (B == S), where slicing dimension 0 would silently hand out streams, not rows."""

from __future__ import annotations

import pytest
import torch

from g3n_probe.points import LAYER_POINTS, MODEL_POINTS
from reference import capture, edited, exists_at, stock_forward

READ_LAYER = 4
STACKS = {"input", "output", "streams_in", "altup_predict", "altup_correct"}   # [S,B,T,D]: batch on dim 1
POINT_NAMES = [p.name for p in LAYER_POINTS if p.needs is None and exists_at(p.name, READ_LAYER)]


def _edit(value):
    return value * 0.5 - 0.125


@pytest.mark.parametrize("n", [2, 3, 4])
def test_reads_are_scoped_per_invoke(probe, stock, batch_ids, n):
    ids = batch_ids[:n]
    expected = capture(stock, ids)
    saved = []
    with probe.trace() as tracer:
        for row in range(n):
            with tracer.invoke(ids[row : row + 1]):
                values = {}
                for point in MODEL_POINTS[:4]:
                    values[point.name] = getattr(probe, point.name).output.save()
                values["input"] = probe.layers[READ_LAYER].input.save()
                for name in POINT_NAMES:
                    values[name] = getattr(probe.layers[READ_LAYER], name).output.save()
                values["output"] = probe.layers[READ_LAYER].output.save()
                values["streams_merged"] = probe.streams_merged.output.save()
                values["logits"] = probe.logits.output.save()
                saved.append(values)
    for row, values in enumerate(saved):
        for name, value in values.items():
            layer = None if name in {p.name for p in MODEL_POINTS} else READ_LAYER
            full = expected[(name, layer)]
            stack = name in STACKS
            want = full[:, row : row + 1] if stack else full[row : row + 1]
            assert value.shape == want.shape, (name, row)
            assert torch.equal(value, want), (name, row)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("name", ["altup_predict", "altup_correct", "streams_in", "ple_out", "ple_input", "resid_mid"])
def test_write_in_one_invoke_changes_only_that_invoke(probe, stock, batch_ids, n, name):
    ids = batch_ids[:n]
    target = n - 1 if n > 2 else 1
    is_model = name == "streams_in"
    layer = None if is_model else 2
    logits = []
    with probe.trace() as tracer:
        for row in range(n):
            with tracer.invoke(ids[row : row + 1]):
                envoy = getattr(probe, name) if is_model else getattr(probe.layers[layer], name)
                if row == target:
                    envoy.output = _edit(envoy.output)
                logits.append(probe.logits.output.save())
    with edited(stock, name, layer, _edit, rows=slice(target, target + 1)):
        expected = stock_forward(stock, ids).logits
    untouched = stock_forward(stock, ids).logits
    for row in range(n):
        assert torch.equal(logits[row], expected[row : row + 1]), row
        assert torch.equal(logits[row], untouched[row : row + 1]) == (row != target), row


def test_in_place_write_in_one_invoke(probe, stock, batch_ids):
    ids = batch_ids[:4]
    saved, logits = [], []
    with probe.trace() as tracer:
        for row in range(4):
            with tracer.invoke(ids[row : row + 1]):
                if row == 2:
                    probe.layers[1].altup_predict.output[1:] = 0
                saved.append(probe.layers[1].altup_predict.output.save())
                logits.append(probe.logits.output.save())

    def zero_streams(value):
        value = value.clone()
        value[1:] = 0
        return value

    with edited(stock, "altup_predict", 1, zero_streams, rows=slice(2, 3)):
        expected = stock_forward(stock, ids).logits
    for row in range(4):
        assert saved[row].shape == (4, 1, ids.shape[1], 64)
        assert torch.all(saved[row][1:] == 0) == (row == 2)
        assert torch.equal(logits[row], expected[row : row + 1])


def test_skip_in_every_invoke_keeps_stacks_on_their_batch_axis(probe, stock, batch_ids):
    ids = batch_ids[:4]
    layer = 1
    logits = []
    with probe.trace() as tracer:
        for row in range(4):
            with tracer.invoke(ids[row : row + 1]):
                probe.layers[layer].skip(probe.layers[layer].input)
                logits.append(probe.logits.output.save())

    def identity_layer(module, args, output):
        return args[0]

    handle = stock.model.language_model.layers[layer].register_forward_hook(identity_layer)
    try:
        expected = stock_forward(stock, ids).logits
    finally:
        handle.remove()
    for row in range(4):
        assert torch.equal(logits[row], expected[row : row + 1])
