"""Nothing silently wrong, part 3 (issue 30): the newer instruments under ordinary and hostile input.

Every expected value comes from the stock model run with plain torch hooks (`reference`), or from a state
compared with a never-touched model; every refusal comes before any forward, naming what it refuses.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from transformers import BatchEncoding

import g3n_probe as g3n
from g3n_probe.activations.batch import encode_inputs
from reference import stock_forward

D = 64  # the tiny preset's hidden size


class ToySAE:
    """A ReLU SAE from scratch (not an nn.Module), as in test_sae."""

    def __init__(self, d: int = D, f: int = 96, seed: int = 0, dtype=torch.float32) -> None:
        g = torch.Generator().manual_seed(seed)
        self.W_enc = (torch.randn(d, f, generator=g) / d ** 0.5).to(dtype)
        self.b_enc = (torch.randn(f, generator=g) * 0.1).to(dtype)
        self.W_dec = (torch.randn(f, d, generator=g) / f ** 0.5).to(dtype)
        self.b_dec = (torch.randn(d, generator=g) * 0.1).to(dtype)

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


def hooks_of(model: torch.nn.Module) -> dict:
    """Every module's torch hooks and children: what a refusal must leave as it was."""
    return {name: (list(m._forward_hooks), list(m._forward_pre_hooks), sorted(m._modules))
            for name, m in model.named_modules(remove_duplicate=False)}


TEXT = "hello world"


@pytest.fixture(scope="module")
def encoded(probe):
    return probe.tokenizer([TEXT], return_tensors="pt")


# ---- 1. one input resolver ---------------------------------------------------------------------------


def test_every_input_form_resolves_to_the_same_ids(probe, encoded):
    assert isinstance(encoded, BatchEncoding)   # a UserDict, not a dict
    ids = encoded["input_ids"]
    forms = {
        "text": TEXT, "texts": [TEXT], "ids [T]": ids[0], "ids [B,T]": ids, "list of id lists": ids.tolist(),
        "list of ids": ids[0].tolist(), "dict": dict(encoded), "BatchEncoding": encoded,
        "dict of lists": {"input_ids": ids.tolist(), "attention_mask": encoded["attention_mask"].tolist()},
        "tuple of texts": (TEXT,),
    }
    for label, form in forms.items():
        got, mask = encode_inputs(probe, form)
        assert torch.equal(got, ids), label
        assert mask is None or bool(mask.all()), label


def test_a_padded_batch_encoding_keeps_its_mask(probe):
    texts = ["hello world", "hi"]
    enc = probe.tokenizer(texts, return_tensors="pt", padding=True)
    ids, mask = encode_inputs(probe, enc)
    assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"]) and not bool(mask.all())
    by_text = probe.cache(texts, ["logits"], verbose=False)["logits"]
    by_encoding = probe.cache(enc, ["logits"], verbose=False)["logits"]
    assert torch.equal(by_text, by_encoding)


@pytest.mark.parametrize("bad", [3.5, {"tokens": [1, 2]}, {1, 2}, [1.5, 2.0], [["a"]], object(), b"bytes",
                                 torch.tensor([[1.0, 2.0]]), [TEXT, 3]])
def test_other_inputs_are_type_errors(probe, bad):
    with pytest.raises(TypeError, match="input"):
        encode_inputs(probe, bad)


@pytest.mark.parametrize("empty", [[], "", torch.zeros(0, dtype=torch.long), [[]], (), {"input_ids": []},
                                   torch.zeros(2, 0, dtype=torch.long)])
def test_empty_inputs_are_value_errors(probe, empty):
    with pytest.raises(ValueError, match="empty|no input"):
        encode_inputs(probe, empty)


def test_cache_of_a_tokenizer_output_is_the_stock_forward(probe, stock, encoded):
    with torch.no_grad():
        expected = stock_forward(stock, encoded["input_ids"]).logits
    for form in (encoded, dict(encoded)):
        assert torch.equal(probe.cache(form, ["logits"], verbose=False)["logits"], expected)


