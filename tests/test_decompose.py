"""The exact decomposition through AltUp, against an independent frozen replay (tests/reference.py) that
pushes every component's write *forward* through stock modules, where g3n.decompose carries the target
backwards. Both must agree with each other and with the real forward."""

from __future__ import annotations

import pytest
import torch

import g3n_probe as g3n
from reference import frozen_forward_capture, replay_components

PROMPT = "def add(a, b):\n    return a + b\n\ndef mul(a, b):\n    return"


def _direction(vocab: int, a: int, b: int) -> torch.Tensor:
    direction = torch.zeros(vocab)
    direction[a], direction[b] = 1.0, -1.0
    return direction


@pytest.fixture(scope="module")
def default():
    return g3n.load()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _sum_error(result) -> float:
    """How far the components' sum is from the total, relative to the size of the terms summed (the
    components cancel: a total near zero is made of terms that are not)."""
    return float((result.values.sum(0) - result.total).abs().max() / result.values.abs().sum(0).max())


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_every_component_equals_the_forward_replay(which, probe, stock, ids, default):
    model = probe if which == "tiny" else default
    reference_model = stock if which == "tiny" else default.hf_model
    inputs = ids if which == "tiny" else default.tokenizer(PROMPT, return_tensors="pt").input_ids
    a, b = 7, 11
    result = g3n.decompose(model, inputs, (a, b))
    replay = replay_components(reference_model, inputs, _direction(model.text_config.vocab_size, a, b))
    assert result.names == list(replay["components"])
    expected = torch.stack([replay["components"][name] for name in result.names])      # [N, S, B, T]
    scale = float(result.total.abs().max())
    assert (result.by_stream - expected).abs().max() <= 2e-5 * scale
    assert torch.allclose(result.values, expected.sum(1), rtol=0, atol=2e-5 * scale)
    assert _sum_error(result) < 2e-5   # sum-to-whole, fp32 (worst seen 8.7e-6)
    kept = frozen_forward_capture(reference_model, inputs)
    pre_cap = kept["logits"].float()
    cap = model.text_config.final_logit_softcapping
    real = cap * torch.atanh(pre_cap / cap)                                            # undo the soft cap
    assert torch.allclose(result.total, real[..., a] - real[..., b], rtol=0, atol=1e-3 * scale)


def test_the_replay_reproduces_every_layer_stack(stock, ids):
    replay = replay_components(stock, ids, torch.zeros(stock.config.text_config.vocab_size))
    kept = replay["kept"]
    for layer, stack in enumerate(replay["stacks"]):
        real = kept[("output", layer)]
        assert (stack - real).abs().max() <= 1e-5 * real.abs().max(), layer


def test_heads_sum_to_attn_out_and_equal_the_replay(probe, stock, ids):
    a, b = 3, 9
    result = g3n.decompose(probe, ids, (a, b))
    replay = replay_components(stock, ids, _direction(probe.text_config.vocab_size, a, b))
    scale = float(result.total.abs().max())
    for layer in range(probe.text_config.num_hidden_layers):
        heads = result.heads(layer)
        assert heads.shape == (probe.text_config.num_attention_heads, 1, ids.shape[1])
        assert torch.allclose(heads.sum(0), result.component(f"layers.{layer}.attn_out"), rtol=0, atol=2e-5 * scale)
        assert torch.allclose(heads, replay["heads"][layer], rtol=0, atol=2e-5 * scale)


