"""Patching sweeps: every entry equals the same batch patched with plain torch hooks on a stock model."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

import g3n_probe as g3n
from g3n_probe.points import POINTS
from reference import capture, edited, stock_forward

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
                                direction=direction, chunk=4)
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


def test_attribution_uses_stock_gradients_and_tracks_the_real_sweep(probe, stock):
    names, layers = ["resid_mid", "altup_predict", "ple_out"], [1, 3, 5]
    estimate = g3n.patching.attribution(probe, CLEAN, CORRUPTED, metric, points=names, layers=layers)
    source = capture(stock, CLEAN)
    for name in names:
        for i, layer in enumerate(layers):
            kept = []

            def keep(value):
                value.retain_grad()
                kept.append(value)
                return value.clone()

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
                                chunk=1)
    assert torch.equal(single.values["attn_out"][0, 0:1], expected)
    assert torch.allclose(result.values["attn_out"][0, 0:1], expected, atol=1e-4 * abs(result.source - result.baseline))


def test_skipping_the_prefix_changes_only_rounding_even_past_kv_store_layers(probe):
    """Layers 4 and 5 reuse the keys and values of store layers 2 and 3, which run while 0 and 1 are skipped."""
    from g3n_probe.patching import patched_metric, prefix_needs

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
