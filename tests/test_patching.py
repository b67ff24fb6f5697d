"""Patching sweeps: every entry equals plain torch hooks on a stock model: the same batch bit for bit when only
layers are reused (``reuse="layers"``), one forward of the whole prompt per patch to within 1e-5 of the metric's
span when the target's keys and values are reused too (``reuse="tokens"``, the default)."""

from __future__ import annotations

import functools
from contextlib import ExitStack

import pytest
import torch

import g3n_probe as g3n
from g3n_probe.points import LAYER, POINTS
from reference import capture, edited, exists_at, stock_forward

CLEAN = torch.tensor([[2, 50, 60, 70, 9, 10, 11, 50, 60]])
CORRUPTED = torch.tensor([[2, 51, 61, 70, 9, 10, 11, 50, 60]])
TARGET = 70


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, TARGET] - logits[:, -1, 71]


def _axis(name: str, symbol: str) -> int:
    point = next(p for p in POINTS if p.name == name)
    return point.shape.strip("[]").split(",").index(symbol)


def _target_layer_outputs(stock, target):
    """Each stock decoder layer's output for the target alone (what `sweep` reuses before a chunk's first patch)."""
    outputs, handles = {}, []
    for i, layer in enumerate(stock.model.language_model.layers):
        handles.append(layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out.detach().clone())))
    with torch.no_grad():
        stock_forward(stock, target)
    for handle in handles:
        handle.remove()
    return outputs


def _stock_chunk(stock, target, variants, source):
    """The same batch, patched with plain hooks on the stock model (tests/reference.py's edits); layers
    before the chunk's first patch give the target's own output (KV 'store' layers run: later layers read
    their keys and values), as `sweep` does."""
    plan: dict = {}
    for row, (layer, name, position) in enumerate(variants):
        plan.setdefault((layer, name), []).append((row, position))
    batch = target.expand(len(variants), -1).contiguous()

    def writer(name, layer, rows):
        batch_axis = 1 if name in ("altup_predict", "altup_correct") else 0
        token_axis = _axis(name, "T")

        def fn(value):
            value = value.clone()
            for row, position in rows:
                index = [slice(None)] * value.dim()
                index[batch_axis], index[token_axis] = row, position
                origin = list(index)
                origin[batch_axis] = 0
                value[tuple(index)] = source[(name, layer)][tuple(origin)]
            return value
        return fn

    prefix = _target_layer_outputs(stock, target)
    modes = stock.config.text_config.kv_sharing_modes
    first = min(layer for layer, _, _ in variants)
    with ExitStack() as stack, torch.no_grad():
        for i in range(first):
            if modes[i] != "store":
                replacement = prefix[i].expand(-1, len(variants), -1, -1).contiguous()
                hook = stock.model.language_model.layers[i].register_forward_hook(lambda m, a, out, r=replacement: r)
                stack.callback(hook.remove)
        for (layer, name), rows in plan.items():
            stack.enter_context(edited(stock, name, layer, writer(name, layer, rows)))
        return metric(stock_forward(stock, batch).logits).float()


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_every_entry_equals_stock_hooks_on_the_same_batch(probe, stock, direction):
    names, layers, positions = ["resid_mid", "altup_predict", "ple_out"], [1, 4], [2, -1]
    result = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, points=names, layers=layers, positions=positions,
                                direction=direction, chunk=4, reuse="layers")
    assert result.reuse == "layers"
    source_ids, target_ids = (CLEAN, CORRUPTED) if direction == "denoise" else (CORRUPTED, CLEAN)
    source = capture(stock, source_ids)
    in_order = sorted(names, key=[p.name for p in POINTS].index)   # sweep's chunks: execution order
    variants = [(layer, name, p % CLEAN.shape[1]) for layer in layers for name in in_order for p in positions]
    assert result.forwards == 3
    for start in range(0, len(variants), 4):
        chunk = variants[start:start + 4]
        expected = _stock_chunk(stock, target_ids, chunk, source)
        got = torch.tensor([result.values[name][layers.index(layer), result.positions.index(position)].item()
                            for layer, name, position in chunk])
        assert torch.equal(got, expected), (chunk, got, expected)
        assert not torch.all(got == result.baseline)  # the patches changed something
    with torch.no_grad():
        assert result.baseline == float(metric(stock_forward(stock, target_ids).logits)[0])
        assert result.source == float(metric(stock_forward(stock, source_ids).logits)[0])


def test_batched_sweep_is_within_rounding_of_one_patch_per_forward(probe):
    kwargs = dict(points=["attn_out", "mlp_out"], layers=[0, 3, 5], positions=[1, 2, -1])
    batched = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, chunk=18, **kwargs)
    single = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, chunk=1, **kwargs)
    assert batched.forwards == 1 and single.forwards == 18
    span = abs(batched.source - batched.baseline)
    for name in batched.points:
        assert torch.allclose(batched.values[name], single.values[name], atol=1e-4 * span, rtol=0)
    # the last position's residual stream carries everything: patching it restores the source exactly
    full = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, points=["altup_correct"], layers=[5], positions=[-1])
    assert full.normalized()["altup_correct"][0, 0].item() == pytest.approx(1.0, abs=1e-5)


def test_sweep_arguments_are_checked(probe):
    with pytest.raises(ValueError, match="same number of tokens"):
        g3n.patching.sweep(probe, CLEAN, CORRUPTED[:, :-1], metric)
    with pytest.raises(ValueError, match="not a per-layer point"):
        g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, points=["logits"])
    with pytest.raises(ValueError, match="direction"):
        g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, direction="sideways")
    with pytest.raises(ValueError, match="out of range"):
        g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, layers=[6])
    with pytest.raises(ValueError, match="chunk"):
        g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, chunk=0)


def test_result_plots_as_a_heatmap(probe):
    result = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, points=["resid_mid", "ple_out"], positions=[1, 2, -1])
    figure = result.plot()
    assert len(figure.axes) >= 2
    assert result.values["resid_mid"].shape == (6, 3) and not torch.isnan(result.values["resid_mid"]).any()


def _retain(kept: list, value: torch.Tensor) -> torch.Tensor:
    """A plain-hook edit that keeps the stock value with its gradient (the model continues with a copy, as
    the snapshot point does)."""
    value.retain_grad()
    kept.append(value)
    return value.clone()