def test_neurons_sum_to_mlp_out(probe, ids):
    result = g3n.decompose(probe, ids, 5, positions=[-1, 2])
    width = probe.text_config.intermediate_size[1]
    indices, values = result.neurons(1, k=width)
    assert indices.shape == values.shape == (width, 1, 2)
    assert torch.allclose(values.sum(0), result.component("layers.1.mlp_out"), rtol=1e-4, atol=1e-5)
    top_i, top_v = result.neurons(1, k=3)
    assert torch.equal(top_v, values[:3]) and (top_v[0].abs() >= top_v[1].abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target", ["token", "pair", "direction", "batch"])
def test_sum_to_whole_at_several_targets(default, dtype, target):
    model = default if dtype == torch.float32 else g3n.load(dtype=dtype)
    vocab = model.text_config.vocab_size
    texts = [PROMPT, "import os\nimport sys\n"]
    targets = {"token": " a", "pair": (" a", " b"), "direction": torch.randn(vocab, generator=torch.Generator().manual_seed(0)),
               "batch": torch.randn(2, vocab, generator=torch.Generator().manual_seed(1))}
    result = g3n.decompose(model, texts, targets[target], positions=[-1, -2, 0])
    assert result.values.shape == (len(result.names), 2, 3) and result.values.dtype == torch.float32
    error = _sum_error(result)
    assert error < (2e-5 if dtype == torch.float32 else 1e-2), error
    assert torch.allclose(result.by_stream.sum(1), result.values)


def test_at_the_last_layer_output_reproduces_the_values(probe, stock, ids):
    """The readout covector of one position, built from the replay's frozen readout, as an at= target."""
    a, b = 7, 11
    position = ids.shape[1] - 1
    full = g3n.decompose(probe, ids, (a, b), positions=[position])
    kept = frozen_forward_capture(stock, ids)
    from reference import replay_readout

    last = probe.text_config.num_hidden_layers - 1
    basis = torch.eye(probe.text_config.hidden_size)
    direction = _direction(probe.text_config.vocab_size, a, b)
    covector = torch.zeros(probe.text_config.altup_num_inputs, probe.text_config.hidden_size)
    for k in range(covector.shape[0]):   # the readout is linear in the last stack: read it off unit vectors
        stack = torch.zeros(covector.shape[0], basis.shape[0], ids.shape[1], basis.shape[0])
        stack[k, :, position] = basis
        covector[k] = replay_readout(stock, {**kept, ("merged", None): kept[("merged", None)].expand(basis.shape[0], -1, -1),
                                             ("output", last): kept[("output", last)].expand(-1, basis.shape[0], -1, -1)},
                                     stack, direction)[k, :, position]
    at = g3n.decompose(probe, ids, covector, positions=[position], at=f"layers.{last}.output")
    assert at.names == full.names
    assert torch.allclose(at.values, full.values, rtol=0, atol=2e-5 * float(full.total.abs().max()))


def test_at_a_middle_stack_sums_to_that_stack(probe, ids):
    vector = torch.randn(probe.text_config.hidden_size, generator=torch.Generator().manual_seed(2))
    for at, layers in (("layers.3.output", 4), ("layers.3.input", 3), ("layers.0.input", 0)):
        result = g3n.decompose(probe, ids, vector, at=at)
        assert len(result.names) == 1 + 4 * layers
        with torch.no_grad(), probe.trace(ids):
            stack = getattr(probe.layers[3 if layers else 0], at.rsplit(".", 1)[1]).save()
        assert torch.allclose(result.total, (stack * vector).sum(-1).sum(0).float(), atol=1e-5)
        assert _sum_error(result) < 2e-5


def naive_stream_0_dla(model, ids, a: int, b: int) -> torch.Tensor:
    """What a generic tool does: every write (and stream 0 of the initial stack) read through the final
    norm's frozen scale and the unembedding, as if stream 0 were the residual. Per position [B, T]."""
    stock = model.hf_model
    kept = frozen_forward_capture(stock, ids)
    lm = stock.model.language_model
    scale = torch.pow(kept[("merged", None)].pow(2).mean(-1, keepdim=True) + lm.norm.eps, -0.5) * lm.norm.weight.detach().float()
    unembed = (stock.lm_head.weight[a] - stock.lm_head.weight[b]).detach().float()
    writes = [kept[("input", 0)][0]] + [kept[(name, i)] for i in range(lm.config.num_hidden_layers)
                                         for name in ("attn_out", "laurel_branch", "mlp_out", "ple_out")]
    return sum((scale * w * unembed).sum(-1) for w in writes)


def test_the_naive_stream_0_shortcut_is_not_the_decomposition(default):
    """The naive shortcut does not add up to the logit difference; the exact decomposition does."""
    ids = default.tokenizer(PROMPT, return_tensors="pt").input_ids
    a, b = (default.tokenizer(t, add_special_tokens=False).input_ids[0] for t in (" a", " b"))
    result = g3n.decompose(default, ids, (a, b), positions=[-1])
    assert _sum_error(result) < 2e-5
    naive = naive_stream_0_dla(default, ids, a, b)[:, -1]
    assert float((naive - result.total[:, 0]).abs()) > 0.1 * float(result.total.abs())
    assert result.table(k=3).__rich__() is not None and "layers." in result._repr_html_()
    fig = result.plot()
    assert len(fig.axes[0].patches) == len(result.names) * default.text_config.altup_num_inputs


@pytest.mark.parametrize("kwargs,message", [
    ({"target": "no such token here"}, "a target names one token"),
    ({"target": (1, 2, 3)}, "a target pair is"),
    ({"target": 10**9}, "out of range"),
    ({"target": torch.zeros(5)}, "a target tensor is a float direction"),
    ({"target": 3, "positions": [99]}, "fall outside the sequence"),
    ({"target": 3, "positions": [1, 1]}, "the same token twice"),
    ({"target": 3, "at": "layers.99.output"}, "this model has layers"),
    ({"target": 3, "at": "layers.2.mlp"}, "decompose a layer's stack with"),
    ({"target": torch.zeros(3), "at": "layers.2.output"}, "with at=, the target is a float vector"),
])
def test_bad_arguments_are_named(default, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        g3n.decompose(default, PROMPT, **kwargs)
