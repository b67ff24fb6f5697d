"""Injection as one owned object that stock code cannot tell from the stock model.

`g3n.inject` on each of the four stock classes, `Injection.remove` restoring the model exactly, the
table driving the wiring, and what transformers and a user do with a stock model (signature,
generate, Trainer's column selection, deepcopy, pickle) working the same (output_attentions, by call and by
config: test_stock_cannot_tell.py).
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch
from torch import nn
from transformers import Gemma3nForCausalLM
from transformers.models.gemma3n import modeling_gemma3n

import g3n_probe as g3n
from g3n_probe.points import LAYER, POINTS, HookPoint, InjectionError, InputOf, Point
from reference import build_stock, capture, exists_at, stock_forward

# ---- helpers -------------------------------------------------------------------------------------


def module_state(model: nn.Module) -> dict:
    """Everything injection could touch: per module its type, ``__dict__`` keys and hook dicts."""
    state = {}
    for name, module in model.named_modules(remove_duplicate=False):
        hooks = {key: list(value) for key, value in vars(module).items()
                 if ("hooks" in key) and isinstance(value, (dict, set))}
        plain = {key: value for key, value in vars(module).items()
                 if key not in ("_parameters", "_buffers", "_modules") and key not in hooks}
        state[name] = (type(module), sorted(plain), hooks, sorted(module._modules))
    configs = {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()}
    state["<attention>"] = sorted((c.__class__.__name__, c._attn_implementation) for c in configs.values())
    return state


def tap(point: nn.Module, into: list, edit=None):
    """A plain torch forward hook on a HookPoint: record the value, optionally replace it."""
    def hook(module, args, output):
        into.append(output.detach().clone())
        return edit(output) if edit else None
    return point.register_forward_hook(hook)


@pytest.fixture(scope="module")
def stock_eager_copy(tiny_dir):
    return build_stock(tiny_dir, attn_implementation="eager")


def _causal_lm(stock: nn.Module) -> nn.Module:
    text_config = copy.deepcopy(stock.config.text_config)
    model = Gemma3nForCausalLM(text_config)
    model.model.load_state_dict(stock.model.language_model.state_dict())
    model.tie_weights()
    return model.eval()


FOUR_CLASSES = {
    "Gemma3nForConditionalGeneration": lambda stock: copy.deepcopy(stock),
    "Gemma3nModel": lambda stock: copy.deepcopy(stock.model),
    "Gemma3nForCausalLM": _causal_lm,
    "Gemma3nTextModel": lambda stock: copy.deepcopy(stock.model.language_model),
}


# ---- 1. public API: four classes, remove ---------------------------------------------------------


@pytest.fixture(scope="module")
def text_ids(ids):
    """Text ids only: the text-only classes have no vision/audio embedders to swap soft tokens with."""
    return torch.where(ids >= 512, ids - 400, ids)


@pytest.mark.parametrize("kind", list(FOUR_CLASSES))
def test_inject_into_each_stock_class_and_remove(stock, text_ids, kind):
    ids = text_ids
    model = FOUR_CLASSES[kind](stock)
    assert type(model).__name__ == kind
    never = module_state(FOUR_CLASSES[kind](stock))
    before = module_state(model)
    assert before == never
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=torch.ones_like(ids))

    injection = g3n.inject(model)
    assert g3n.Injection.of(model) is injection
    text_layers = injection.text_model.layers
    assert len([p for p in injection.points if p.startswith("layers.2.")]) == len(
        [p for p in POINTS if p.scope == LAYER and p.name != "laurel"])
    if hasattr(model, "lm_head"):
        assert "logits" in injection.points and not injection.absent
    else:
        assert "logits" in injection.absent and "lm_head" in injection.absent["logits"]

    expected = capture(stock, ids)
    seen: list = []
    handle = tap(text_layers[3].altup_predict, seen)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    handle.remove()
    assert torch.equal(seen[0], expected[("altup_predict", 3)])
    field = "logits" if hasattr(model, "lm_head") else "last_hidden_state"
    assert torch.equal(getattr(out, field), getattr(plain, field))

    injection.remove()
    assert g3n.Injection.of(model) is None
    assert module_state(model) == never
    with torch.no_grad():
        again = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert torch.equal(getattr(again, field), getattr(plain, field))


@pytest.mark.parametrize("kind", ["Gemma3nForCausalLM", "Gemma3nTextModel"])
def test_probe_wraps_a_model_the_user_built(stock, text_ids, kind):
    ids = text_ids
    probe = g3n.Gemma3nProbe(FOUR_CLASSES[kind](stock))
    expected = capture(stock, ids)
    with probe.trace(ids):
        predicted = probe.layers[2].altup_predict.output.save()
        ple = probe.layers[4].ple_out.output.save()
        probe.layers[5].ple_out.output[:] = 0
        merged = probe.streams_merged.output.save()
    assert torch.equal(predicted, expected[("altup_predict", 2)])
    assert torch.equal(ple, expected[("ple_out", 4)])
    assert not torch.equal(merged, expected[("streams_merged", None)])  # the write reached the end


def test_inject_twice_and_non_gemma_models_are_refused(stock):
    model = copy.deepcopy(stock)
    g3n.inject(model)
    with pytest.raises(RuntimeError, match="already injected"):
        g3n.inject(model)
    with pytest.raises(TypeError, match="not a stock Gemma 3n model"):
        g3n.inject(nn.Linear(2, 2))


def test_load_goes_through_the_same_injection(probe):
    injection = g3n.Injection.of(probe.hf_model)
    assert injection is probe.injection
    assert injection.points["layers.0.altup_predict"] is probe.hf_model.model.language_model.layers[0].altup_predict


def test_inject_respects_the_users_dtype(stock, ids):
    model = copy.deepcopy(stock).to(torch.bfloat16)
    probe = g3n.Gemma3nProbe(model)
    with probe.trace(ids):
        predicted = probe.layers[1].altup_predict.output.save()
    assert predicted.dtype == torch.bfloat16


# ---- 2. the table drives the wiring --------------------------------------------------------------


Q_IN = Point("q_in", LAYER, "[B,T,D]", "input of self_attn.q_proj", "normed active stream entering attention",
             InputOf("self_attn.q_proj"))


def _stock_q_proj_input(stock: nn.Module, ids: torch.Tensor, layer: int) -> torch.Tensor:
    reference: list = []
    handle = stock.model.language_model.layers[layer].self_attn.q_proj.register_forward_pre_hook(
        lambda m, a: reference.append(a[0].detach().clone()))
    with torch.no_grad():
        stock_forward(stock, ids)
    handle.remove()
    return reference[0]


def test_a_new_row_is_one_line(stock, ids):
    model = copy.deepcopy(stock)
    injection = g3n.inject(model, points=POINTS + (Q_IN,))
    seen: list = []
    handle = tap(model.model.language_model.layers[2].q_in, seen)
    with torch.no_grad():
        stock_forward(model, ids)
    handle.remove()
    assert torch.equal(seen[0], _stock_q_proj_input(stock, ids, 2))
    injection.remove()


def test_a_row_that_cannot_attach_names_itself_and_leaves_the_model_unchanged(stock):
    row = Point("nowhere", LAYER, "[B,T,D]", "", "", InputOf("self_attn.no_such_module"))
    model = copy.deepcopy(stock)
    before = module_state(model)
    with pytest.raises(InjectionError, match=r"point layers\.0\.nowhere.*no_such_module"):
        g3n.inject(model, points=POINTS + (row,))
    assert module_state(model) == before
    assert g3n.Injection.of(model) is None


def test_a_row_that_collides_with_a_stock_attribute_is_refused(stock):
    row = Point("mlp", LAYER, "[B,T,D]", "", "", InputOf("pre_feedforward_layernorm"))
    model = copy.deepcopy(stock)
    with pytest.raises(InjectionError, match="already has an attribute 'mlp'"):
        g3n.inject(model, points=(row,))


# ---- 3. stock code cannot tell -------------------------------------------------------------------


@pytest.fixture(scope="module")
def injected(stock):
    model = copy.deepcopy(stock)
    g3n.inject(model)
    return model


def test_signatures_are_stock(stock, injected):
    assert inspect.signature(injected.forward) == inspect.signature(stock.forward)
    assert "forward" not in injected.__dict__
    altup, stock_altup = injected.model.language_model.layers[0].altup, stock.model.language_model.layers[0].altup
    for method in ("predict", "correct", "compute_router_modalities"):
        assert inspect.signature(getattr(altup, method)) == inspect.signature(getattr(stock_altup, method))
    lm, stock_lm = injected.model.language_model, stock.model.language_model
    assert inspect.signature(lm.project_per_layer_inputs) == inspect.signature(stock_lm.project_per_layer_inputs)


def test_generate_on_a_left_padded_batch_is_stock(stock, injected):
    ids = torch.tensor([[0, 0, 0, 2, 50, 60, 7], [2, 9, 10, 11, 12, 300, 301]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, output_scores=True,
                  return_dict_in_generate=True, pad_token_id=0)
    ours = injected.generate(ids, **kwargs)
    theirs = stock.generate(ids, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.scores, theirs.scores))


def test_trainer_selects_the_same_columns(stock, injected, tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    columns = []
    for model in (stock, injected):
        trainer = Trainer(model=model, args=args)
        trainer._set_signature_columns_if_needed()
        columns.append(trainer._signature_columns)
    assert columns[0] == columns[1] and "input_ids" in columns[0]


def test_deepcopy_is_independent_and_its_points_fire(injected, ids):
    clone = copy.deepcopy(injected)
    original_seen, clone_seen = [], []
    handles = [tap(injected.model.language_model.layers[1].ple_out, original_seen),
               tap(clone.model.language_model.layers[1].ple_out, clone_seen)]
    altup = clone.model.language_model.layers[1].altup
    assert altup.__dict__["predict"].owner is altup  # the copy's method route calls the copy
    with torch.no_grad():
        for parameter in clone.parameters():
            parameter.mul_(0.5)
        halved = stock_forward(clone, ids).logits
        assert (len(original_seen), len(clone_seen)) == (0, 1)
        untouched = stock_forward(injected, ids).logits
    for handle in handles:
        handle.remove()
    assert (len(original_seen), len(clone_seen)) == (1, 1)
    assert not torch.equal(halved, untouched)


def test_a_deepcopy_switched_to_eager_runs_eager(injected, stock_eager_copy, ids):
    """transformers' eager-vs-sdpa tests compare through a deepcopy: the copy must run what it is set to."""
    clone = copy.deepcopy(injected)
    clone.model.language_model.config._attn_implementation = "eager"
    calls = {"n": 0}
    stock_function = modeling_gemma3n.eager_attention_forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return stock_function(*args, **kwargs)

    from unittest import mock

    with mock.patch.object(modeling_gemma3n, "eager_attention_forward", counting), torch.no_grad():
        logits = stock_forward(clone, ids).logits
        assert calls["n"] == clone.config.text_config.num_hidden_layers
        stock_forward(injected, ids)
        assert calls["n"] == clone.config.text_config.num_hidden_layers  # the original still runs sdpa
        assert torch.equal(logits, stock_forward(stock_eager_copy, ids).logits)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_round_trip_keeps_working_points(injected, stock, ids, how):
    if how == "pickle":
        restored = pickle.loads(pickle.dumps(injected))
    else:
        buffer = io.BytesIO()
        torch.save(injected, buffer)
        buffer.seek(0)
        restored = torch.load(buffer, weights_only=False)
    seen: list = []
    handle = tap(restored.model.language_model.layers[2].altup_correct, seen, edit=lambda v: v * 0.5)
    with torch.no_grad():
        edited = stock_forward(restored, ids).logits
    handle.remove()
    with torch.no_grad():
        plain = stock_forward(restored, ids).logits
        assert torch.equal(plain, stock_forward(injected, ids).logits)
    assert len(seen) == 1 and not torch.equal(edited, plain)
    g3n.Injection.of(restored).remove()
    assert not any(isinstance(m, HookPoint) for m in restored.modules())
    assert module_state(restored) == module_state(copy.deepcopy(stock))