def test_attribution_uses_stock_gradients_and_tracks_the_real_sweep(probe, stock):
    names, layers = ["resid_mid", "altup_predict", "ple_out"], [1, 3, 5]
    estimate = g3n.patching.attribution(probe, CLEAN, CORRUPTED, metric, points=names, layers=layers)
    source = capture(stock, CLEAN)
    for name in names:
        for i, layer in enumerate(layers):
            kept: list = []
            keep = functools.partial(_retain, kept)

            with edited(stock, name, layer, keep):
                out = stock_forward(stock, CORRUPTED)
            metric(out.logits).sum().backward()
            stock.zero_grad(set_to_none=True)
            delta = source[(name, layer)].float() - kept[0].detach().float()
            product = delta * kept[0].grad.float()
            batch_axis = 1 if name == "altup_predict" else 0
            product = product.select(batch_axis, 0)
            token_axis = _axis(name, "T") - (1 if _axis(name, "T") > batch_axis else 0)
            expected = product.movedim(token_axis, 0).reshape(CLEAN.shape[1], -1).sum(-1)
            assert torch.equal(estimate.values[name][i], expected), (name, layer)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return ranks


def test_on_the_default_attribution_ranks_like_the_real_sweep():
    """The bundled default copies in context: corrupt the token a repeated prefix should copy, and
    the sweep finds the copying path; attribution patching estimates it from one backward pass."""
    model = g3n.load()
    generator = torch.Generator().manual_seed(0)
    sequence = torch.randint(300, 4000, (10,), generator=generator)
    clean = torch.cat([torch.tensor([2]), sequence, sequence[:5]])[None]
    corrupted = clean.clone()
    corrupted[0, 6] = 4001
    a, b = int(sequence[5]), 4001

    def copy_metric(logits):
        return logits[:, -1, a] - logits[:, -1, b]

    names = ["resid_mid", "attn_out", "mlp_out", "ple_out"]
    real = g3n.patching.sweep(model, clean, corrupted, copy_metric, points=names, chunk=64)
    estimate = g3n.patching.attribution(model, clean, corrupted, copy_metric, points=names)
    assert real.source - real.baseline > 10  # the default solves it: clean +12.5, corrupted -11.6
    assert real.forwards == 6  # 384 patches
    measured = torch.cat([(real.values[n] - real.baseline).flatten() for n in names])
    estimated = torch.cat([estimate.values[n].flatten() for n in names])
    spearman = torch.corrcoef(torch.stack([_ranks(estimated), _ranks(measured)]))[0, 1]
    assert spearman > 0.7, f"rank correlation {spearman:.3f}"  # 0.794 when written
    normalized = real.normalized()["attn_out"]
    assert normalized[5, -1] > 0.5  # layer 5's attention at the last position carries the copy


def test_position_groups_are_patched_together(probe, stock):
    group = (1, 2)  # the two tokens where the prompts differ
    result = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, points=["attn_out"], layers=[0, 2],
                                positions=[group, -1], chunk=4)
    assert result.positions == [(1, 2), CLEAN.shape[1] - 1]
    source = capture(stock, CLEAN)

    def both(value):
        value = value.clone()
        value[:, list(group)] = source[("attn_out", 0)][:, list(group)]
        return value

    with edited(stock, "attn_out", 0, both), torch.no_grad():
        expected = metric(stock_forward(stock, CORRUPTED).logits).float()
    single = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, points=["attn_out"], layers=[0], positions=[group],
                                chunk=1, reuse="layers")
    assert torch.equal(single.values["attn_out"][0, 0:1], expected)
    assert torch.allclose(result.values["attn_out"][0, 0:1], expected, atol=1e-4 * abs(result.source - result.baseline))


def test_skipping_the_prefix_changes_only_rounding_even_past_kv_store_layers(probe):
    """Layers 4 and 5 reuse the keys and values of store layers 2 and 3, which run while 0 and 1 are skipped."""
    from g3n_probe.analysis.patching import patched_metric, prefix_needs

    names = ["resid_mid"]
    source = probe.cache(CLEAN, names, layers=[4, 5], verbose=False)
    variants = [(4, "resid_mid", 2), (5, "resid_mid", 8), (4, "resid_mid", 8)]
    assert prefix_needs(probe, variants) == {1}, "0 hands on to skipped 1; 1 hands on to store layer 2"
    prefix = {}
    with torch.no_grad(), probe.trace(CORRUPTED):
        prefix[1] = probe.layers[1].output.save()
    by_name = {p.name: p for p in POINTS}
    skipped = patched_metric(probe, CORRUPTED, variants, source, by_name, metric, prefix=prefix)
    plain = patched_metric(probe, CORRUPTED, variants, source, by_name, metric)
    assert torch.allclose(skipped, plain, atol=1e-5, rtol=0) and not torch.equal(skipped, plain.new_zeros(3))
    with pytest.raises(ValueError, match="lacks the target's output of layer"):
        patched_metric(probe, CORRUPTED, variants, source, by_name, metric, prefix={0: prefix[1]})


def test_attention_patterns_are_patched_on_their_query_position(probe_eager):
    layer, positions = 4, [2, -1]
    result = g3n.patching.sweep(probe_eager, CLEAN, CORRUPTED, metric, points=["attn_pattern"], layers=[layer],
                                positions=positions, chunk=2)
    with torch.no_grad(), probe_eager.trace(CLEAN):
        clean_pattern = probe_eager.layers[layer].attn_pattern.output.save()
    span = abs(result.source - result.baseline)
    for j, position in enumerate(positions):
        with torch.no_grad(), probe_eager.trace(CORRUPTED):
            probe_eager.layers[layer].attn_pattern.output[:, :, position] = clean_pattern[:, :, position]
            logits = probe_eager.logits.output.save()
        expected = metric(logits).float()[0]
        assert abs(result.values["attn_pattern"][0, j] - expected) <= 1e-4 * span, (position, expected)
    assert not torch.allclose(result.values["attn_pattern"][0], torch.tensor(result.baseline))


def test_a_sweep_over_no_layers_is_empty(probe):
    result = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, layers=[])
    assert result.forwards == 0 and result.values["resid_mid"].shape == (0, CLEAN.shape[1])


# ---- arguments are checked: nothing wraps, repeats or fills NaN silently ----------------------------------