def test_decompose_of_a_tokenizer_output_is_the_prompts(probe, stock, encoded):
    ids = encoded["input_ids"]
    with torch.no_grad():
        capped = stock_forward(stock, ids).logits[0, -1, 7].double()
    expected = float(30 * torch.atanh(capped / 30))   # the pre-soft-cap logit
    for form in (TEXT, encoded, dict(encoded), ids[0]):
        result = g3n.decompose(probe, form, 7, positions=-1)
        assert abs(float(result.total[0, 0]) - expected) < 1e-4
        assert abs(float(result.values.sum(0)[0, 0]) - expected) < 1e-4


def test_sweep_attribution_and_logit_lens_read_a_tokenizer_output_as_ids(probe, encoded):
    tok = probe.tokenizer
    clean = tok(["hello world"], return_tensors="pt")
    corrupt = tok(["hello wirld"], return_tensors="pt")
    assert clean["input_ids"].shape == corrupt["input_ids"].shape

    def metric(logits):
        return logits[:, -1, 7] - logits[:, -1, 9]

    by_ids = g3n.patching.sweep(probe, clean["input_ids"], corrupt["input_ids"], metric, points=["mlp_out"], layers=[1])
    by_enc = g3n.patching.sweep(probe, clean, dict(corrupt), metric, points=["mlp_out"], layers=[1])
    assert torch.equal(by_ids.values["mlp_out"], by_enc.values["mlp_out"]) and by_ids.baseline == by_enc.baseline
    a = g3n.patching.attribution(probe, clean["input_ids"], corrupt["input_ids"], metric, points=["mlp_out"], layers=[1])
    b = g3n.patching.attribution(probe, clean, corrupt, metric, points=["mlp_out"], layers=[1])
    assert torch.equal(a.values["mlp_out"], b.values["mlp_out"])
    lens_text = probe.logit_lens(TEXT, k=2)
    lens_enc = probe.logit_lens(encoded, k=2)
    assert lens_text.tokens == lens_enc.tokens and torch.equal(lens_text.ids, lens_enc.ids)


# ---- 2. decompose decomposes what the model ran -----------------------------------------------------


def test_decompose_refuses_a_users_hook_naming_it(probe, ids):
    module = probe.hf_model.model.language_model.layers[3].post_feedforward_layernorm

    def double(m, args, out):
        return out * 2

    handle = module.register_forward_hook(double)
    try:
        with pytest.raises(ValueError, match=r"layers\.3\.post_feedforward_layernorm.*double"):
            g3n.decompose(probe, ids, 7, positions=-1)
    finally:
        handle.remove()
    result = g3n.decompose(probe, ids, 7, positions=-1)   # gone: decomposes again
    assert torch.allclose(result.values.sum(0), result.total, atol=1e-4)


def test_decompose_refuses_a_splice_without_its_error_term(probe, ids):
    with g3n.sae.spliced(probe, "layers.3.mlp_out", ToySAE(), error=False):
        with pytest.raises(ValueError, match=r"layers\.3\.mlp_out.*splice"):
            g3n.decompose(probe, ids, 7, positions=-1)


def test_decompose_under_an_error_term_splice_is_the_plain_one(probe, ids):
    plain = g3n.decompose(probe, ids, 7, positions=-1)
    with g3n.sae.spliced(probe, "layers.3.mlp_out", ToySAE(), error=True):
        spliced = g3n.decompose(probe, ids, 7, positions=-1)
    assert torch.equal(plain.values, spliced.values) and torch.equal(plain.total, spliced.total)


# ---- 3. splice_transcoder takes a layer or its MLP only ------------------------------------------------