def test_no_process_wide_state(stock_eager_copy, ids, tiny_dir):
    """A plain stock eager model next to an injected one calls the stock eager function, once per
    layer, and never g3n_probe's attention route; nothing module-global in transformers was replaced,
    and no config value changed. The injected model enters the route only while a trace watches it."""
    from unittest import mock

    from g3n_probe.points import attention

    injected_eager = copy.deepcopy(stock_eager_copy)
    g3n.inject(injected_eager)
    stock_function = modeling_gemma3n.eager_attention_forward
    assert stock_function.__module__ == modeling_gemma3n.__name__
    assert modeling_gemma3n.AutoModel.__module__.startswith("transformers.")
    assert injected_eager.config.text_config._attn_implementation == "eager"
    calls = {"stock": 0, "route": 0}
    real_init = attention._PatternMode.__init__

    def counting(*args, **kwargs):
        calls["stock"] += 1
        return stock_function(*args, **kwargs)

    def counting_route(self, point):
        calls["route"] += 1
        real_init(self, point)

    layers = stock_eager_copy.config.text_config.num_hidden_layers
    with mock.patch.object(modeling_gemma3n, "eager_attention_forward", counting), \
            mock.patch.object(attention._PatternMode, "__init__", counting_route):
        with torch.no_grad():
            stock_forward(stock_eager_copy, ids)
            stock_forward(injected_eager, ids)   # nobody watches: no route entered
        assert calls == {"stock": 2 * layers, "route": 0}
        probe = g3n.Gemma3nProbe(injected_eager)
        with torch.no_grad(), probe.trace(ids):
            probe.layers[0].attn_pattern.output.save()
        assert calls == {"stock": 3 * layers, "route": layers}
        with torch.no_grad():
            stock_forward(stock_eager_copy, ids)
        assert calls == {"stock": 4 * layers, "route": layers}
    assert stock_eager_copy.config.text_config._attn_implementation == "eager"


