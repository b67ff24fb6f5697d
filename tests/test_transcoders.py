"""Transcoders across every MLP: circuit-tracer's files in and out, the replacement model, training all layers in
one sparsify run, what a replacement keeps, and the one rule for ``<bos>``.

Every expected value is computed here from the formula or with plain torch hooks on a stock model (never with
g3n_probe's own code): ``pre = x·W_encᵀ + b_enc``, ``f = act(pre)``, ``y = f·W_dec + b_dec (+ x·W_skipᵀ)``."""

from __future__ import annotations

import pickle

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import g3n_probe as g3n
from g3n_probe.sae import TranscoderError
from reference import stock_forward

D, F = 64, 96  # the tiny preset's hidden size; latents
LAYERS = 6

TEXTS = [f"def f{i}(x, y):\n    total = x * {i} + y\n    for k in range({i}):\n        total += k\n    return total\n"
         for i in range(12)]


def weights(kind: str, seed: int = 0, d: int = D, f: int = F, skip: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"W_enc": torch.randn(f, d, generator=g) / d ** 0.5, "W_dec": torch.randn(f, d, generator=g) / f ** 0.5,
           "b_enc": torch.randn(f, generator=g) * 0.1, "b_dec": torch.randn(d, generator=g) * 0.1}
    if kind == "jumprelu":
        out["activation_function.threshold"] = torch.rand(f, generator=g) * 0.3
    if skip:
        out["W_skip"] = torch.randn(d, d, generator=g) / d
    return out


def formula_features(w: dict, x: torch.Tensor, kind: str, k: int = 8) -> torch.Tensor:
    pre = torch.nn.functional.linear(x, w["W_enc"], w["b_enc"])
    if kind == "relu":
        return torch.relu(pre)
    if kind == "jumprelu":
        return pre * (pre > w["activation_function.threshold"])
    top = pre.topk(k, dim=-1)  # circuit-tracer's TopK: the k largest pre-activations
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