@pytest.mark.parametrize("child", ["mlp_out", "laurel", "mlp_act", "self_attn"])
def test_splice_transcoder_refuses_any_other_child_of_a_layer(probe, ids, child):
    before = hooks_of(probe.hf_model)
    with pytest.raises(TypeError, match="layers.i.|MLP"):
        with probe.trace(ids):
            g3n.sae.splice_transcoder(getattr(probe.layers[2], child), ToySAE())
    assert hooks_of(probe.hf_model) == before


# ---- 4. nothing left changed ---------------------------------------------------------------------------


def test_splice_outside_a_trace_is_refused_and_leaves_nothing(probe, stock, ids):
    before = hooks_of(probe.hf_model)
    with pytest.raises(RuntimeError, match="inside a trace"):
        g3n.sae.splice(probe.layers[3].mlp_out, ToySAE(), error=False)
    with pytest.raises(RuntimeError, match="inside a trace"):
        g3n.sae.splice_transcoder(probe.layers[3], ToySAE())
    assert hooks_of(probe.hf_model) == before
    with torch.no_grad():
        expected = stock_forward(stock, ids).logits
    with probe.trace(ids):
        logits = probe.logits.output.save()
    assert torch.equal(logits, expected)


def test_attribution_keeps_a_users_gradients(probe, ids):
    clean, corrupt = ids[:, :6], ids[:, 6:12]
    params = dict(probe.hf_model.named_parameters())
    kept = {name: torch.full_like(p, 0.25) for name, p in list(params.items())[::7]}
    for name, grad in kept.items():
        params[name].grad = grad.clone()
    before = {name: None if p.grad is None else p.grad.clone() for name, p in params.items()}   # others' too
    try:
        g3n.patching.attribution(probe, clean, corrupt, lambda logits: logits[:, -1, 3] - logits[:, -1, 4],
                                 points=["mlp_out"], layers=[1, 2])
        for name, p in params.items():
            if before[name] is None:
                assert p.grad is None, name
            else:
                assert p.grad is not None and torch.equal(p.grad, before[name]), name
        assert all(torch.equal(params[name].grad, grad) for name, grad in kept.items())
    finally:
        probe.hf_model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", ["text", "base"])
def test_probe_over_a_text_or_base_model_with_a_tokenizer(probe, stock, kind):
    model = copy.deepcopy(stock.model.language_model if kind == "text" else stock.model)
    never = hooks_of(copy.deepcopy(model))
    enc = probe.tokenizer([TEXT], return_tensors="pt")
    text_model = model if kind == "text" else model.language_model
    seen = []
    handle = text_model.layers[-1].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        expected = model(**enc).last_hidden_state
    handle.remove()
    wrapped = g3n.Gemma3nProbe(model, tokenizer=probe.tokenizer)
    with wrapped.trace(TEXT):
        out = wrapped.layers[-1].output.save()
        hidden = wrapped.text_model.output.save()
    assert torch.equal(out, seen[0]) and torch.equal(hidden.last_hidden_state, expected)
    wrapped.release()
    assert hooks_of(model) == never


def test_a_failed_wrap_leaves_no_injection(stock):
    model = copy.deepcopy(stock)
    never = hooks_of(copy.deepcopy(stock))
    with pytest.raises(Exception):
        g3n.Gemma3nProbe(model, tokenizer=object())   # not a tokenizer: nnsight's pipeline refuses it
    assert g3n.Injection.of(model) is None and hooks_of(model) == never


def test_release_with_a_splice_pending_leaves_nothing(stock, tiny_dir, ids):
    model = copy.deepcopy(stock)
    never = hooks_of(copy.deepcopy(stock))
    wrapped = g3n.Gemma3nProbe(model)
    from g3n_probe.sae.splice import _for_one_forward, attach, site_of_envoy
    _for_one_forward(attach(site_of_envoy(wrapped.layers[2].mlp_out), ToySAE(), error=False))  # a splice whose forward never came
    wrapped.release()
    assert hooks_of(model) == never
    with torch.no_grad():
        assert torch.equal(stock_forward(model, ids).logits, stock_forward(stock, ids).logits)