# ---- 4. gradients through every point ------------------------------------------------------------


GRAD_LAYERS = (0, 3, 4, 5)  # sparse sliding, KV store (sliding), KV reuse (sliding), KV reuse (full)
GRAD_CASES = [(p.name, None) for p in POINTS if p.scope != LAYER] + [
    (p.name, layer) for p in POINTS if p.scope == LAYER for layer in GRAD_LAYERS if exists_at(p.name, layer)]


def _stock_gradient(stock_model: nn.Module, ids: torch.Tensor, name: str, layer: int | None) -> torch.Tensor:
    """d logits[0,-1,7] / d value at the point, by plain autograd on the stock model."""
    from reference import edited

    kept: list = []

    def keep(value):
        value.retain_grad()
        kept.append(value)
        return value.clone()  # the model continues with a copy, as the snapshot point does

    eager = name == "attn_pattern"
    if name == "resid_mid":
        lm = stock_model.model.language_model
        handle = lm.layers[layer].pre_feedforward_layernorm.register_forward_pre_hook(
            lambda m, a: (a[0].retain_grad(), kept.append(a[0])) and None)
        try:
            out = stock_forward(stock_model, ids)
        finally:
            handle.remove()
    elif eager:
        out = stock_forward(stock_model, ids, output_attentions=True)
        kept.append(out.attentions[layer])
        kept[0].retain_grad()
    else:
        with edited(stock_model, name, layer, keep):
            out = stock_forward(stock_model, ids)
    out.logits[0, -1, 7].backward()
    stock_model.zero_grad(set_to_none=True)
    return kept[0].grad