@pytest.mark.parametrize("positions,error", [
    ([7, 100, -100], r"positions \[100, -100\] out of range: the prompts have 9 tokens.*\[-9, 9\)"),
    ([1, 9], r"positions \[9\] out of range"),
    ([-10], r"positions \[-10\] out of range"),
    ([[0, 9]], r"positions \[9\] out of range"),
    ([[]], "empty position group"),
    ([1, -8], r"positions \[1, -8\] patch the same token"),
    ([(1, 2), (2, 1)], "patch the same token"),
    ([[1, -8]], r"group \[1, -8\] names a position more than once"),
    ([True], "must be an integer"),
    ([2.5], "must be an integer"),
    ([[1, "2"]], "must be an integer"),
    ("12", "positions must be a list"),
])
def test_sweep_positions_are_checked_never_wrapped(probe, positions, error):
    with pytest.raises((TypeError, ValueError), match=error):
        g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, layers=[1], positions=positions)


@pytest.mark.parametrize("kwargs,error", [
    (dict(layers=[3, 3]), r"layers \[3\] are listed more than once"),
    (dict(layers=[1.5]), "a layer must be an integer"),
    (dict(layers=[True]), "a layer must be an integer"),
    (dict(points=["resid_mid", "resid_mid"]), r"points \['resid_mid'\] are listed more than once"),
    (dict(points="resid_mid"), "points must be a list"),
])
@pytest.mark.parametrize("analysis", ["sweep", "attribution"])
def test_layers_and_points_are_listed_once(probe, kwargs, error, analysis):
    with pytest.raises((TypeError, ValueError), match=error):
        getattr(g3n.patching, analysis)(probe, CLEAN, CORRUPTED, metric, **kwargs)


BAD_METRICS = {
    "[N*T]": (lambda logits: logits[..., TARGET].flatten(), r"returned shape \[9\] \(one value per position"),
    "[1]": (lambda logits: logits[:1, -1, TARGET], r"that is \[2\], and it returned shape \[1\] \(one value whatever"),
    "scalar": (lambda logits: logits[:, -1, TARGET].sum(), r"returned shape \[\] \(a scalar"),
    "float": (lambda logits: float(logits[0, -1, TARGET].detach()), "it returned a float, not a tensor"),
    "[N, 2]": (lambda logits: logits[:, -1, [TARGET, 71]], r"returned shape \[1, 2\] \(more than one value per row"),
}


@pytest.mark.parametrize("kind", sorted(BAD_METRICS))
def test_sweep_refuses_a_metric_that_is_not_one_value_per_row_before_any_chunk(probe, monkeypatch, kind):
    from g3n_probe.analysis import patching

    bad, error = BAD_METRICS[kind]
    chunks = []
    real = patching.patched_metric
    monkeypatch.setattr(patching, "patched_metric", lambda *a, **k: chunks.append(1) or real(*a, **k))
    with pytest.raises((TypeError, ValueError), match=r"the metric must return a tensor of shape \[N\].*" + error):
        g3n.patching.sweep(probe, CLEAN, CORRUPTED, bad, layers=[1, 2], positions=[1, 2], chunk=4)
    assert chunks == [], "the metric is checked on the baseline forwards, before any chunk runs"


@pytest.mark.parametrize("kind", sorted(set(BAD_METRICS) - {"[1]"}))  # attribution runs one row: [1] is right there
def test_attribution_refuses_a_metric_that_is_not_one_value_per_row(probe, kind):
    bad, error = BAD_METRICS[kind]
    before = [p.grad for p in probe.hf_model.parameters()]
    with pytest.raises((TypeError, ValueError), match=r"the metric must return a tensor of shape \[N\].*" + error):
        g3n.patching.attribution(probe, CLEAN, CORRUPTED, bad, layers=[1])
    assert all(p.grad is grad for p, grad in zip(probe.hf_model.parameters(), before))   # as they were
    g3n.patching.attribution(probe, CLEAN, CORRUPTED, metric, layers=[1])  # the model is unharmed


def test_each_chunk_result_is_checked_too(probe):
    """A metric that gives one value per row on one or two rows but not on more is caught at its chunk."""
    from g3n_probe.analysis.patching import patched_metric

    def first_two(logits):
        return metric(logits)[:2]

    by_name = {p.name: p for p in POINTS}
    source = probe.cache(CLEAN, ["resid_mid"], layers=[1], verbose=False)
    variants = [(1, "resid_mid", p) for p in (1, 2, 3)]
    with pytest.raises(ValueError, match=r"on logits of shape \[3, 9, \d+\] that is \[3\], and it returned shape \[2\]"):
        patched_metric(probe, CORRUPTED, variants, source, by_name, first_two)


def test_valid_positions_in_every_form_give_the_same_columns(probe):
    as_ints = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, layers=[2], positions=[1, -1, [2, 3]])
    as_tensors = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, layers=[2],
                                    positions=[torch.tensor(1), 8, torch.tensor([3, -7])])
    assert as_ints.positions == as_tensors.positions == [1, 8, (2, 3)]
    assert torch.equal(as_ints.values["resid_mid"], as_tensors.values["resid_mid"])
    assert not torch.isnan(as_ints.values["resid_mid"]).any()


# ---- heads, streams and many pairs: each equals plain hooks on a stock model ---------------------------------

HEADS, STREAMS = 2, 4   # the tiny preset's attention heads and AltUp streams