# ---- 5. the small silently-wrong ones ------------------------------------------------------------------


def test_test_prompt_with_nothing_before_the_answer_is_refused(probe):
    with pytest.raises(ValueError, match="prompt"):
        probe.test_prompt("", "hello", prepend_bos=False, print_details=False)


def test_test_prompt_of_an_empty_prompt_after_bos_scores_on_the_bos_logits(probe, stock, capsys):
    result = probe.test_prompt("", "hello", prepend_bos=True, print_details=False)
    answer = probe.tokenizer(" hello", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[2, *answer]])
    with torch.no_grad():
        logits = stock_forward(stock, ids).logits[0].float()
    assert result.logits[0] == pytest.approx(float(logits[0, answer[0]]), abs=1e-5)


def test_plot_draws_the_position_asked_for(probe, ids):
    pytest.importorskip("matplotlib")
    import matplotlib
    matplotlib.use("Agg")
    result = g3n.decompose(probe, ids, 7, positions=[2, 5, 9])
    fig = result.plot(position=5)
    assert "position 5" in fig.axes[0].get_title()
    fig = result.plot(position=-1)
    assert "position 9" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="position 3"):
        result.plot(position=3)


def test_a_metric_that_mixes_rows_is_refused(probe, ids):
    clean, corrupt = ids[:, :6], ids[:, 6:12]

    def mixing(logits):
        return logits[:, -1, 3] - logits[:, -1, 4].mean()

    with pytest.raises(ValueError, match="row"):
        g3n.patching.sweep(probe, clean, corrupt, mixing, points=["mlp_out"], layers=[1])


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")])
def test_non_finite_targets_are_refused(probe, ids, bad):
    vocab = probe.text_config.vocab_size
    direction = torch.zeros(vocab)
    direction[3] = bad
    with pytest.raises(ValueError, match="finite"):
        g3n.decompose(probe, ids, direction, positions=-1)
    vector = torch.zeros(D)
    vector[0] = bad
    with pytest.raises(ValueError, match="finite"):
        g3n.decompose(probe, ids, vector, positions=-1, at="layers.2.output")


@pytest.fixture(scope="module")
def dataset_dir(probe, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    g3n.cache_dataset(probe, ["def f(x):", "import os", "class A:", "x = 1"], ["layers.1.ple_out", "layers.1.output"],
                      out, batch_size=2, progress=False)
    return out


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.uint8])
def test_integer_dtypes_are_refused(probe, ids, dataset_dir, dtype):
    with pytest.raises((TypeError, ValueError), match="dtype"):
        g3n.ActivationDataset(dataset_dir, "layers.1.ple_out", dtype=dtype)
    with pytest.raises((TypeError, ValueError), match="dtype"):
        probe.cache(ids, ["layers.1.ple_out"], dtype=dtype, verbose=False)


@pytest.mark.parametrize("index", [1.5, "3", True, None, torch.tensor(1.5)])
def test_dataset_indices_must_be_integers(dataset_dir, index):
    ds = g3n.ActivationDataset(dataset_dir, "layers.1.ple_out")
    with pytest.raises(TypeError, match="integer"):
        ds[index]
    with pytest.raises(TypeError, match="integer"):
        ds.__getitems__([0, index])


def test_dataset_integer_indices_still_work(dataset_dir):
    ds = g3n.ActivationDataset(dataset_dir, "layers.1.ple_out")
    assert torch.equal(ds[torch.tensor(2)].x, ds[2].x) and torch.equal(ds[-1].x, ds[len(ds) - 1].x)


@pytest.mark.parametrize("stream", [-1, 0, 4, 1.0, True])
def test_streams_that_do_not_apply_are_refused(probe, dataset_dir, stream):
    with pytest.raises(ValueError, match="stream"):
        g3n.ActivationDataset(dataset_dir, "layers.1.ple_out", stream=stream)
    if stream in (0,):
        return
    with pytest.raises(ValueError, match="stream"):
        g3n.ActivationDataset(dataset_dir, "layers.1.output", stream=stream)
    with pytest.raises(ValueError, match="stream"):
        with g3n.sae.spliced(probe, "layers.2.output", ToySAE(), stream=stream):
            pass