@pytest.mark.parametrize("name,layer", GRAD_CASES, ids=[f"{n}-{l}" for n, l in GRAD_CASES])
def test_gradient_at_every_point_equals_stock_autograd(probe, probe_eager, stock, stock_eager, ids, name, layer):
    model, reference = (probe_eager, stock_eager) if name == "attn_pattern" else (probe, stock)
    with model.trace(ids):
        envoy = getattr(model.layers[layer], name) if layer is not None else getattr(model, name)
        value = envoy.output
        if name == "logits":
            logits = value
        else:
            logits = model.logits.output
        with logits[0, -1, 7].backward():
            grad = value.grad.save()
    model.hf_model.zero_grad(set_to_none=True)
    expected = _stock_gradient(reference, ids, name, layer)
    assert grad.shape == expected.shape
    assert torch.equal(grad, expected)
    assert grad.abs().sum() > 0


def test_reading_grads_in_the_wrong_order_names_the_point(probe, ids):
    with pytest.raises(Exception, match=r"layers\.3\.mlp_out\.grad.*reverse execution order"):
        with probe.trace(ids):
            early = probe.layers[1].mlp_out.output
            late = probe.layers[3].mlp_out.output
            logits = probe.logits.output
            with logits[0, -1, 7].backward():
                early.grad.save()
                late.grad.save()