def _pairs(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` prompt pairs of CLEAN's length: CLEAN/CORRUPTED first, then random ones differing at 1 and 2."""
    generator = torch.Generator().manual_seed(3)
    clean = torch.cat([CLEAN, torch.randint(3, 500, (count - 1, CLEAN.shape[1]), generator=generator)])
    clean[:, 0] = 2
    corrupted = clean.clone()
    corrupted[1:, 1:3] = torch.randint(3, 500, (count - 1, 2), generator=generator)
    corrupted[0] = CORRUPTED[0]
    return clean, corrupted


def _cells(name, position, part):
    """The (token, part) cells a variant writes (part None: the whole value at the token)."""
    tokens = position if isinstance(position, tuple) else (position,)
    parts = part if isinstance(part, tuple) else (part,)
    return [(t, p) for t in tokens for p in parts]


def _write_cells(name, layer, cells, source):
    """An edit writing source cells (row, pair, token, part) into a [B,T,H,Dh] attn_z or an [S,B,T,D] stack."""
    stack = name in ("input", "output", "altup_predict", "altup_correct")

    def fn(value):
        value = value.clone()
        for row, pair, token, part in cells:
            whole = slice(None) if part is None else part
            index, origin = ((whole, row, token), (whole, pair, token)) if stack else \
                ((row, token, whole), (pair, token, whole)) if name == "attn_z" else ((row, token), (pair, token))
            value[index] = source[(name, layer)][origin]
        return value
    return fn


def _stock_patch(stock, stack, name, layer, fn):
    """One point of the stock model edited with plain hooks: a layer stack on the decoder layer's forward
    pre-hook (input) or forward hook (output), anything else through tests/reference.py's `edited`."""
    decoder = stock.model.language_model.layers[layer]
    if name == "input":
        stack.callback(decoder.register_forward_pre_hook(lambda m, a: (fn(a[0]), *a[1:])).remove)
    elif name == "output":
        stack.callback(decoder.register_forward_hook(lambda m, a, out: fn(out)).remove)
    else:
        stack.enter_context(edited(stock, name, layer, fn))


def _stock_rows(stock, target, rows, source, skip=True, metric_fn=None, **forward):
    """Rows (layer, name, position, part, pair) as one stock batch: row r is pair ``pair`` of ``target`` with
    that pair's source cells written in by plain hooks; with ``skip``, the layers before the first patch
    give the target's own outputs from one forward of all K target rows (KV 'store' layers run), as `sweep`
    does. Returns the metric per row."""
    plan: dict = {}
    for row, (layer, name, position, part, pair) in enumerate(rows):
        plan.setdefault((layer, name), []).extend((row, pair, t, p) for t, p in _cells(name, position, part))
    pairs = torch.tensor([row[4] for row in rows])
    modes = stock.config.text_config.kv_sharing_modes
    with ExitStack() as stack, torch.no_grad():
        if skip:
            prefix = _target_layer_outputs(stock, target)
            for i in range(min(row[0] for row in rows)):
                if modes[i] != "store":
                    replacement = prefix[i][:, pairs].contiguous()
                    hook = stock.model.language_model.layers[i].register_forward_hook(lambda m, a, o, r=replacement: r)
                    stack.callback(hook.remove)
        for (layer, name), cells in plan.items():
            _stock_patch(stock, stack, name, layer, _write_cells(name, layer, cells, source))
        return (metric_fn or metric)(stock_forward(stock, target[pairs], **forward).logits).float()


def _entry(result, layer, name, position, part):
    index = (result.layers.index(layer), result.positions.index(position))
    if name in result.parts:
        index += (result.parts[name].index(part),)
    return index


GRANULARITIES = {
    "attn_z each head": (["attn_z"], dict(heads="each")),
    "attn_z heads listed, one a group": (["attn_z"], dict(heads=[1, [0, 1]])),
    "attn_z one head": (["attn_z"], dict(heads=0)),
    "input, all streams": (["input"], {}),
    "input, stream 0": (["input"], dict(streams=0)),
    "output, each stream": (["output"], dict(streams="each")),
    "output and predict, streams 1-3 together": (["altup_predict", "output"], dict(streams=[[1, 2, 3]])),
    "mixed: attn_z per head beside stacks and resid_mid": (["input", "attn_z", "resid_mid", "output"],
                                                          dict(heads=[1], streams=[2, 0])),
}


@pytest.mark.parametrize("kind", sorted(GRANULARITIES))
def test_heads_and_streams_equal_stock_hooks_on_the_same_batch_and_one_patch_per_forward(probe, stock, kind):
    names, kwargs = GRANULARITIES[kind]
    layers, positions = [0, 3, 5], [2, -1]
    result = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, points=names, layers=layers, positions=positions,
                                chunk=5, reuse="layers", **kwargs)
    source = capture(stock, CLEAN)
    stacks = ("input", "output", "altup_predict", "altup_correct")
    spec = {"attn_z": kwargs.get("heads")} | {n: kwargs.get("streams") for n in names if n in stacks}
    for name in result.points:
        given = spec.get(name)
        width = {"attn_z": HEADS}.get(name, STREAMS)
        expected_parts = list(range(width)) if given == "each" else \
            [tuple(p) if isinstance(p, list) else p for p in given] if isinstance(given, list) else None
        assert result.parts.get(name) == expected_parts, name
        extra = () if expected_parts is None else (len(expected_parts),)
        assert result.values[name].shape == (len(layers), len(positions), *extra), name
    parts = {n: (result.parts[n] if n in result.parts else [spec.get(n)]) for n in result.points}
    variants = [(layer, name, p % 9, part) for layer in layers for name in result.points for p in positions
                for part in parts[name]]
    span = abs(result.source - result.baseline)
    for start in range(0, len(variants), 5):
        chunk = variants[start:start + 5]
        expected = _stock_rows(stock, CORRUPTED, [(*v, 0) for v in chunk], source)
        got = torch.stack([result.values[v[1]][_entry(result, *v)] for v in chunk])
        assert torch.equal(got, expected), (chunk, got, expected)
    changed = 0
    for variant in variants:   # one patch per forward, nothing skipped: within rounding of the batched entry
        alone = _stock_rows(stock, CORRUPTED, [(*variant, 0)], source, skip=False)
        got = result.values[variant[1]][_entry(result, *variant)]
        assert abs(got - alone[0]) <= 1e-4 * span, (variant, got, alone)   # batch composition changes BLAS rounding (2 threads)
        changed += bool(alone[0] != result.baseline)
    assert changed > len(variants) // 2   # the patches do something


def test_one_head_of_each_or_all_streams_together_is_the_whole_patch(probe):
    whole = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, points=["attn_z", "output"], layers=[2], chunk=64)
    grouped = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, points=["attn_z", "output"], layers=[2], chunk=64,
                                 heads=[[0, 1]], streams=[[0, 1, 2, 3]])
    for name in ("attn_z", "output"):
        assert torch.equal(grouped.values[name][..., 0], whole.values[name])


def test_patching_a_layers_input_skips_only_the_layers_before_it(probe):
    from g3n_probe.analysis.patching import _skipped, prefix_needs

    assert _skipped(probe, [(0, "input", 1, None)]) == []
    assert _skipped(probe, [(4, "input", 1, None)]) == [0, 1]  # 2 and 3 are KV store layers: they run
    assert prefix_needs(probe, [(2, "input", 1, 0)]) == {1}
    # layer 3's output is what enters layer 4: the same patch, though sweep skips layer 3 only for the latter
    entering = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, points=["input"], layers=[4], streams="each")
    leaving = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, points=["output"], layers=[3], streams="each")
    span = abs(entering.source - entering.baseline)
    assert torch.allclose(entering.values["input"], leaving.values["output"], atol=1e-5 * span, rtol=0)
    # the last layer's output stack at the last position carries everything the logits there read
    full = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, points=["output"], layers=[5], positions=[-1])
    assert full.normalized()["output"][0, 0].item() == pytest.approx(1.0, abs=1e-5)


def test_a_sweep_over_pairs_averages_each_pair_patched_with_its_own_source(probe, stock):
    clean, corrupted = _pairs(3)
    names, layers, positions = ["attn_z", "resid_mid", "output"], [1, 4], [1, -1]
    result = g3n.patching.sweep(probe, clean, corrupted, metric, points=names, layers=layers, positions=positions,
                                heads="each", streams=1, chunk=5, reuse="layers")
    source = capture(stock, clean)
    parts = {"attn_z": list(range(HEADS)), "resid_mid": [None], "output": [1]}
    variants = [(layer, name, p % 9, part) for layer in layers for name in result.points for p in positions
                for part in parts[name]]
    rows = [(*variant, k) for variant in variants for k in range(3)]   # a chunk's rows: variants × pairs
    assert result.pairs == 3 and result.forwards == -(-len(rows) // 5)
    assert result.per_pair["attn_z"].shape == (2, 2, HEADS, 3) and result.per_pair["output"].shape == (2, 2, 3)
    for start in range(0, len(rows), 5):   # chunks split a variant's pairs across forwards
        chunk = rows[start:start + 5]
        expected = _stock_rows(stock, corrupted, chunk, source)
        got = torch.stack([result.per_pair[r[1]][(*_entry(result, *r[:4]), r[4])] for r in chunk])
        assert torch.equal(got, expected), (chunk, got, expected)
    for name in names:
        assert torch.equal(result.values[name], result.per_pair[name].mean(-1))
    with torch.no_grad():
        baselines = metric(stock_forward(stock, corrupted).logits).float()
        sources = metric(stock_forward(stock, clean).logits).float()
    assert torch.equal(result.baselines, baselines) and torch.equal(result.sources, sources)
    assert result.baseline == float(baselines.mean()) and result.source == float(sources.mean())
    for k in range(3):   # each pair on its own, one patch per forward
        single = g3n.patching.sweep(probe, clean[k:k + 1], corrupted[k:k + 1], metric, points=names, layers=layers,
                                    positions=positions, heads="each", streams=1, chunk=1)
        span = abs(single.source - single.baseline)
        for name in names:
            assert torch.allclose(result.per_pair[name][..., k], single.values[name], atol=1e-4 * span, rtol=0)


def test_pairs_given_as_texts_equal_the_same_token_ids(probe):
    clean, corrupted = ["the cat sat", "one dog ran"], ["the cot sat", "one dig ran"]
    ids = probe.tokenizer(clean, return_tensors="pt")["input_ids"]
    other = probe.tokenizer(corrupted, return_tensors="pt")["input_ids"]
    as_text = g3n.patching.sweep(probe, clean, corrupted, metric, points=["attn_z"], layers=[3], heads="each")
    as_ids = g3n.patching.sweep(probe, ids, other, metric, points=["attn_z"], layers=[3], heads="each")
    assert as_text.pairs == 2 and torch.equal(as_text.values["attn_z"], as_ids.values["attn_z"])
    assert as_text.values["attn_z"].shape == (1, ids.shape[1], HEADS)


def test_attribution_over_pairs_is_the_mean_of_each_pairs_estimate(probe, stock):
    clean, corrupted = _pairs(3)
    names, layers = ["input", "attn_z", "output"], [1, 4]
    together = g3n.patching.attribution(probe, clean, corrupted, metric, points=names, layers=layers)
    assert together.per_pair["output"].shape == (2, 9, 3)
    source = capture(stock, clean)
    for k in range(3):
        alone = g3n.patching.attribution(probe, clean[k:k + 1], corrupted[k:k + 1], metric, points=names,
                                         layers=layers)
        for name in names:
            assert torch.allclose(together.per_pair[name][..., k], alone.values[name], atol=1e-5, rtol=1e-4), name
    for name in names:
        assert torch.equal(together.values[name], together.per_pair[name].mean(-1))
    # the stacks' gradients are stock autograd's, read at the decoder layer's own hooks
    for name in ("input", "output"):
        for i, layer in enumerate(layers):
            kept: list = []
            keep = functools.partial(_retain, kept)

            with ExitStack() as stack:
                _stock_patch(stock, stack, name, layer, keep)
                out = stock_forward(stock, corrupted[:1])
            metric(out.logits).sum().backward()
            stock.zero_grad(set_to_none=True)
            product = (source[(name, layer)][:, :1].float() - kept[0].detach().float()) * kept[0].grad.float()
            expected = product[:, 0].permute(1, 0, 2).reshape(9, -1).sum(-1)
            alone = g3n.patching.attribution(probe, clean[:1], corrupted[:1], metric, points=[name], layers=[layer])
            # the gradients are bit-equal; the sum over S·D of the products may be split differently by 2 threads
            assert torch.allclose(alone.values[name][0], expected, rtol=1e-5, atol=1e-6), (name, layer)


def test_result_with_heads_plots_positions_by_heads(probe):
    result = g3n.patching.sweep(probe, CLEAN, CORRUPTED, metric, points=["attn_z", "output"], layers=[1, 2],
                                positions=[1, -1], heads="each", streams=[0, [1, 2, 3]])
    figure = result.plot()
    assert len(figure.axes) >= 2
    assert len(result.column_labels("attn_z")) == 2 * HEADS and result.column_labels("attn_z")[1].endswith(" h1")
    assert result.column_labels("output")[1].endswith(" s1+2+3")


_, _OTHER = _pairs(2)


@pytest.mark.parametrize("kwargs,error", [
    (dict(heads=[2]), r"heads \[2\] out of range: this model has 2 heads, so a head must lie in \[0, 2\)"),
    (dict(heads=-1), r"heads \[-1\] out of range"),
    (dict(heads=[[0, 5]]), r"heads \[5\] out of range"),
    (dict(heads="some"), r"heads must be None or 'all' \(the whole value\), 'each'"),
    (dict(heads=[]), r"heads=\[\] patches nothing"),
    (dict(heads=[0, 0]), r"heads \[0, 0\] patch the same head"),
    (dict(heads=[[1, 1]]), r"head group \[1, 1\] in heads names a head more than once"),
    (dict(heads=[True]), "a head must be an integer"),
    (dict(heads=1.0), "heads must be None"),
    (dict(heads="each", points=["resid_mid", "output"]), r"heads='each' splits attn_z only.*has none"),
    (dict(streams=4, points=["output"]), r"streams \[4\] out of range: this model has 4 streams"),
    (dict(streams=[0, [1, -1]], points=["output"]), r"streams \[-1\] out of range"),
    (dict(streams=0, points=["resid_mid", "attn_z"]), r"streams=0 splits the stream stacks only \(.*input.*\)"),
    (dict(clean=torch.cat([CLEAN, CLEAN])), r"clean has 2 prompt\(s\) and corrupted 1: give one corrupted prompt"),
    (dict(corrupted=_OTHER), r"clean has 1 prompt\(s\) and corrupted 2"),
    (dict(clean=torch.cat([CLEAN, CLEAN])[:, :-1], corrupted=_OTHER), "same number of tokens; got 8 and 9"),
    (dict(clean=["the cat sat", "a dog"], corrupted=["the cot sat", "a dig"]), r"clean texts have unequal lengths"),
    (dict(clean=CLEAN[None]), r"clean token ids must be \[T\] or \[K, T\]"),
    (dict(clean=[]), "clean is an empty list of prompts"),
    (dict(points=["input"], layers=[4], positions=[9]), r"positions \[9\] out of range"),
])
def test_heads_streams_and_pairs_are_checked(probe, kwargs, error):
    kwargs = dict(clean=CLEAN, corrupted=CORRUPTED, points=["attn_z", "output"], layers=[1]) | kwargs
    with pytest.raises((TypeError, ValueError), match=error):
        g3n.patching.sweep(probe, metric=metric, **kwargs)


@pytest.mark.parametrize("kwargs,error", [
    (dict(clean=torch.cat([CLEAN, CLEAN])), r"clean has 2 prompt\(s\) and corrupted 1"),
    (dict(clean=["the cat sat", "a dog"], corrupted=["the cot sat", "a dig"]), "unequal lengths"),
])
def test_attribution_pairs_are_checked(probe, kwargs, error):
    kwargs = dict(clean=CLEAN, corrupted=CORRUPTED) | kwargs
    with pytest.raises(ValueError, match=error):
        g3n.patching.attribution(probe, metric=metric, layers=[1], **kwargs)


# ---- token reuse: a chunk runs from its first patched position on, the target's keys and values before it ----
#
# The reference is one stock forward of the whole prompt per patch, plain hooks, nothing reused. The prompts
# are longer than the tiny preset's sliding window (8), so sliding layers drop keys a full layer keeps; layers
# 2 and 3 are the KV 'store' layers, 4 and 5 reuse their keys and values.

LONG_CLEAN = torch.tensor([[2, 50, 60, 70, 9, 10, 11, 50, 60, 12, 300, 301, 70, 9]])
LONG_CORRUPTED = LONG_CLEAN.clone()
LONG_CORRUPTED[0, 1:3] = torch.tensor([51, 61])
LONG = LONG_CLEAN.shape[1]
A, B = 467, 121   # the last position's logits that move most apart between the two prompts (span ≈ 0.43)
EXACT = 1e-5      # of the metric's span: token reuse changes kernel shapes, so rounding, nothing else
WORST: dict = {}  # the worst |entry − reference| / span seen, per test (printed by the last test)


def long_metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, A] - logits[:, -1, B]


def _assert_per_patch(result, stock, target, source, rows, metric_fn=long_metric, key=None):
    """Each (layer, name, position, part, pair) row's entry against one stock forward of the whole prompt with
    that one patch (plain hooks, nothing skipped or reused), within EXACT of the span."""
    span = abs(result.source - result.baseline)
    worst, changed = 0.0, 0
    for row in rows:
        expected = float(_stock_rows(stock, target, [row], source, skip=False, metric_fn=metric_fn)[0])
        got = float(result.per_pair[row[1]][(*_entry(result, *row[:4]), row[4])])
        worst = max(worst, abs(got - expected) / span)
        changed += expected != float(result.baselines[row[4]])
    WORST[key or len(WORST)] = worst
    assert worst <= EXACT, (worst, rows[:3])
    assert changed, "the patches do something"
    return worst


ALL_POINTS = [p.name for p in POINTS if p.scope == LAYER and p.name != "attn_pattern"]


@pytest.mark.parametrize("name", ALL_POINTS)
def test_token_reuse_equals_one_stock_forward_per_patch_for_every_point(probe, stock, name):
    """Both directions; layers 0, 2-5 (store and reuse layers, sliding and full); positions before and after the
    window; chunks of 3 rows, so chunks start at many positions and layers."""
    layers = [layer for layer in (0, 2, 3, 4, 5) if exists_at(name, layer)]
    positions = [1, 6, 10, 13]
    for direction in ("denoise", "noise"):
        result = g3n.patching.sweep(probe, LONG_CLEAN, LONG_CORRUPTED, long_metric, points=[name], layers=layers,
                                    positions=positions, direction=direction, chunk=3)
        assert result.reuse == "tokens" and result.work < 0.5
        source_ids, target_ids = (LONG_CLEAN, LONG_CORRUPTED) if direction == "denoise" else (LONG_CORRUPTED, LONG_CLEAN)
        source = capture(stock, source_ids)
        rows = [(layer, name, p, None, 0) for layer in layers for p in positions]
        _assert_per_patch(result, stock, target_ids, source, rows, key=(name, direction))
        with torch.no_grad():   # the target's own forward, with its keys and values kept, is the stock one
            assert result.baseline == float(long_metric(stock_forward(stock, target_ids).logits)[0])


def test_token_reuse_patches_position_groups_from_their_first_position(probe, stock):
    positions = [[3, 10], [1, 2], 12, [11, 13]]
    result = g3n.patching.sweep(probe, LONG_CLEAN, LONG_CORRUPTED, long_metric, points=["attn_out", "output"],
                                layers=[1, 3, 5], positions=positions, chunk=4)
    assert result.positions == [(3, 10), (1, 2), 12, (11, 13)]
    rows = [(layer, name, p, None, 0) for layer in (1, 3, 5) for name in result.points for p in result.positions]
    _assert_per_patch(result, stock, LONG_CORRUPTED, capture(stock, LONG_CLEAN), rows, key="groups")


@pytest.mark.parametrize("kind", sorted(GRANULARITIES))
def test_token_reuse_equals_one_stock_forward_per_patch_for_heads_and_streams(probe, stock, kind):
    names, kwargs = GRANULARITIES[kind]
    layers, positions = [0, 3, 5], [2, 9, -1]
    result = g3n.patching.sweep(probe, LONG_CLEAN, LONG_CORRUPTED, long_metric, points=names, layers=layers,
                                positions=positions, chunk=5, **kwargs)
    parts = {n: (result.parts[n] if n in result.parts else
                 [kwargs.get("heads") if n == "attn_z" else kwargs.get("streams")]) for n in result.points}
    parts = {n: [None if p == "all" else p for p in v] for n, v in parts.items()}
    rows = [(layer, name, p % LONG, part, 0) for layer in layers for name in result.points for p in positions
            for part in parts[name]]
    _assert_per_patch(result, stock, LONG_CORRUPTED, capture(stock, LONG_CLEAN), rows, key=kind)


def _long_pairs(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    clean = torch.cat([LONG_CLEAN, torch.randint(3, 500, (count - 1, LONG), generator=generator)])
    clean[:, 0] = 2
    corrupted = clean.clone()
    corrupted[1:, 1:3] = torch.randint(3, 500, (count - 1, 2), generator=generator)
    corrupted[0] = LONG_CORRUPTED[0]
    return clean, corrupted


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_token_reuse_over_pairs_patches_each_pair_with_its_own_source(probe, stock, direction):
    clean, corrupted = _long_pairs(3)
    names, layers, positions = ["attn_z", "resid_mid", "output"], [1, 5], [1, 8, -1]
    result = g3n.patching.sweep(probe, clean, corrupted, long_metric, points=names, layers=layers,
                                positions=positions, heads="each", streams=[0, [1, 2, 3]], chunk=7,
                                direction=direction)
    source_ids, target_ids = (clean, corrupted) if direction == "denoise" else (corrupted, clean)
    parts = {"attn_z": list(range(HEADS)), "resid_mid": [None], "output": [0, (1, 2, 3)]}
    rows = [(layer, name, p % LONG, part, k) for layer in layers for name in result.points for p in positions
            for part in parts[name] for k in range(3)]
    _assert_per_patch(result, stock, target_ids, capture(stock, source_ids), rows, key=("pairs", direction))
    for name in names:
        assert torch.equal(result.values[name], result.per_pair[name].mean(-1))


def _spread_metric(logits: torch.Tensor) -> torch.Tensor:
    """Reads several positions, some before a chunk's first position: those logits are the target's own."""
    return logits[:, -1, A] - logits[:, -1, B] + logits[:, -6, A] - logits[:, 2, B] if logits.shape[1] == LONG else \
        logits[:, -1, A] - logits[:, -1, B] + logits[:, 0, A] - logits[:, 1, B]


@pytest.mark.parametrize("keep", [0, 6, 1])
def test_token_reuse_hands_the_metric_every_position_it_would_see(probe, stock, keep):
    """logits_to_keep=0: all T positions (the target's before a chunk's first one); 6: the last six, more than
    a chunk starting at 10 runs; 1: the last."""
    def keep_metric(logits):
        assert logits.shape[1] == (keep or LONG)
        return _spread_metric(logits) if keep != 1 else long_metric(logits)

    def full_metric(logits):   # the same numbers read from all T positions (the reference's logits)
        return keep_metric(logits[:, -keep:]) if keep else keep_metric(logits)

    layers, positions = [0, 3, 5], [1, 5, 10, 12, 13]
    result = g3n.patching.sweep(probe, LONG_CLEAN, LONG_CORRUPTED, keep_metric, points=["resid_mid"], layers=layers,
                                positions=positions, chunk=2, logits_to_keep=keep)
    rows = [(layer, "resid_mid", p, None, 0) for layer in layers for p in positions]
    _assert_per_patch(result, stock, LONG_CORRUPTED, capture(stock, LONG_CLEAN), rows, metric_fn=full_metric,
                      key=("keep", keep))


@pytest.mark.parametrize("keep", [0, 1])
def test_token_reuse_patches_attention_patterns_on_their_query_with_every_key(probe_eager, keep):
    """A chunk's pattern is [rows, H, T − p, T]: its queries from p on, every key (sliding layers' too); with
    one logit kept, the trailing KV-reuse layers 4 and 5 run their last 4 queries (2 rows × 1 would be fewer
    than 4 rows for a product), still over every key."""
    layers, positions = [0, 1, 4, 5], [0, 2, 9, 13]
    result = g3n.patching.sweep(probe_eager, LONG_CLEAN, LONG_CORRUPTED, long_metric, points=["attn_pattern"],
                                layers=layers, positions=positions, chunk=2, logits_to_keep=keep)
    assert result.reuse == "tokens"
    clean = {}
    with torch.no_grad(), probe_eager.trace(LONG_CLEAN):
        for layer in layers:
            clean[layer] = probe_eager.layers[layer].attn_pattern.output.save()
    span, worst = abs(result.source - result.baseline), 0.0
    for i, layer in enumerate(layers):
        for j, position in enumerate(positions):
            with torch.no_grad(), probe_eager.trace(LONG_CORRUPTED):
                probe_eager.layers[layer].attn_pattern.output[:, :, position] = clean[layer][:, :, position]
                logits = probe_eager.logits.output.save()
            worst = max(worst, abs(float(result.values["attn_pattern"][i, j]) - float(long_metric(logits)[0])) / span)
    WORST[("attn_pattern", keep)] = worst
    assert worst <= EXACT
    assert not torch.allclose(result.values["attn_pattern"], torch.tensor(result.baseline))


def test_token_reuse_skips_store_layers_and_leaves_no_hook_behind(probe, stock):
    """A chunk whose first patch is at layer 4 skips layers 0-3, the store layers 2 and 3 included: a hook hands
    the reuse layers the target's keys and values instead, and is gone after the forward. (Layers 4 and 5 read
    keys and values made at layers 2 and 3, so a patch there reaches no other position: only the last counts.)"""
    from g3n_probe.analysis.patching import _skipped, layers_run, prefix_needs

    variants = [(5, "resid_mid", 9, None), (4, "resid_mid", 12, None)]
    assert _skipped(probe, variants) == [0, 1] and _skipped(probe, variants, keep_stores=False) == [0, 1, 2, 3]
    assert prefix_needs(probe, variants, keep_stores=False) == {3}
    assert layers_run(probe) == [6, 5, 4, 4, 4, 3] and layers_run(probe, keep_stores=False) == [6, 5, 4, 3, 2, 1]
    decoders = probe.hf_model.model.language_model.layers
    before = [len(layer._forward_pre_hooks) for layer in decoders]
    result = g3n.patching.sweep(probe, LONG_CLEAN, LONG_CORRUPTED, long_metric, points=["resid_mid", "attn_out"],
                                layers=[4, 5], positions=[9, 13], chunk=8)
    assert result.forwards == 1 and [len(layer._forward_pre_hooks) for layer in decoders] == before
    rows = [(layer, name, p, None, 0) for layer in (4, 5) for name in result.points for p in (9, 13)]
    _assert_per_patch(result, stock, LONG_CORRUPTED, capture(stock, LONG_CLEAN), rows, key="stores skipped")


def test_with_the_last_logit_kept_reuse_layers_run_their_last_positions_and_unseen_patches_cost_nothing(
        probe, stock, monkeypatch):
    """logits_to_keep=1: layers 4 and 5 make no keys or values (they read layers 2 and 3's), so there a position
    reaches no other. A patch there before the last position changes no kept logit: its entry is the baseline,
    bit for bit what the stock forward gives, and no forward runs for it. Chunks from earlier layers run layers
    4 and 5 at their last position (a chunk from position 0 included, where sdpa had no mask to cut)."""
    from g3n_probe.analysis import prefix_reuse

    assert prefix_reuse.trailing_reuse(probe) == 4
    assert prefix_reuse.tail(probe, 0, 0, LONG, 1, rows=4) == (4, 1)
    assert prefix_reuse.tail(probe, 0, 0, LONG, 1, rows=2) == (4, 4)     # a product of 4 rows at least
    assert prefix_reuse.tail(probe, 3, 5, LONG, 6, rows=4) == (4, 6)
    for args in ((0, 0, LONG, 0), (4, 0, LONG, 1), (0, 13, LONG, 1), (0, 0, LONG, [-1])):
        assert prefix_reuse.tail(probe, *args, rows=8) is None
    cuts = []
    real = prefix_reuse.keep_last_positions
    monkeypatch.setattr(prefix_reuse, "keep_last_positions", lambda *a, **k: cuts.append(a[1:]) or real(*a, **k))
    layers, positions = [0, 2, 3, 4, 5], [0, 3, 9, [3, 13], 13]
    result = g3n.patching.sweep(probe, LONG_CLEAN, LONG_CORRUPTED, long_metric, points=["resid_mid", "output"],
                                layers=layers, positions=positions, chunk=4, logits_to_keep=1)
    unseen = [(layer, name, p) for layer in (4, 5) for name in result.points for p in (0, 3, 9)]
    seen = (len(layers) * len(positions) - 6) * 2
    assert result.forwards == -(-seen // 4) and cuts and all(cut == (1, LONG) for cut in cuts)
    source = capture(stock, LONG_CLEAN)
    for layer, name, p in unseen:
        expected = _stock_rows(stock, LONG_CORRUPTED, [(layer, name, p, None, 0)], source, skip=False,
                               metric_fn=long_metric, logits_to_keep=1)[0]   # the same lm_head kernel
        assert float(result.values[name][result.layers.index(layer), result.positions.index(p)]) == \
            result.baseline == float(expected)
    rows = [(layer, name, p, None, 0) for layer in layers for name in result.points for p in result.positions]
    _assert_per_patch(result, stock, LONG_CORRUPTED, source, rows, key="last logit kept")


def test_token_reuse_falls_back_to_layers_where_it_cannot_run_and_refuses_unknown_modes(probe):
    positions = [2, 10]
    listed = g3n.patching.sweep(probe, LONG_CLEAN, LONG_CORRUPTED, long_metric, layers=[3], positions=positions,
                                logits_to_keep=[-1])
    assert listed.reuse == "layers"   # a list of kept positions would need remapping per chunk
    plain = g3n.patching.sweep(probe, LONG_CLEAN, LONG_CORRUPTED, long_metric, layers=[3], positions=positions,
                               reuse="layers", logits_to_keep=[-1])
    assert torch.equal(listed.values["resid_mid"], plain.values["resid_mid"])
    with pytest.raises(ValueError, match=r"reuse='positions': choose 'tokens'"):
        g3n.patching.sweep(probe, LONG_CLEAN, LONG_CORRUPTED, long_metric, reuse="positions")


def test_rows_are_ordered_into_tiles_that_cost_least():
    from g3n_probe.analysis.patching_plan import chunk_work, reuse_order, work_floor

    layers, tokens = 12, 16
    runs = list(range(layers, 0, -1))
    cells = [(layer, token) for layer in range(layers) for token in range(tokens)]
    for chunk, pairs in ((16, 1), (32, 1), (5, 3)):
        order = reuse_order(cells, pairs, chunk, runs, tokens)
        assert sorted(order) == list(range(len(cells)))
        work = chunk_work(order, cells, pairs, chunk, runs, tokens)
        assert len(work) == -(-len(cells) * pairs // chunk)
        layer_major = chunk_work(list(range(len(cells))), cells, pairs, chunk, runs, tokens)
        assert work.sum() < layer_major.sum()
    # 16 rows: tiles of 4 layers × 4 positions, 0.417 of a forward per patch (the floor is 0.288)
    order = reuse_order(cells, 1, 16, runs, tokens)
    assert [cells[v] for v in order[:4]] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert float(chunk_work(order, cells, 1, 16, runs, tokens).sum()) / (len(cells) * layers * tokens) == \
        pytest.approx(0.4175, abs=1e-3)
    assert work_floor(cells, layers, tokens) == pytest.approx((13 / 24) * (17 / 32))
    assert reuse_order([], 1, 4, runs, tokens) == [] and work_floor([], layers, tokens) == 0.0


def test_the_worst_token_reuse_error_is_reported(probe, stock):
    """Runs last in this file: prints the worst entry − reference over the token-reuse tests this process ran.
    Run alone (or under -k, or on an xdist worker that got none of them) it first runs one such check itself."""
    if not WORST:
        test_token_reuse_patches_position_groups_from_their_first_position(probe, stock)
    worst = max(WORST, key=WORST.get)
    print(f"\nworst token-reuse error: {WORST[worst]:.2e} of the span ({worst}); {len(WORST)} checks")
    assert WORST[worst] <= EXACT