def test_to_string_refuses_three_axes_and_ids_past_the_vocabulary(probe):
    vocab = probe.text_config.vocab_size
    with pytest.raises(ValueError, match="3-D|1-D or 2-D"):
        probe.to_string(torch.ones(1, 2, 3, dtype=torch.long))
    for bad in (torch.tensor([2, vocab]), [vocab + 5], torch.tensor([[2, -1]])):
        with pytest.raises(ValueError, match="vocabulary|out of range"):
            probe.to_string(bad)
        with pytest.raises(ValueError, match="vocabulary|out of range"):
            probe.to_str_tokens(bad)
    assert probe.to_string(torch.tensor([2, 50])) == probe.tokenizer.decode([2, 50], clean_up_tokenization_spaces=False)


def test_an_attention_dataset_keys_the_texts_positions(probe_eager, stock_eager, tmp_path):
    texts = ["def f(x):", "import os", "x = 1", "class Alpha:"]   # different lengths, padded on the left
    g3n.cache_dataset(probe_eager, texts, ["layers.1.attn_pattern"], tmp_path, batch_size=2, progress=False)
    ds = g3n.ActivationDataset(tmp_path, "layers.1.attn_pattern")
    lengths = [len(probe_eager.tokenizer(text)["input_ids"]) for text in texts]
    assert ds.row_shape[-1] == max(lengths)
    streamed = torch.cat([batch.x for batch in ds.batches(5)])
    for i in range(len(ds)):
        row = ds[i]
        text, position = int(row.text), int(row.position)
        ids = torch.tensor([probe_eager.tokenizer(texts[text])["input_ids"]])
        with torch.no_grad():   # the text alone, unpadded: the stock model's own attention probabilities
            probs = stock_forward(stock_eager, ids, output_attentions=True).attentions[1][0, :, position]
        n = lengths[text]
        assert torch.allclose(row.x[:, :n], probs, atol=1e-5), (text, position)
        assert not bool(row.x[:, n:].any()) and torch.equal(streamed[i], row.x)