# ---- 5. clear errors on the layer stacks and indices; interrupts leave nothing behind --------------


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_wrong_writes_to_layer_stacks_are_point_write_errors(probe, stock, ids, side, bad):
    with pytest.raises(g3n.PointWriteError, match=rf"layers\.2\.{side}.*(4, 1, {ids.shape[1]}, 64)"
                       if bad == "shape" else rf"layers\.2\.{side}.*dtype"):
        with probe.trace(ids):
            envoy = probe.layers[2]
            current = envoy.input if side == "input" else envoy.output
            written = current[:, :, :-1] if bad == "shape" else current.to(torch.float64)
            if side == "input":
                envoy.input = written
            else:
                envoy.output = written
    with probe.trace(ids):
        logits = probe.logits.output.save()
    assert torch.equal(logits, stock_forward(stock, ids).logits)


def test_layer_index_errors_say_how_many_layers(probe):
    count = probe.text_config.num_hidden_layers
    with pytest.raises(IndexError, match=f"layer {count} is out of range: this model has {count} layers"):
        probe.layers[count]
    with pytest.raises(IndexError, match=f"layer -{count + 1} is out of range"):
        probe.layers[-count - 1]
    assert probe.layers[-1]._module is probe.hf_model.model.language_model.layers[count - 1]
    assert len(probe.layers) == count and len(probe.layers[1:3]) == 2


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_inside_a_trace_leaves_no_state(probe, stock, ids, interrupt):
    with pytest.raises(interrupt):
        with probe.trace(ids):
            probe.layers[2].ple_input.output.save()
            probe.layers[3].altup_router_correct.output.save()
            probe.layers[4].input.save()  # the layer's pre-hook has kept its argument; its body has not run
            raise interrupt()
    injection = probe.injection
    assert all(point.pending is None for point in injection.points.values())
    assert all(guard.expected is None for guard in injection.stateful)
    routes = [m.__dict__[k] for m in probe.hf_model.modules() for k in ("predict", "correct", "compute_router_modalities")
              if k in m.__dict__]
    assert routes and all(route.running == 0 for route in routes)
    with probe.trace(ids):
        logits = probe.logits.output.save()
    assert torch.equal(logits, stock_forward(stock, ids).logits)


def test_text_input_without_a_tokenizer_says_so(stock, ids):
    probe = g3n.Gemma3nProbe(copy.deepcopy(stock))
    assert probe.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        with probe.trace("The Eiffel Tower is in"):
            probe.logits.output.save()
    with probe.trace(ids):
        logits = probe.logits.output.save()
    assert torch.equal(logits, stock_forward(stock, ids).logits)


def test_load_without_tokenizer_files_and_with_a_given_tokenizer(tiny_dir, tmp_path, stock, ids):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for item in tiny_dir.iterdir():
        if not item.name.startswith("tokenizer"):
            shutil.copy(item, bare / item.name)
    model = g3n.load(bare)
    assert model.tokenizer is None
    with model.trace(ids):
        logits = model.logits.output.save()
    assert torch.equal(logits, stock_forward(stock, ids).logits)
    with_path = g3n.load(bare, tokenizer=tiny_dir)
    assert with_path.tokenizer is not None
    with_object = g3n.load(bare, tokenizer=with_path.tokenizer)
    assert with_object.tokenizer is with_path.tokenizer
    with pytest.raises(g3n.CheckpointError, match="no tokenizer files"):
        g3n.load(bare, tokenizer=bare)


