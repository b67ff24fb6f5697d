"""SAEs spliced into points: identity with the error term (`torch.equal` logits), a feature write equal to the
same edit done with plain torch hooks on a stock model, feature gradients equal to stock autograd, gradients
upstream of the splice unchanged, stacks by stream, transcoders across the MLP, invokes, generate; and training
with sparsify (the optional ``sae`` extra): the loss falls, and a stack trains on its real batch axis."""

from __future__ import annotations

import copy

import pytest
import torch

import g3n_probe as g3n
from reference import stock_forward

D = 64  # the tiny preset's hidden size


class ToySAE:
    """A ReLU SAE written from scratch: what the references compute with, independent of g3n_probe."""

    def __init__(self, d: int = D, f: int = 96, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.randn(d, f, generator=g) / d ** 0.5
        self.b_enc = torch.randn(f, generator=g) * 0.1
        self.W_dec = torch.randn(f, d, generator=g) / f ** 0.5
        self.b_dec = torch.randn(d, generator=g) * 0.1

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


def _through(sae, x, edit):
    """The reference splice of one value [..., D] (error term kept): x moved by the edit's change in reconstruction."""
    flat = x.reshape(-1, x.shape[-1])
    f = sae.encode(flat)
    if edit is None:
        return x
    edited = edit(f.reshape(*x.shape[:-1], -1).clone()).reshape(flat.shape[0], -1)
    return x + (sae.decode(edited) - sae.decode(f)).reshape(x.shape)


def _reference_logits(stock, ids, where, sae, edit=None, stream=None):
    """The stock model with the splice done by a plain forward hook (``where``: a module path of the text model)."""
    lm = stock.model.language_model
    module = lm.get_submodule(where)

    def hook(m, args, out):
        if where.endswith("mlp"):  # a transcoder: the MLP's input in, its output replaced
            flat = args[0].reshape(-1, D)
            f = sae.encode(flat)
            f2 = edit(f.reshape(*args[0].shape[:-1], -1).clone()).reshape(flat.shape[0], -1)
            return out + (sae.decode(f2) - sae.decode(f)).reshape(out.shape)
        if stream is None:
            return _through(sae, out, edit)
        stack = out.clone()
        stack[stream] = _through(sae, out[stream], edit)
        return stack

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return stock_forward(stock, ids).logits
    finally:
        handle.remove()


def _set_feature(f, value=3.0, feature=5):
    f[..., feature] = value
    return f


CASES = [  # (spliced name, stock module the reference hooks, stream)
    ("layers.3.mlp_out", "layers.3.post_feedforward_layernorm", None),
    ("layers.2.ple_out", "layers.2.post_per_layer_input_norm", None),
    ("layers.2.output", "layers.2", 1),
    ("layers.4.output", "layers.4", 0),
]


@pytest.mark.parametrize("name, where, stream", CASES)
def test_identity_with_the_error_term_and_a_feature_write_equal_to_stock_hooks(probe, stock, ids, name, where, stream):
    sae = ToySAE()
    with torch.no_grad():
        clean = stock_forward(stock, ids).logits
    with g3n.sae.spliced(probe, name, sae, stream=stream) as s:
        with probe.trace(ids):
            features = s.features.output.save()
            error = s.error.output.save()
            logits = probe.logits.output.save()
        assert torch.equal(logits, clean)  # nothing written: bit for bit the unspliced model
        with probe.trace(ids):
            s.features.output[..., 5] = 3.0
            steered = probe.logits.output.save()
    assert features.shape == (1, ids.shape[1], 96) and error.shape == (1, ids.shape[1], D)
    assert torch.equal(steered, _reference_logits(stock, ids, where, sae, _set_feature, stream))
    assert not torch.equal(steered, clean)


@pytest.mark.parametrize("name, stream", [("embed", None), ("streams_in", 0), ("layers.2.input", 1), ("layers.1.resid_mid", None),
                                          ("layers.4.attn_out", None), ("layers.0.laurel_branch", None),
                                          ("layers.5.altup_correct", 3), ("streams_merged", None)])
def test_identity_at_every_kind_of_point(probe, stock, ids, name, stream):
    with torch.no_grad():
        clean = stock_forward(stock, ids).logits
    with g3n.sae.spliced(probe, name, ToySAE(), stream=stream) as s:
        with probe.trace(ids):
            logits = probe.logits.output.save()
        assert torch.equal(logits, clean)
        with probe.trace(ids):
            s.features.output[..., 5] = 3.0
            steered = probe.logits.output.save()
    assert not torch.equal(steered, clean)


def test_a_layers_input_is_the_previous_layers_output(probe, ids):
    sae = ToySAE()
    results = []
    for name in ("layers.2.input", "layers.1.output"):
        with g3n.sae.spliced(probe, name, sae, stream=1) as s:
            with probe.trace(ids):
                s.features.output[..., 5] = 3.0
                results.append(probe.logits.output.save())
    assert torch.equal(*results)


def test_without_the_error_term_the_value_is_the_reconstruction(probe, ids):
    sae = ToySAE()
    with probe.trace(ids):
        x = probe.layers[3].mlp_out.output.save()
    with g3n.sae.spliced(probe, "layers.3.mlp_out", sae, error=False) as s:
        assert s.error is None
        with probe.trace(ids):
            out = s.output.save()
    assert torch.equal(out, sae.decode(sae.encode(x.reshape(-1, D))).reshape(x.shape))


def test_every_stream_of_a_stack(probe, stock, ids):
    sae = ToySAE()
    with g3n.sae.spliced(probe, "layers.1.output", sae) as s:
        with probe.trace(ids):
            f = s.features.output.save()
            logits = probe.logits.output.save()
        with torch.no_grad():
            assert torch.equal(logits, stock_forward(stock, ids).logits)
        with probe.trace(ids):
            s.features.output[2, ..., 5] = 3.0  # stream 2 only
            steered = probe.logits.output.save()
    assert f.shape == (4, 1, ids.shape[1], 96)

    def edit(f):
        f[2, ..., 5] = 3.0
        return f
    assert torch.equal(steered, _reference_logits(stock, ids, "layers.1", sae, edit))


def test_a_transcoder_across_the_mlp(probe, stock, ids):
    tc = ToySAE(d=D, f=80, seed=4)
    with torch.no_grad():
        clean = stock_forward(stock, ids).logits
    with probe.trace(ids):
        s = g3n.sae.splice_transcoder(probe.layers[1], tc)
        f = s.features.output.save()
        logits = probe.logits.output.save()
    assert torch.equal(logits, clean) and f.shape == (1, ids.shape[1], 80)
    with g3n.sae.spliced_transcoder(probe, 1, tc) as s:
        with probe.trace(ids):
            s.features.output[..., 5] = 3.0
            steered = probe.logits.output.save()
    assert torch.equal(steered, _reference_logits(stock, ids, "layers.1.mlp", tc, _set_feature))


def test_feature_gradients_equal_stock_autograd_and_upstream_gradients_are_unchanged(probe, stock, ids):
    sae = ToySAE()
    with probe.trace(ids):
        up = probe.layers[1].mlp_out.output
        s = g3n.sae.splice(probe.layers[3].mlp_out, sae)
        f = s.features.output
        e = s.error.output
        logits = probe.logits.output
        with logits[0, -1, 7].backward():  # .grad in reverse execution order
            error_grad = e.grad.save()
            feature_grad = f.grad.save()
            up_grad = up.grad.save()
    lm = stock.model.language_model
    kept = {}

    def keep_up(m, a, o):
        o.retain_grad()
        kept["up"] = o

    def splice(m, a, x):
        leaf = sae.encode(x.detach().reshape(-1, D)).requires_grad_(True)
        kept["leaf"] = leaf
        y = sae.decode(leaf).reshape(x.shape)
        return x + (y - y.detach())

    handles = [lm.layers[1].post_feedforward_layernorm.register_forward_hook(keep_up),
               lm.layers[3].post_feedforward_layernorm.register_forward_hook(splice)]
    stock_forward(stock, ids).logits[0, -1, 7].backward()
    for handle in handles:
        handle.remove()
    assert torch.equal(feature_grad, kept["leaf"].grad.reshape(1, ids.shape[1], -1))
    stock.zero_grad(set_to_none=True)

    def keep_point(m, a, o):
        o.retain_grad()
        kept["point"] = o

    handles = [lm.layers[1].post_feedforward_layernorm.register_forward_hook(keep_up),
               lm.layers[3].post_feedforward_layernorm.register_forward_hook(keep_point)]
    stock_forward(stock, ids).logits[0, -1, 7].backward()
    for handle in handles:
        handle.remove()
    stock.zero_grad(set_to_none=True)
    assert torch.equal(up_grad, kept["up"].grad)  # the error term makes the splice transparent to gradients
    assert torch.equal(error_grad, kept["point"].grad)  # ∂/∂e' is the gradient at the point itself


def test_a_feature_write_in_one_invoke_changes_only_its_rows(probe, stock, batch_ids):
    sae = ToySAE()
    with g3n.sae.spliced(probe, "layers.2.output", sae, stream=3) as s:
        with probe.trace() as tracer:
            with tracer.invoke(batch_ids[:2]):
                s.features.output[..., 5] = 3.0
                first = probe.logits.output.save()
            with tracer.invoke(batch_ids[2:]):
                second = probe.logits.output.save()
    logits = torch.cat([first, second])

    def edit(f):  # rows 0-1 of the batch: the stream's [B,T,F] features
        f[:2, ..., 5] = 3.0
        return f
    assert torch.equal(logits, _reference_logits(stock, batch_ids, "layers.2", sae, edit, stream=3))


def test_steering_during_generate_equals_stock_generate_with_the_hook(probe, stock, ids):
    sae = ToySAE()
    with g3n.sae.spliced(probe, "layers.3.mlp_out", sae) as s:
        with probe.generate(ids, max_new_tokens=4, do_sample=False) as tracer:
            for _ in tracer.iter[0:4]:
                s.features.output[..., 5] = 8.0
            steered = tracer.result.save()
    handle = stock.model.language_model.layers[3].post_feedforward_layernorm.register_forward_hook(
        lambda m, a, o: _through(sae, o, lambda f: _set_feature(f, 8.0)))
    try:
        with torch.no_grad():
            reference = stock.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    assert torch.equal(steered, reference)
    with torch.no_grad():
        unsteered = stock.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert not torch.equal(steered, unsteered)


def test_splices_leave_nothing_behind(probe, ids):
    hf = probe.hf_model
    modules = [name for name, _ in hf.named_modules()]
    hooks = {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in hf.named_modules()}
    with g3n.sae.spliced(probe, "layers.2.output", ToySAE(), stream=0):
        assert "model.language_model.layers.2.sae_output.features" in dict(hf.named_modules())
    with probe.trace(ids):
        g3n.sae.splice(probe.layers[3].mlp_out, ToySAE())
        probe.logits.output.save()
    with pytest.raises(RuntimeError):
        with g3n.sae.spliced(probe, "layers.3.mlp_out", ToySAE()):
            raise RuntimeError("interrupted")
    assert [name for name, _ in hf.named_modules()] == modules
    assert {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in hf.named_modules()} == hooks
    assert not hasattr(probe.layers[3].mlp_out, "sae")
    with probe.trace(ids):  # and the point still serves its value
        probe.layers[3].mlp_out.output.save()


def test_spliced_names_its_point_point_and_still_takes_name_for_a_release(probe, ids):
    """One word for "which point" across g3n.sae (``point``, as evaluate and train take it)."""
    with g3n.sae.spliced(probe, point="layers.3.mlp_out", sae=ToySAE()) as s, probe.trace(ids):
        features = s.features.output.save()
    with pytest.warns(DeprecationWarning, match="point="):
        with g3n.sae.spliced(probe, name="layers.3.mlp_out", sae=ToySAE()) as s, probe.trace(ids):
            old = s.features.output.save()
    assert torch.equal(features, old)
    with pytest.raises(TypeError, match="both name= and point="):
        with g3n.sae.spliced(probe, name="layers.3.mlp_out", point="layers.3.mlp_out", sae=ToySAE()):
            pass


def test_bad_splices_are_clear_errors(probe):
    with pytest.raises(ValueError, match="not a stream stack"):
        with g3n.sae.spliced(probe, "layers.3.mlp_out", ToySAE(), stream=1):
            pass
    with pytest.raises(ValueError, match="unknown point"):
        with g3n.sae.spliced(probe, "layers.3.nope", ToySAE()):
            pass
    with pytest.raises(TypeError, match="no encode"):
        with g3n.sae.spliced(probe, "layers.3.mlp_out", object()):
            pass
    with g3n.sae.spliced(probe, "layers.3.mlp_out", ToySAE()):
        with pytest.raises(ValueError, match="already has an SAE"):
            with g3n.sae.spliced(probe, "layers.3.mlp_out", ToySAE()):
                pass
    with pytest.raises(ValueError, match="eager"):
        with g3n.sae.spliced(probe, "layers.1.attn_pattern", ToySAE()):
            pass


# ---- training with sparsify (the optional `sae` extra) -----------------------------------------------------

TEXTS = [f"def f{i}(x, y):\n    total = x * {i} + y\n    for k in range({i}):\n        total += k\n    return total\n"
         for i in range(40)]


def test_training_on_the_default_makes_the_loss_fall():
    pytest.importorskip("sparsify")
    model = g3n.load()
    trained = g3n.sae.train(model, TEXTS, "layers.2.mlp_out", k=8, expansion_factor=4, ctx_len=32, batch_size=4,
                            progress=False)
    assert trained.hookpoint == "language_model.layers.2.mlp_out" and len(trained.fvu) >= 10
    first, last = sum(trained.fvu[:3]) / 3, sum(trained.fvu[-3:]) / 3
    assert last < 0.8 * first, trained.fvu
    assert all(not p.requires_grad for p in trained.sae.parameters())
    assert all(p.requires_grad for p in model.hf_model.parameters())  # sparsify froze the model; undone
    result = g3n.sae.evaluate(model, TEXTS[:8], "layers.2.mlp_out", trained.sae)
    assert result.l0 <= 8 and 0 < result.fvu < 1 and result.latents == 512
    assert result.loss_clean <= result.loss_spliced
    with g3n.sae.spliced(model, "layers.2.mlp_out", trained.sae) as s:  # sparsify's top-k SparseCoder splices too
        with model.trace(TEXTS[0]):
            f = s.features.output.save()
            logits = model.logits.output.save()
    with torch.no_grad(), model.trace(TEXTS[0]):
        clean = model.logits.output.save()
    assert torch.equal(logits, clean) and int((f[0, 3] != 0).sum()) <= 8


def test_a_stack_trains_on_its_real_batch_axis(probe, monkeypatch):
    sparsify = pytest.importorskip("sparsify")
    seen = []
    real = sparsify.SparseCoder.forward

    def forward(self, x, y=None, **kwargs):  # watch the rows sparsify feeds its SAE
        seen.append(x.detach().clone())
        return real(self, x, y, **kwargs)

    monkeypatch.setattr(sparsify.SparseCoder, "forward", forward)
    trained = g3n.sae.train(probe, TEXTS[:12], "layers.2.output", stream=1, k=4, ctx_len=16, batch_size=2,
                            progress=False)
    assert trained.hookpoint == "language_model.layers.2.output_stream1"
    chunks = g3n.sae.token_chunks(probe.tokenizer, TEXTS[:12], 16)  # the same seed: the chunks train saw, in order
    stack = {}
    handle = probe.hf_model.model.language_model.layers[2].register_forward_hook(
        lambda m, a, o: stack.__setitem__("out", o.detach().clone()))
    try:
        with torch.no_grad():
            probe.hf_model(chunks[:2])
    finally:
        handle.remove()
    special = torch.tensor([probe.tokenizer.bos_token_id, probe.tokenizer.pad_token_id])
    keep = ~torch.isin(chunks[:2], special)
    assert stack["out"].shape[:2] == (4, 2)  # [S, B, T, D]: axis 0 is the stream, axis 1 the batch
    assert torch.equal(seen[0], stack["out"][1][keep])  # stream 1's real (batch, token) rows, BOS left out
    with pytest.raises(ValueError, match="stream stack .* give stream=k"):
        g3n.sae.train(probe, TEXTS[:12], "layers.2.output", ctx_len=16, progress=False)


def test_a_transcoder_trains_across_the_mlp(probe, stock, ids, tmp_path):
    sparsify = pytest.importorskip("sparsify")
    trained = g3n.sae.train(probe, TEXTS[:12], "layers.1.mlp", transcoder=True, k=4, ctx_len=16, batch_size=2,
                            progress=False, save_dir=tmp_path)
    assert trained.hookpoint == "language_model.layers.1.mlp" and trained.sae.cfg.transcode
    saved = sparsify.SparseCoder.load_from_disk(trained.path)  # sparsify's checkpoint: the averaged weights
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), trained.sae.state_dict().values()))
    with torch.no_grad():
        clean = stock_forward(stock, ids).logits
    with g3n.sae.spliced_transcoder(probe, 1, copy.deepcopy(trained.sae)):
        with probe.trace(ids):
            logits = probe.logits.output.save()
    assert torch.equal(logits, clean)
