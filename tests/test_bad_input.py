"""Bad input gets a clear error naming the problem, raised before torch fails deep inside, and the
model gives the same logits afterwards."""

from __future__ import annotations

import pytest
import torch

from g3n_probe import PointWriteError
from reference import stock_forward


def _still_exact(probe, stock, ids):
    with probe.trace(ids):
        logits = probe.logits.output.save()
    assert torch.equal(logits, stock_forward(stock, ids).logits)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.tensor([[2, 5, 544]]), ValueError, r"token id 544 is out of range: the vocabulary has 544 ids"),
        (torch.tensor([[2, -1, 5]]), ValueError, "non-negative"),
        (torch.tensor([[2.0, 5.0]]), TypeError, "integer"),
        (torch.zeros(1, 0, dtype=torch.long), ValueError, "empty"),
        (torch.tensor([[[2, 5]]]), ValueError, "2-D"),
        ([], ValueError, r"no input \(\[\]\)"),
        (None, ValueError, r"no input \(None\)"),
        ("", ValueError, r"no input"),
        (torch.tensor([[2, 5, 7]], dtype=torch.uint8), TypeError, r"torch.long.*got torch.uint8: convert with ids.long\(\)"),
    ],
)
def test_bad_trace_inputs(probe, stock, ids, bad, error, message):
    with pytest.raises(error, match=message):
        with probe.trace(bad):
            probe.logits.output.save()
    _still_exact(probe, stock, ids)


def test_bad_ids_in_generate(probe, stock, ids):
    with pytest.raises(ValueError, match="out of range"):
        probe.generate(torch.tensor([[2, 9999]]), max_new_tokens=2)
    _still_exact(probe, stock, ids)


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("altup_predict", lambda v: v[:, :, :-1], r"layers.2.altup_predict \[S,B,T,D\]: wrote shape \(4, 1, 13, 64\); expected \(4, 1, 14, 64\)"),
        ("ple_out", lambda v: v.to(torch.float64), "dtype torch.float64; expected torch.float32"),
        ("mlp_act", lambda v: v.sum(), "wrote shape"),
    ],
)
def test_wrong_writes_name_the_point(probe, stock, ids, name, make, message):
    with pytest.raises(PointWriteError, match=message):
        with probe.trace(ids):
            envoy = getattr(probe.layers[2], name)
            envoy.output = make(envoy.output)
    _still_exact(probe, stock, ids)


def test_wrong_write_in_an_invoke(probe, stock, batch_ids, ids):
    with pytest.raises(PointWriteError):
        with probe.trace() as tracer:
            with tracer.invoke(batch_ids[:1]):
                probe.layers[1].altup_predict.output = torch.zeros(4, 2, batch_ids.shape[1], 64)
            with tracer.invoke(batch_ids[1:2]):
                pass
    _still_exact(probe, stock, ids)


def test_non_tensor_write(probe, stock, ids):
    with pytest.raises(PointWriteError, match="expected a tensor"):
        with probe.trace(ids):
            probe.embed.output = 3.0
    _still_exact(probe, stock, ids)


def test_a_nested_trace_is_a_clear_error(probe, stock, ids):
    with pytest.raises(RuntimeError, match="already running a trace"):
        with probe.trace(ids):
            with probe.trace(ids):
                probe.logits.output.save()
    _still_exact(probe, stock, ids)


def test_two_threads_tracing_one_model(probe, stock, ids):
    """One trace runs on a model at a time: a second thread gets a clear error, never mixed values."""
    import threading

    results, errors = [], []
    expected = stock_forward(stock, ids).logits

    def worker():
        try:
            for _ in range(4):
                with probe.trace(ids):
                    logits = probe.logits.output.save()
                results.append(torch.equal(logits, expected))
        except RuntimeError as error:
            errors.append(str(error))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results and all(results)
    assert all("already running a trace" in e for e in errors)
    _still_exact(probe, stock, ids)


def test_generate_inside_a_trace_is_a_clear_error(probe, stock, ids):
    with pytest.raises(RuntimeError, match="generate was called inside a trace"):
        with probe.trace(ids):
            probe.generate(ids, max_new_tokens=2)
            probe.logits.output.save()
    with probe.generate(ids, max_new_tokens=2) as tracer:  # tracing the generation itself works
        generated = tracer.result.save()
    assert generated.shape == (1, ids.shape[1] + 2)
    assert torch.equal(probe.generate(ids, max_new_tokens=2), generated)  # and so does a plain call
    _still_exact(probe, stock, ids)