def test_remove_on_an_eager_model_restores_its_attention(stock_eager_copy, ids):
    model = copy.deepcopy(stock_eager_copy)
    never = module_state(copy.deepcopy(stock_eager_copy))
    injection = g3n.inject(model)
    assert model.config.text_config._attn_implementation == "eager"  # what the user chose, at every stage
    injection.remove()
    assert module_state(model) == never
    with torch.no_grad():
        assert torch.equal(stock_forward(model, ids).logits, stock_forward(stock_eager_copy, ids).logits)


def test_remove_keeps_an_attention_choice_made_after_injection(stock_eager_copy):
    model = copy.deepcopy(stock_eager_copy)
    injection = g3n.inject(model)
    model.model.language_model.config._attn_implementation = "sdpa"
    injection.remove()
    assert model.config.text_config._attn_implementation == "sdpa"


def test_a_new_row_fires_in_a_trace_between_its_neighbours(stock, ids):
    table = list(POINTS)
    table.insert(table.index(next(p for p in POINTS if p.name == "attn_z")), Q_IN)
    model = copy.deepcopy(stock)
    g3n.inject(model, points=table)
    probe = g3n.Gemma3nProbe(model)
    with probe.trace(ids):
        laurel = probe.layers[2].laurel.output.save()
        q_in = probe.layers[2].q_in.output.save()
        attn_z = probe.layers[2].attn_z.output.save()
    expected = capture(stock, ids)
    assert torch.equal(q_in, _stock_q_proj_input(stock, ids, 2))
    assert torch.equal(laurel, expected[("laurel", 2)]) and torch.equal(attn_z, expected[("attn_z", 2)])


def test_probe_wraps_a_multimodal_base_model(stock, ids):
    probe = g3n.Gemma3nProbe(copy.deepcopy(stock.model))
    expected = capture(stock, ids)
    with probe.trace(ids):
        embed = probe.embed.output.save()
        predicted = probe.layers[3].altup_predict.output.save()
    assert torch.equal(embed, expected[("embed", None)])  # vision/audio ids swapped by Gemma3nModel
    assert torch.equal(predicted, expected[("altup_predict", 3)])


def test_writing_a_layers_whole_inputs_reaches_its_ple_input(probe, ids):
    with probe.trace(ids):
        args, kwargs = probe.layers[2].inputs
        probe.layers[2].inputs = ((args[0], args[1], torch.zeros_like(args[2]), *args[3:]), kwargs)
        kept = probe.layers[2].ple_input.output.save()
        gate = probe.layers[2].ple_gate.output.save()
    assert kept.abs().sum() == 0 and gate.abs().sum() == 0


def test_an_embed_write_never_changes_the_callers_inputs_embeds(stock, text_ids):
    model = copy.deepcopy(stock.model.language_model)
    probe = g3n.Gemma3nProbe(model)
    inputs_embeds = model.embed_tokens(text_ids).detach().clone().requires_grad_(True)
    before = inputs_embeds.detach().clone()
    with probe.trace(inputs_embeds=inputs_embeds):
        probe.embed.output[:] = 0
        hidden = probe.output.last_hidden_state.save()
    assert torch.equal(inputs_embeds.detach(), before)
    assert torch.isfinite(hidden).all()


def test_tensors_returned_outside_a_trace_carry_no_marks(injected, stock, ids):
    with torch.no_grad():
        ours = stock_forward(injected, ids, output_hidden_states=True)
    assert not any(hasattr(h, "_g3n_batch_dim") for h in ours.hidden_states)


def test_a_probe_whose_points_were_removed_says_so(stock, ids):
    probe = g3n.Gemma3nProbe(copy.deepcopy(stock))
    probe.injection.remove()
    with pytest.raises(ValueError, match=r"layers.2.attn_z was removed from this model"):
        with probe.trace(ids):
            probe.layers[2].attn_z.output.save()


def test_a_point_absent_from_this_kind_of_model_says_why(stock, text_ids):
    probe = g3n.Gemma3nProbe(copy.deepcopy(stock.model.language_model))
    with pytest.raises(AttributeError, match="no 'logits' point: Gemma3nTextModel has no lm_head"):
        probe.logits