def formula_out(w: dict, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    y = f @ w["W_dec"] + w["b_dec"]
    return y + x @ w["W_skip"].T if "W_skip" in w else y


def write_circuit_tracer(directory, layers: dict[int, dict], kind: str, k: int = 8,
                         output_hook: str = "hook_mlp_out"):
    """circuit-tracer's per-layer layout, written by hand."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for layer, w in layers.items():
        save_file({name: t.contiguous() for name, t in w.items()}, str(directory / f"layer_{layer}.safetensors"))
        files.append(f"layer_{layer}.safetensors")
    config = {"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": output_hook,
              "transcoders": files}
    if kind == "topk":
        config.update(activation="topk", k=k)
    elif kind == "jumprelu":
        config["activation"] = "jumprelu"
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    return directory


def stock_hooks(stock, layers: dict[int, dict], kind: str, edit=None, output: str = "mlp_out", k: int = 8,
                replace: bool = False):
    """Plain hooks on the stock model: each layer's MLP input kept by a pre-hook; at the output site, the
    value replaced by the reconstruction (``replace``) or moved by an edit's change in it (the error term)."""
    lm = stock.model.language_model
    handles, seen = [], {}
    for layer, w in layers.items():
        mlp = lm.layers[layer].mlp
        site = mlp if output == "mlp" else lm.layers[layer].post_feedforward_layernorm

        def keep(m, args, layer=layer):
            seen[layer] = args[0]

        def hook(m, args, out, layer=layer, w=w):
            x = seen[layer]
            f = formula_features(w, x, kind, k)
            y = formula_out(w, x, f)
            if replace:
                return y
            if edit is None:
                return out
            f2 = edit(layer, f.clone())
            return out + (formula_out(w, x, f2) - y)
        handles += [mlp.register_forward_pre_hook(keep), site.register_forward_hook(hook)]
    return handles


def removed(handles):
    for handle in handles:
        handle.remove()


def no_forward(probe):
    """A pre-hook that fails any forward of the model: errors must come before one."""
    def refuse(m, a):
        raise AssertionError("a forward ran before the error")
    return probe.hf_model.register_forward_pre_hook(refuse)


# ---- the files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["relu", "jumprelu", "topk"])
def test_circuit_tracer_files_give_the_formula_inside_the_model(probe, stock, ids, tmp_path, kind):
    layers = {0: weights(kind, 1), 1: weights(kind, 3)}  # circuit-tracer: the list's i-th file is layer i
    tcs = g3n.sae.load_transcoders(write_circuit_tracer(tmp_path / kind, layers, kind), model=probe)
    assert list(tcs) == [0, 1] and tcs[1].activation == kind and tcs.output_hook == "hook_mlp_out"
    x = torch.randn(5, D)
    assert torch.equal(tcs[1].encode(x), formula_features(layers[1], x, kind))
    with g3n.sae.replaced(probe, tcs, error=False) as r:
        with probe.trace(ids):
            f1 = r.layers[0].features.output.save()
            f3 = r.layers[1].features.output.save()
            logits = probe.logits.output.save()
    handles = stock_hooks(stock, layers, kind, replace=True)
    kept = {}
    lm = stock.model.language_model
    handles += [lm.layers[i].mlp.register_forward_pre_hook(lambda m, a, i=i: kept.__setitem__(i, a[0])) for i in (0, 1)]
    try:
        with torch.no_grad():
            reference = stock_forward(stock, ids).logits
    finally:
        removed(handles)
    assert torch.equal(f1, formula_features(layers[0], kept[0], kind))
    assert torch.equal(f3, formula_features(layers[1], kept[1], kind))
    assert torch.equal(logits, reference)


def test_save_load_round_trips_bit_for_bit(tmp_path):
    w = weights("jumprelu", 2, skip=True)
    tc = g3n.sae.Transcoder(w["W_enc"], w["W_dec"], w["b_enc"], w["b_dec"],
                            threshold=w["activation_function.threshold"], W_skip=w["W_skip"])
    with pytest.warns(UserWarning, match="circuit-tracer would take the i-th file for layer i"):
        g3n.sae.save_transcoders(tmp_path / "a", {0: tc, 4: tc})
    written = load_file(str(tmp_path / "a" / "layer_4.safetensors"))
    assert set(written) == set(w) and all(torch.equal(written[key], w[key]) for key in w)
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["layers"] == [0, 4]  # a gap: said so
    loaded = g3n.sae.load_transcoders(tmp_path / "a")
    assert list(loaded) == [0, 4] and loaded[4].activation == "jumprelu"
    assert all(torch.equal(loaded[4].tensors()[key], w[key]) for key in w)
    with pytest.warns(UserWarning, match="layers"):
        g3n.sae.save_transcoders(tmp_path / "b", loaded)
    for name in ("layer_0.safetensors", "layer_4.safetensors", "config.yaml"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    config = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert config["feature_input_hook"] == "mlp.hook_in" and config["feature_output_hook"] == "hook_mlp_out"
    assert config["transcoders"] == ["layer_0.safetensors", "layer_4.safetensors"]


def test_loading_refuses_bad_files_naming_file_and_key(tmp_path, monkeypatch):
    good = weights("relu")
    bad = dict(good, extra=torch.zeros(3))
    write_circuit_tracer(tmp_path / "unknown", {0: bad}, "relu")
    with pytest.raises(TranscoderError, match=r"layer_0\.safetensors.*'extra'"):
        g3n.sae.load_transcoders(tmp_path / "unknown")
    write_circuit_tracer(tmp_path / "shape", {0: dict(good, b_dec=torch.zeros(D + 1))}, "relu")
    with pytest.raises(TranscoderError, match=r"layer_0\.safetensors.*'b_dec'"):
        g3n.sae.load_transcoders(tmp_path / "shape")
    write_circuit_tracer(tmp_path / "missing_key", {0: {k: v for k, v in good.items() if k != "W_dec"}}, "relu")
    with pytest.raises(TranscoderError, match=r"layer_0\.safetensors.*'W_dec'"):
        g3n.sae.load_transcoders(tmp_path / "missing_key")
    write_circuit_tracer(tmp_path / "missing_file", {0: good, 1: good}, "relu")
    (tmp_path / "missing_file" / "layer_1.safetensors").unlink()
    with pytest.raises(TranscoderError, match=r"layer_1\.safetensors"):
        g3n.sae.load_transcoders(tmp_path / "missing_file")
    # a pickle where a safetensors file should be: refused, never unpickled
    write_circuit_tracer(tmp_path / "pickle", {0: good}, "relu")
    (tmp_path / "pickle" / "layer_0.safetensors").write_bytes(pickle.dumps(good))

    def never(*args, **kwargs):
        raise AssertionError("unpickled")
    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(pickle, "loads", never)
    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(TranscoderError, match=r"layer_0\.safetensors"):
        g3n.sae.load_transcoders(tmp_path / "pickle")


# ---- the replacement model -------------------------------------------------------------------------------


def _set(feature: int, value: float):
    def edit(layer, f):
        f[..., feature] = value
        return f
    return edit


@pytest.mark.parametrize("output, hook", [("mlp_out", "hook_mlp_out"), ("mlp", "mlp.hook_out")])
def test_error_terms_give_the_model_and_a_feature_edit_equals_plain_hooks(probe, stock, ids, tmp_path, output, hook):
    layers = {i: weights("relu", 10 + i) for i in range(LAYERS)}
    tcs = g3n.sae.load_transcoders(write_circuit_tracer(tmp_path, layers, "relu", output_hook=hook))
    with torch.no_grad():
        clean = stock_forward(stock, ids).logits
    with g3n.sae.replaced(probe, tcs) as r:
        with probe.trace(ids):
            logits = probe.logits.output.save()
        assert torch.equal(logits, clean)
        with probe.trace(ids):
            r.layers[1].features.output[..., 5] = 3.0
            r.layers[4].features.output[..., 5] = 3.0
            steered = probe.logits.output.save()
    edit = _set(5, 3.0)
    handles = stock_hooks(stock, {1: layers[1], 4: layers[4]}, "relu", edit=edit, output=output)
    try:
        with torch.no_grad():
            reference = stock_forward(stock, ids).logits
    finally:
        removed(handles)
    assert torch.equal(steered, reference) and not torch.equal(steered, clean)


def test_skip_transcoders_are_exact(probe, stock, ids):
    layers = {2: weights("relu", 5, skip=True)}
    tc = g3n.sae.Transcoder(*(layers[2][key] for key in ("W_enc", "W_dec", "b_enc", "b_dec")), W_skip=layers[2]["W_skip"])
    with torch.no_grad():
        clean = stock_forward(stock, ids).logits
    with g3n.sae.replaced(probe, {2: tc}) as r:
        with probe.trace(ids):
            logits = probe.logits.output.save()
        assert torch.equal(logits, clean)
        with probe.trace(ids):
            r.layers[2].features.output[..., 7] = 2.0
            steered = probe.logits.output.save()
    with g3n.sae.replaced(probe, {2: tc}, error=False):
        with probe.trace(ids):
            replaced_logits = probe.logits.output.save()
    for edit, replace, got in [(_set(7, 2.0), False, steered), (None, True, replaced_logits)]:
        handles = stock_hooks(stock, layers, "relu", edit=edit, replace=replace)
        try:
            with torch.no_grad():
                reference = stock_forward(stock, ids).logits
        finally:
            removed(handles)
        assert torch.equal(got, reference)


def test_bad_input_is_a_clear_error_before_any_forward(probe):
    w = weights("relu")
    good = g3n.sae.Transcoder(w["W_enc"], w["W_dec"], w["b_enc"], w["b_dec"])
    narrow = weights("relu", d=32)
    handle = no_forward(probe)
    try:
        with pytest.raises(TranscoderError, match="d_model=32"):
            with g3n.sae.replaced(probe, {1: g3n.sae.Transcoder(*(narrow[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")))}):
                pass
        with pytest.raises(TranscoderError, match="layers 0..5"):
            with g3n.sae.replaced(probe, {6: good}):
                pass
        with pytest.raises(TranscoderError, match="k=0"):
            g3n.sae.Transcoder(w["W_enc"], w["W_dec"], w["b_enc"], w["b_dec"], k=0)
        with pytest.raises(TranscoderError, match=f"k={F + 1}"):
            g3n.sae.Transcoder(w["W_enc"], w["W_dec"], w["b_enc"], w["b_dec"], k=F + 1)
        with pytest.raises(ValueError, match="given twice"):
            g3n.sae.train_transcoders(probe, TEXTS, [1, 1])
        with pytest.raises(ValueError, match="does not exist"):
            g3n.sae.train_transcoders(probe, TEXTS, [6])
        with pytest.raises(ValueError, match="k=1000 is out of range"):
            g3n.sae.train_transcoders(probe, TEXTS, k=1000)
        with pytest.raises(TypeError, match="non-empty"):
            g3n.sae.train_transcoders(probe, [])
        with pytest.raises(ValueError, match="output="):
            g3n.sae.train_transcoders(probe, TEXTS, output="attn_out")
        with pytest.raises(ValueError, match="non-empty"):
            g3n.sae.evaluate_replacement(probe, [], {1: good})
        with pytest.raises(TranscoderError, match="feature_output_hook"):
            g3n.sae.TranscoderSet({1: good}, output_hook="blocks.1.hook_resid_post")
        elsewhere = g3n.sae.Transcoder(*(w[k].to("meta") for k in ("W_enc", "W_dec", "b_enc", "b_dec")))
        with pytest.raises(TranscoderError, match="layer 2's transcoder is on meta"):
            with g3n.sae.replaced(probe, {2: elsewhere}):
                pass
    finally:
        handle.remove()


# ---- training every layer in one run --------------------------------------------------------------------


def test_train_transcoders_feeds_sparsify_the_mlp_input_and_mlp_out_and_leaves_nothing_behind(probe, stock, tmp_path,
                                                                                                 monkeypatch):
    sparsify = pytest.importorskip("sparsify")
    seen = []
    real = sparsify.SparseCoder.forward

    def forward(self, x, y=None, **kwargs):  # the rows sparsify feeds each coder
        seen.append((x.detach().clone(), y.detach().clone()))
        return real(self, x, y, **kwargs)

    monkeypatch.setattr(sparsify.SparseCoder, "forward", forward)
    hf = probe.hf_model
    modules = [name for name, _ in hf.named_modules()]
    hooks = {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in hf.named_modules()}
    tcs, stats = g3n.sae.train_transcoders(probe, TEXTS, k=4, expansion_factor=2, ctx_len=16, batch_size=2,
                                           progress=False, save_dir=tmp_path / "tc")
    assert [name for name, _ in hf.named_modules()] == modules
    assert {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in hf.named_modules()} == hooks
    assert list(tcs) == list(range(LAYERS)) and tcs.output_hook == "hook_mlp_out"
    assert all(tcs[i].width == 2 * D and tcs[i].k == 4 and tcs[i].W_skip is None for i in tcs)
    assert stats.hookpoints[3] == "language_model.layers.3.transcoder_tap" and len(stats.fvu[0]) >= 3
    loaded = g3n.sae.load_transcoders(tmp_path / "tc")
    assert all(torch.equal(loaded[i].W_dec, tcs[i].W_dec) for i in tcs) and loaded.output_hook == "hook_mlp_out"
    # the first step's rows: each layer's MLP input and post-feedforward norm output, <bos> left out
    chunks = g3n.sae.token_chunks(probe.tokenizer, TEXTS, 16)[:2]
    lm = stock.model.language_model
    got: dict = {}
    handles = []
    for i in range(LAYERS):
        handles.append(lm.layers[i].mlp.register_forward_pre_hook(lambda m, a, i=i: got.__setitem__(("x", i), a[0])))
        handles.append(lm.layers[i].post_feedforward_layernorm.register_forward_hook(
            lambda m, a, o, i=i: got.__setitem__(("y", i), o)))
    try:
        with torch.no_grad():
            stock_forward(stock, chunks)
    finally:
        removed(handles)
    keep = chunks != probe.tokenizer.bos_token_id
    for i in range(LAYERS):
        x, y = seen[i]
        torch.testing.assert_close(x, got[("x", i)][keep], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, got[("y", i)][keep], rtol=1e-5, atol=1e-5)


def test_train_transcoders_on_the_mlp_module_and_with_a_skip(probe):
    pytest.importorskip("sparsify")
    tcs, stats = g3n.sae.train_transcoders(probe, TEXTS[:6], [0, 2], output="mlp", skip=True, k=4, expansion_factor=1,
                                           ctx_len=16, batch_size=2, progress=False)
    assert list(tcs) == [0, 2] and tcs.output_hook == "mlp.hook_out" and tcs.output_point == "mlp"
    assert stats.hookpoints[2] == "language_model.layers.2.mlp" and tcs[2].W_skip.shape == (D, D)


# ---- the one rule for <bos> -------------------------------------------------------------------------------


@pytest.mark.parametrize("function, include_bos", [("train", True), ("train_transcoders", True)])  # False: above
def test_bos_rule_in_training(probe, monkeypatch, function, include_bos):
    sparsify = pytest.importorskip("sparsify")
    rows = []
    real = sparsify.SparseCoder.forward

    def forward(self, x, y=None, **kwargs):
        rows.append(x.shape[0])
        return real(self, x, y, **kwargs)

    monkeypatch.setattr(sparsify.SparseCoder, "forward", forward)
    shape = dict(k=4, ctx_len=16, batch_size=1, progress=False, include_bos=include_bos)
    if function == "train":
        g3n.sae.train(probe, TEXTS[:6], "layers.2.mlp_out", **shape)
    else:
        g3n.sae.train_transcoders(probe, TEXTS[:6], [2], **shape)
    chunks = g3n.sae.token_chunks(probe.tokenizer, TEXTS[:6], 16)  # one pass over all of them
    bos = int((chunks == probe.tokenizer.bos_token_id).sum())
    assert bos > 0 and sum(rows) == chunks.numel() - (0 if include_bos else bos)


class _Ids:
    """The token ids of the forward in flight (a plain pre-hook on the stock-side module), so a coder can be
    garbage at exactly the <bos> rows it is handed (flat, in batch-major order)."""

    def __init__(self, probe):
        self.ids = None
        self.handle = probe.hf_model.register_forward_pre_hook(self.keep, with_kwargs=True)

    def keep(self, m, args, kwargs):
        self.ids = kwargs.get("input_ids", args[0] if args else None)

    def bos_rows(self, n):
        flat = (self.ids == 2).reshape(-1)
        return flat if flat.numel() == n else torch.zeros(n, dtype=torch.bool)


class GarbageAtBos(g3n.sae.Transcoder):
    def __init__(self, w, ids):
        super().__init__(w["W_enc"], w["W_dec"], w["b_enc"], w["b_dec"])
        self.__dict__["ids"] = ids

    def encode(self, x):
        f = super().encode(x)
        return torch.where(self.ids.bos_rows(x.shape[0])[:, None], f * 50 + 30, f)


def test_bos_rule_in_evaluate_replacement(probe):
    w = weights("relu", 7)
    ids = _Ids(probe)
    try:
        good = {1: g3n.sae.Transcoder(w["W_enc"], w["W_dec"], w["b_enc"], w["b_dec"])}
        garbage = {1: GarbageAtBos(w, ids)}
        a = g3n.sae.evaluate_replacement(probe, TEXTS[:4], good, batch_size=2)
        b = g3n.sae.evaluate_replacement(probe, TEXTS[:4], garbage, batch_size=2)
        c = g3n.sae.evaluate_replacement(probe, TEXTS[:4], garbage, batch_size=2, include_bos=True)
        d = g3n.sae.evaluate_replacement(probe, TEXTS[:4], good, batch_size=2, include_bos=True)
    finally:
        ids.handle.remove()
    assert a.to_dict() == b.to_dict()
    assert c.loss_replaced != d.loss_replaced and c.layers[1].fvu != d.layers[1].fvu
    real = sum(len(probe.tokenizer(t)["input_ids"]) for t in TEXTS[:4])
    assert a.tokens == real - 4 and d.tokens == real
    text = str(a)
    assert "loss kept" in text and "all" in text and "<bos> excluded" in text


def test_bos_rule_in_evaluate(probe):
    w = weights("relu", 8)
    ids = _Ids(probe)
    try:
        good = g3n.sae.Transcoder(w["W_enc"], w["W_dec"], w["b_enc"], w["b_dec"])
        garbage = GarbageAtBos(w, ids)
        runs = {(name, bos): g3n.sae.evaluate(probe, TEXTS[:6], "layers.2.mlp", coder, include_bos=bos, batch_size=3)
                for name, coder in (("good", good), ("garbage", garbage)) for bos in (False, True)}
    finally:
        ids.handle.remove()
    assert runs[("good", False)] == runs[("garbage", False)]
    assert runs[("good", True)].fvu != runs[("garbage", True)].fvu
    assert runs[("good", True)].loss_spliced != runs[("garbage", True)].loss_spliced


def test_bos_rule_in_top_activations(probe, tmp_path):
    g3n.cache_dataset(probe, TEXTS[:6], ["layers.2.mlp_out"], tmp_path / "acts", batch_size=3, progress=False)
    rows = g3n.ActivationDataset(tmp_path / "acts", "layers.2.mlp_out")
    at_bos = torch.tensor([int(rows.tokens(int(t))[int(p)]) == 2 for t, p in zip(rows.text_index, rows.positions)])
    x = torch.stack([rows[i].x for i in range(len(rows))])
    direction = x[at_bos].mean(0) - x[~at_bos].mean(0)   # a feature that fires most at <bos>
    w = weights("relu", 9)
    w["W_enc"][0] = direction * 10
    tc = g3n.sae.Transcoder(w["W_enc"], w["W_dec"], w["b_enc"], w["b_dec"])
    included = g3n.sae.top_activations(rows, tc, features=[0], k=3, include_bos=True)
    excluded = g3n.sae.top_activations(rows, tc, features=[0], k=3)
    assert all(at_bos[included.rows[0]])
    assert not any(at_bos[excluded.rows[0]])


def test_token_mask_is_the_one_rule():
    ids = torch.tensor([[0, 0, 2, 5, 6], [2, 7, 8, 9, 2]])
    attention = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert g3n.sae.token_mask(ids, 2, False, attention).tolist() == [[False, False, False, True, True],
                                                                    [False, True, True, True, False]]
    assert g3n.sae.token_mask(ids, 2, True, attention).tolist() == attention.bool().tolist()


def test_the_default_ships_its_transcoders():
    import json

    model = g3n.load()
    path = g3n.sae.default_transcoders()
    tcs = g3n.sae.load_transcoders(path, model=model)
    assert list(tcs) == list(range(6)) and tcs.output_hook == "hook_mlp_out"
    assert all(tcs[i].width == 512 and tcs[i].k == 16 and tcs[i].activation == "topk" for i in tcs)
    record = json.loads((path / "transcoders.json").read_text())
    assert set(record["evaluation"]["layers"]) == {str(i) for i in range(6)} and record["evaluation"]["loss_kept"] > 0.5
    prompt = "def area(width, height):\n    return width * height\n"
    with torch.no_grad(), model.trace(prompt):
        clean = model.logits.output.save()
    with g3n.sae.replaced(model, tcs) as r:
        with torch.no_grad(), model.trace(prompt):
            f = r.layers[2].features.output.save()
            logits = model.logits.output.save()
    assert torch.equal(logits, clean) and int((f[0, 1:] != 0).sum(-1).max()) <= 16