def _flip_a_value_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def test_the_reader_verifies_a_shard_changed_after_it_was_built(dataset_dir, tmp_path):
    import shutil
    out = shutil.copytree(dataset_dir, tmp_path / "copy")
    ds = g3n.ActivationDataset(out, "layers.1.ple_out")
    last = ds.paths[-1]
    stat = last.stat()
    _flip_a_value_byte(last)
    os.utime(last, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(ValueError, match=last.name):
        ds[len(ds) - 1]
    with pytest.raises(ValueError, match=last.name):
        list(ds.batches(4))


def test_a_shard_truncated_while_mapped_is_an_error_not_a_crash(dataset_dir, tmp_path):
    import shutil
    out = shutil.copytree(dataset_dir, tmp_path / "copy")
    ds = g3n.ActivationDataset(out, "layers.1.ple_out")
    ds[len(ds) - 1]   # the last shard is open and mapped now
    last = ds.paths[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(ValueError, match=last.name):   # the size changed: verified again, never read past the end
        ds[len(ds) - 1]


def test_two_shards_swapped_after_the_reader_was_built_are_refused(dataset_dir, tmp_path):
    import shutil
    out = shutil.copytree(dataset_dir, tmp_path / "copy")
    ds = g3n.ActivationDataset(out, "layers.1.ple_out")
    a, b = ds.paths[0], ds.paths[1]
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(ValueError, match=a.name):
        ds[0]


# ---- 6. clear errors before any forward ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["layers.3.mlp_out", "layers.2.output", "embed"])
def test_an_sae_of_another_width_is_refused_on_splice(probe, ids, name):
    before = hooks_of(probe.hf_model)
    sae = ToySAE(d=32)
    with pytest.raises(ValueError, match="width 32"):
        with g3n.sae.spliced(probe, name, sae):
            pass
    if name == "layers.3.mlp_out":
        with pytest.raises(ValueError, match="width 32"):
            with probe.trace(ids):
                g3n.sae.splice(probe.layers[3].mlp_out, sae)
    assert hooks_of(probe.hf_model) == before


def test_an_sae_in_another_dtype_runs_in_its_own(probe, stock, ids):
    sae = ToySAE(dtype=torch.float64)
    module = stock.model.language_model.layers[3].post_feedforward_layernorm

    def reference(m, args, out):   # a plain hook: the SAE in float64, its reconstruction back in the model's dtype
        flat = out.reshape(-1, D).double()
        return sae.decode(sae.encode(flat)).reshape(out.shape).to(out.dtype)

    handle = module.register_forward_hook(reference)
    try:
        with torch.no_grad():
            expected = stock_forward(stock, ids).logits
    finally:
        handle.remove()
    with g3n.sae.spliced(probe, "layers.3.mlp_out", sae, error=False):
        with probe.trace(ids):
            logits = probe.logits.output.save()
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("call", ["decompose", "cache", "to_tokens"])
def test_empty_inputs_are_refused_by_every_entry_point(probe, call):
    run = {"decompose": lambda: g3n.decompose(probe, [], 7), "cache": lambda: probe.cache([], ["embed"], verbose=False),
           "to_tokens": lambda: probe.to_tokens([])}[call]
    with pytest.raises(ValueError, match="empty|no input"):
        run()


@pytest.mark.parametrize("k", [-1, 0, 2.5, True])
def test_neurons_k_must_be_positive(probe, ids, k):
    result = g3n.decompose(probe, ids, 7, positions=-1)
    with pytest.raises(ValueError, match="k"):
        result.neurons(2, k=k)


def test_training_mode_is_refused_naming_eval(probe, ids):
    probe.hf_model.train()
    try:
        with pytest.raises(RuntimeError, match=r"eval\(\)"):
            with probe.trace(ids):
                probe.layers[1].mlp_out.output.save()
    finally:
        probe.hf_model.eval()


def test_w_u_without_an_lm_head_says_so(stock):
    wrapped = g3n.Gemma3nProbe(copy.deepcopy(stock.model.language_model))
    with pytest.raises(ValueError, match="lm_head"):
        wrapped.W_U


@pytest.mark.parametrize("kwargs,message", [
    ({"k": 0}, "k=0 is out of range"), ({"k": 10_000}, "k=10000 is out of range"),
    ({"num_latents": 8, "k": 9}, "1..8"), ({"expansion_factor": -1}, "expansion_factor")])
def test_train_refuses_a_shape_sparsify_would_fail_on(probe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        g3n.sae.train(probe, ["def f(x):\n    return x\n"] * 4, "layers.1.mlp_out", **kwargs)


def test_train_refuses_a_stream_on_a_value_that_is_not_a_stack(probe):
    for stream in (0, -1):
        with pytest.raises(ValueError, match="stream"):
            g3n.sae.train(probe, ["def f(x):\n    return x\n"] * 4, "layers.1.mlp_out", stream=stream)
    with pytest.raises(ValueError, match="out of range"):
        g3n.sae.train(probe, ["def f(x):\n    return x\n"] * 4, "layers.1.output", stream=4)


def test_a_probe_that_cannot_be_pickled_says_why_and_its_model_can(probe):
    import pickle

    with pytest.raises(TypeError, match="pickle its stock model instead"):
        pickle.dumps(probe)
    copy_of_model = pickle.loads(pickle.dumps(probe.hf_model))
    ids = torch.tensor([[2, 50, 60, 7]])
    with torch.no_grad():
        assert torch.equal(copy_of_model(input_ids=ids).logits, probe.hf_model(input_ids=ids).logits)
