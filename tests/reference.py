"""An independent reference for every intervention point: a stock model and plain torch hooks.

Nothing here imports g3n_probe's injection code. Values are captured with forward hooks and
pre-hooks on stock modules, or recomputed by calling stock methods (``altup.predict``,
``altup.correct``) on captured inputs. Edits are the same edits done with plain hooks, or by
patching a stock *instance* method for the values that only methods produce.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

import torch
from safetensors.torch import load_file
from torch import nn

Edit = Callable[[torch.Tensor], torch.Tensor]

#: The tiny preset's KV-reuse layers (4 reads layer 3's keys and values, 5 reads layer 2's): they have no
#: k/v modules, so attn_k and attn_v do not exist there (test_kv_sharing checks the preset agrees).
TINY_KV_REUSE = (4, 5)
KV_ONLY = ("attn_k", "attn_v")


def exists_at(name: str, layer: int | None) -> bool:
    """Whether a per-layer point exists at ``layer`` of the tiny preset."""
    return not (name in KV_ONLY and layer in TINY_KV_REUSE)


def build_stock(checkpoint: Path, attn_implementation: str = "sdpa") -> nn.Module:
    """Stock ``Gemma3nForConditionalGeneration`` with the checkpoint's weights and a real audio tower.

    The vision tower is timm's MobileNetV5, which needs timm (not installed in tests), so its
    construction is replaced by an empty module here; it never runs on a text forward.
    """
    from transformers import AutoConfig, Gemma3nForConditionalGeneration
    from transformers.models.gemma3n import modeling_gemma3n

    config = AutoConfig.from_pretrained(checkpoint)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    real_from_config = modeling_gemma3n.AutoModel.from_config

    def from_config(cfg, *args, **kwargs):
        if cfg.model_type == "gemma3n_vision":
            return nn.Module()
        return real_from_config(cfg, *args, **kwargs)

    with mock.patch.object(modeling_gemma3n.AutoModel, "from_config", side_effect=from_config):
        model = Gemma3nForConditionalGeneration(config)
    state = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        state.update(load_file(shard))
    result = model.load_state_dict(state, strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"}, result.missing_keys
    assert all(
        k.startswith("model.vision_tower.") or ".self_attn.k_" in k or ".self_attn.v_" in k
        for k in result.unexpected_keys
    ), result.unexpected_keys
    model.tie_weights()
    return model.eval()


def stock_forward(model: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """What nnsight hands the model for a batch of equal-length token-id rows."""
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)


def _text(model: nn.Module) -> nn.Module:
    return model.model.language_model


def capture(model: nn.Module, ids: torch.Tensor) -> dict:
    """Every point's value for ``ids``: ``values[(name, layer)]`` (layer None for model level)."""
    lm = _text(model)
    values: dict = {}
    handles = []
    router_calls: dict[int, list] = {}

    def keep(key):
        def hook(module, args, output=None):
            values[key] = (output if output is not None else args[0]).detach().clone()
        return hook

    L, P = lm.config.num_hidden_layers, lm.config.hidden_size_per_layer_input
    handles.append(lm.embed_tokens_per_layer.register_forward_hook(
        lambda m, a, o: values.__setitem__(("ple_tokens", None), o.detach().reshape(*o.shape[:-1], L, P).clone())))
    handles.append(lm.register_forward_pre_hook(
        lambda m, a, k: values.__setitem__(("embed", None), k["inputs_embeds"].detach().clone()), with_kwargs=True))
    handles.append(lm.norm.register_forward_pre_hook(keep(("streams_merged", None))))
    for i, layer in enumerate(lm.layers):
        def pre(module, args, i=i):
            values[("input", i)] = args[0].detach().clone()
            values[("ple_input", i)] = args[2].detach().clone()
        handles.append(layer.register_forward_pre_hook(pre))
        handles.append(layer.register_forward_hook(keep(("output", i))))
        router_calls[i] = []
        handles.append(layer.altup.modality_router.register_forward_hook(
            lambda m, a, o, i=i: router_calls[i].append(torch.tanh(o.detach().float()).type_as(o))))
        streams = layer.altup.config.altup_num_inputs
        handles.append(layer.altup.prediction_coefs.register_forward_hook(
            lambda m, a, o, i=i, s=streams: values.__setitem__(
                ("altup_predict_coefs", i), o.detach().reshape(*o.shape[:-1], s, s).permute(0, 1, 3, 2).clone())))
        handles.append(layer.altup.correction_coefs.register_forward_hook(
            lambda m, a, o, i=i: values.__setitem__(("altup_correct_coefs", i), (o.detach() + 1.0).clone())))
        for name, module in (("attn_q", "q_norm"), ("attn_k", "k_norm"), ("attn_v", "v_norm")):
            if hasattr(layer.self_attn, module):   # KV-reuse layers have no k/v modules
                handles.append(getattr(layer.self_attn, module).register_forward_hook(keep((name, i))))
        handles.append(layer.laurel.post_laurel_norm.register_forward_hook(keep(("laurel_branch", i))))
        handles.append(layer.laurel.register_forward_hook(keep(("laurel", i))))
        heads = layer.self_attn.config.num_attention_heads
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i, h=heads: values.__setitem__(
                ("attn_z", i), a[0].detach().reshape(*a[0].shape[:-1], h, -1).clone())))
        handles.append(layer.post_attention_layernorm.register_forward_hook(keep(("attn_out", i))))
        handles.append(layer.pre_feedforward_layernorm.register_forward_pre_hook(keep(("resid_mid", i))))
        handles.append(layer.mlp.act_fn.register_forward_pre_hook(keep(("mlp_gate", i))))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(keep(("mlp_act", i))))
        handles.append(layer.post_feedforward_layernorm.register_forward_hook(keep(("mlp_out", i))))
        handles.append(layer.per_layer_projection.register_forward_pre_hook(keep(("ple_gate", i))))
        handles.append(layer.post_per_layer_input_norm.register_forward_hook(keep(("ple_out", i))))
    eager = lm.config._attn_implementation == "eager"
    try:
        with torch.no_grad():
            out = stock_forward(model, ids, output_attentions=eager)
    finally:
        for h in handles:
            h.remove()
    values[("logits", None)] = out.logits.detach().clone()
    values[("streams_in", None)] = values[("input", 0)]
    values[("ple_inputs", None)] = torch.stack([values[("ple_input", i)] for i in range(L)], dim=2)
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            values[("altup_router_predict", i)], values[("altup_router_correct", i)] = router_calls[i]
            predicted = layer.altup.predict(values[("input", i)])
            values[("altup_predict", i)] = predicted
            activated = values[("resid_mid", i)] + values[("mlp_out", i)]
            values[("altup_correct", i)] = layer.altup.correct(predicted, activated)
            if eager:
                values[("attn_pattern", i)] = out.attentions[i].detach().clone()
    return values


@contextmanager
def edited(model: nn.Module, name: str, layer: int | None, fn: Edit, rows: slice | None = None) -> Iterator[None]:
    """The stock model with ``fn`` applied to one point's value, using plain hooks or instance patches.

    ``rows`` limits the edit to some batch rows (dimension 1 for stream stacks, 0 otherwise).
    """
    lm = _text(model)

    def apply(value: torch.Tensor, stack: bool = False) -> torch.Tensor:
        if rows is None:
            return fn(value)
        result = value.clone()
        if stack:
            result[:, rows] = fn(value[:, rows])
        else:
            result[rows] = fn(value[rows])
        return result

    with ExitStack() as stack:
        def hook(handle):
            stack.callback(handle.remove)

        target = lm.layers[layer] if layer is not None else None
        L, P = lm.config.num_hidden_layers, lm.config.hidden_size_per_layer_input
        outputs = {"laurel_branch": "laurel.post_laurel_norm", "laurel": "laurel", "attn_out": "post_attention_layernorm",
                   "mlp_out": "post_feedforward_layernorm", "ple_out": "post_per_layer_input_norm"}
        outputs.update(attn_q="self_attn.q_norm", attn_k="self_attn.k_norm", attn_v="self_attn.v_norm")
        inputs = {"mlp_gate": "mlp.act_fn", "mlp_act": "mlp.down_proj", "ple_gate": "per_layer_projection"}
        streams = lm.config.altup_num_inputs
        if name == "altup_predict_coefs":
            def predict_coefs(m, a, o):
                matrix = o.reshape(*o.shape[:-1], streams, streams).permute(0, 1, 3, 2)
                return apply(matrix).permute(0, 1, 3, 2).reshape(o.shape)
            hook(target.altup.prediction_coefs.register_forward_hook(predict_coefs))
        elif name == "altup_correct_coefs":
            hook(target.altup.correction_coefs.register_forward_hook(lambda m, a, o: apply(o + 1.0) - 1.0))
        elif name in outputs:
            hook(target.get_submodule(outputs[name]).register_forward_hook(lambda m, a, o: apply(o)))
        elif name in inputs:
            hook(target.get_submodule(inputs[name]).register_forward_pre_hook(lambda m, a: (apply(a[0]), *a[1:])))
        elif name == "attn_z":
            heads = target.self_attn.config.num_attention_heads

            def z_hook(m, a):
                z = a[0].reshape(*a[0].shape[:-1], heads, -1)
                return (apply(z).reshape(a[0].shape), *a[1:])
            hook(target.self_attn.o_proj.register_forward_pre_hook(z_hook))
        elif name == "resid_mid":
            def resid_hook(m, a):
                a[0].copy_(apply(a[0]))
            hook(target.pre_feedforward_layernorm.register_forward_pre_hook(resid_hook))
        elif name == "ple_input":
            hook(target.register_forward_pre_hook(lambda m, a: (*a[:2], apply(a[2]), *a[3:])))
        elif name == "streams_in":
            hook(lm.layers[0].register_forward_pre_hook(lambda m, a: (apply(a[0], stack=True), *a[1:])))
        elif name == "ple_tokens":
            hook(lm.embed_tokens_per_layer.register_forward_hook(
                lambda m, a, o: apply(o.reshape(*o.shape[:-1], L, P)).reshape(o.shape)))
        elif name == "embed":
            def embed_hook(m, a, k):
                k["inputs_embeds"] = apply(k["inputs_embeds"])
                return a, k
            hook(lm.register_forward_pre_hook(embed_hook, with_kwargs=True))
        elif name == "streams_merged":
            hook(lm.norm.register_forward_pre_hook(lambda m, a: (apply(a[0]),)))
        elif name == "logits":
            def logits_hook(m, a, o):
                o.logits = apply(o.logits)
                return o
            hook(model.register_forward_hook(logits_hook))
        elif name == "ple_inputs":
            stock = lm.project_per_layer_inputs
            stack.enter_context(mock.patch.object(lm, "project_per_layer_inputs",
                                                  side_effect=lambda *a, **k: apply(stock(*a, **k))))
        elif name in ("altup_predict", "altup_correct"):
            method = name.split("_")[1]
            stock = getattr(target.altup, method)
            stack.enter_context(mock.patch.object(target.altup, method,
                                                  side_effect=lambda *a, **k: apply(stock(*a, **k), stack=True)))
        elif name in ("altup_router_predict", "altup_router_correct"):
            stock = target.altup.compute_router_modalities
            wanted = 0 if name.endswith("predict") else 1
            calls = {"n": 0}

            def router(x):
                value = stock(x)
                index = calls["n"] % 2
                calls["n"] += 1
                return apply(value) if index == wanted else value
            stack.enter_context(mock.patch.object(target.altup, "compute_router_modalities", side_effect=router))
        else:
            raise KeyError(f"no reference edit for {name}")
        yield


# ---- an independent frozen replay of the decomposition (pushes every component *forward*) ---------------

def _rms(values: torch.Tensor, eps: float) -> torch.Tensor:
    values = values.float()
    return torch.pow(values.pow(2).mean(-1, keepdim=True) + eps, -0.5)


def frozen_forward_capture(model: nn.Module, ids: torch.Tensor) -> dict:
    """What the replay freezes and pushes, captured with plain hooks on the stock modules."""
    lm = _text(model)
    kept: dict = {}
    handles = []

    def keep(key, output=True):
        def hook(module, args, out=None):
            kept[key] = (out if output else args[0]).detach().float().clone()
        return hook

    streams = lm.config.altup_num_inputs
    for i, layer in enumerate(lm.layers):
        handles += [
            layer.register_forward_pre_hook(lambda m, a, i=i: kept.__setitem__(("input", i), a[0].detach().float().clone())),
            layer.register_forward_hook(lambda m, a, o, i=i: kept.__setitem__(("output", i), o.detach().float().clone())),
            layer.altup.prediction_coefs.register_forward_hook(lambda m, a, o, i=i: kept.__setitem__(
                ("C", i), o.detach().float().reshape(*o.shape[:-1], streams, streams).permute(0, 1, 3, 2).clone())),
            layer.altup.correction_coefs.register_forward_hook(lambda m, a, o, i=i: kept.__setitem__(
                ("c", i), (o.detach() + 1.0).float().clone())),
            layer.input_layernorm.register_forward_pre_hook(keep(("active", i), output=False)),
            layer.post_attention_layernorm.register_forward_hook(keep(("attn_out", i))),
            layer.post_attention_layernorm.register_forward_pre_hook(keep(("attn_pre", i), output=False)),
            layer.self_attn.o_proj.register_forward_pre_hook(keep(("z", i), output=False)),
            layer.laurel.post_laurel_norm.register_forward_hook(keep(("laurel_branch", i))),
            layer.post_feedforward_layernorm.register_forward_hook(keep(("mlp_out", i))),
            layer.post_per_layer_input_norm.register_forward_hook(keep(("ple_out", i))),
        ]
    handles.append(lm.norm.register_forward_pre_hook(keep(("merged", None), output=False)))
    try:
        with torch.no_grad():
            out = stock_forward(model, ids)
    finally:
        for h in handles:
            h.remove()
    kept["logits"] = out.logits.detach()
    return kept


def replay_layer(layer: nn.Module, kept: dict, i: int, stack: torch.Tensor, writes: dict) -> torch.Tensor:
    """Layer ``i`` as a linear map with the frozen coefficients, applied to ``stack`` ([S,B,T,D], a part
    of the real input) plus the given ``writes`` (name -> [B,T,D], each a part of the real write)."""
    config = layer.altup.config
    a = config.altup_active_idx
    predicted = stack + torch.einsum("sbtd,btsk->kbtd", stack, kept[("C", i)])
    scale = _rms(kept[("active", i)], layer.input_layernorm.eps) * layer.input_layernorm.weight.float()
    zero = torch.zeros_like(stack[0])
    x = (predicted[a] + scale * predicted[a] + writes.get("attn_out", zero) + writes.get("laurel_branch", zero)) / 2 ** 0.5
    x = x + writes.get("mlp_out", zero)
    out = predicted + kept[("c", i)].permute(2, 0, 1)[..., None] * (x - predicted[a])
    out[1:] = out[1:] + writes.get("ple_out", zero)
    return out


def replay_readout(model: nn.Module, kept: dict, stack: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """The pre-soft-cap target (direction [V]) of a part of the last stack, per readout stream: [S,B,T]."""
    lm = _text(model)
    real = kept[("output", lm.config.num_hidden_layers - 1)]
    target_rms = real[0].pow(2).mean(-1, keepdim=True).sqrt()
    parts = [stack[0]]
    for k in range(1, stack.shape[0]):
        projection = lm.altup_unembed_projections[k - 1]
        real_projected = projection(real[k])
        factor = target_rms / real_projected.pow(2).mean(-1, keepdim=True).clamp(min=1e-5).sqrt()
        parts.append(factor * (stack[k] @ projection.weight.float().T))
    scale = _rms(kept[("merged", None)], lm.norm.eps) * lm.norm.weight.float()
    unembed = direction.float() @ model.lm_head.weight.float()                # [D]
    return torch.stack([(part / stack.shape[0] * scale * unembed).sum(-1) for part in parts])


def replay_components(model: nn.Module, ids: torch.Tensor, direction: torch.Tensor) -> dict:
    """Every component's contribution per readout stream ([S,B,T]), by pushing its write forward through
    every later frozen layer; also the replayed stacks and per-head contributions of each attn_out."""
    lm = _text(model)
    kept = frozen_forward_capture(model, ids)
    layers = lm.config.num_hidden_layers
    zero_stack = torch.zeros_like(kept[("input", 0)])

    def push(stack, start, writes):
        with torch.no_grad():
            for j in range(start, layers):
                stack = replay_layer(lm.layers[j], kept, j, stack, writes if j == start else {})
            return replay_readout(model, kept, stack, direction)

    result = {"embed": push(kept[("input", 0)], 0, {})}
    heads = {}
    for i, layer in enumerate(lm.layers):
        for name in ("attn_out", "laurel_branch", "mlp_out", "ple_out"):
            result[f"layers.{i}.{name}"] = push(zero_stack, i, {name: kept[(name, i)]})
        norm, o_proj = layer.post_attention_layernorm, layer.self_attn.o_proj
        scale = _rms(kept[("attn_pre", i)], norm.eps) * norm.weight.float()
        z = kept[("z", i)].unflatten(-1, (layer.self_attn.config.num_attention_heads, -1))
        weight = o_proj.weight.float().unflatten(-1, z.shape[-2:])           # [D, H, Dh]
        heads[i] = torch.stack([push(zero_stack, i, {"attn_out": scale * (z[..., h, :] @ weight[:, h].T)}).sum(0)
                                for h in range(z.shape[-2])])
    stacks, stack = [], kept[("input", 0)]
    with torch.no_grad():
        for j in range(layers):
            writes = {name: kept[(name, j)] for name in ("attn_out", "laurel_branch", "mlp_out", "ple_out")}
            stack = replay_layer(lm.layers[j], kept, j, stack, writes)
            stacks.append(stack)
    return {"components": result, "heads": heads, "stacks": stacks, "kept": kept}


# ---- an independent frozen replay of the replacement model (attribution graphs) ---------------------------
#
# The graph's edge s -> t is the change in t's input when source s is removed from the replacement model with
# every nonlinearity frozen. Here that model is the stock forward run again with plain hooks that return
# recorded values (q/k norms, so attention patterns; AltUp coefficients; the MLP outputs and PLE contributions,
# which are the sources) and apply each norm with its recorded scale; a source is removed by subtracting its
# value where it enters. Written from the stock modules, not from g3n_probe.

_FROZEN_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "laurel.post_laurel_norm", "self_attn.v_norm")
_RECORDED = ("self_attn.q_norm", "self_attn.k_norm", "altup.prediction_coefs", "altup.correction_coefs")


def _norm_scale(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    scale = _rms(x, module.eps)
    return scale * module.weight.float() if module.with_scale else scale


def graph_record(model: nn.Module, ids: torch.Tensor) -> dict:
    """A clean stock forward's frozen quantities and sources, by plain hooks."""
    lm = _text(model)
    rec: dict = {}
    handles = []

    def put(key, what):
        def hook(module, args, out):
            value = {"in": args[0], "out": out}[what]
            rec[key] = value.detach().clone() if what == "out" else _norm_scale(module, value.detach())
        return hook

    for i, layer in enumerate(lm.layers):
        for name in _FROZEN_NORMS + _RECORDED:
            if name.startswith("self_attn.") and not hasattr(layer.self_attn, name.split(".")[1]):
                continue
            what = "in" if name in _FROZEN_NORMS else "out"
            handles.append(layer.get_submodule(name).register_forward_hook(put((name, i), what)))
        handles += [layer.post_feedforward_layernorm.register_forward_hook(put(("mlp_out", i), "out")),
                    layer.mlp.register_forward_hook(put(("mlp", i), "out")),
                    layer.pre_feedforward_layernorm.register_forward_hook(put(("x", i), "out")),
                    layer.post_per_layer_input_norm.register_forward_hook(put(("ple", i), "out"))]
    handles.append(lm.layers[0].register_forward_pre_hook(lambda m, a: rec.__setitem__("stack", a[0].detach().clone())))
    handles.append(lm.layers[-1].register_forward_hook(lambda m, a, o: rec.__setitem__("last", o.detach().clone())))
    handles.append(lm.norm.register_forward_pre_hook(lambda m, a: rec.__setitem__("merged", a[0].detach().clone())))
    try:
        with torch.no_grad():
            rec["logits"] = stock_forward(model, ids).logits.detach()
    finally:
        for h in handles:
            h.remove()
    return rec


def graph_replay(model: nn.Module, ids: torch.Tensor, rec: dict, site: str = "mlp_out",
                 mlp_delta: dict | None = None, ple_delta: dict | None = None, stack_delta: torch.Tensor | None = None,
                 skips: dict | None = None) -> dict:
    """The frozen replacement model run again: recorded values, recorded norm scales, the sources changed by
    the deltas (``mlp_delta[layer]``/``ple_delta[layer]`` [T, D], ``stack_delta`` [S, T, D]). Returns each layer's
    MLP input ``x`` and the last stack. ``skips[layer]`` = W_skip keeps a skip transcoder's path live."""
    lm = _text(model)
    mlp_delta, ple_delta, skips = mlp_delta or {}, ple_delta or {}, skips or {}
    got: dict = {}
    handles = []

    def scaled(key):
        return lambda m, a, o: (a[0].float() * rec[key]).to(o.dtype)

    def fixed(key, delta=None, skip=None, layer=None):
        def hook(m, a, o):
            value = rec[key].clone()
            if delta is not None:
                value[0] += delta.to(value.dtype)
            if skip is not None:
                value = value + (got[("x", layer)] - rec[("x", layer)]).float() @ skip.T.float()
            return value.to(o.dtype)
        return hook

    for i, layer in enumerate(lm.layers):
        for name in _FROZEN_NORMS + _RECORDED:
            if (name, i) not in rec:
                continue
            hook = scaled((name, i)) if name in _FROZEN_NORMS else fixed((name, i))
            handles.append(layer.get_submodule(name).register_forward_hook(hook))
        source = layer.post_feedforward_layernorm if site == "mlp_out" else layer.mlp
        key = ("mlp_out", i) if site == "mlp_out" else ("mlp", i)
        handles += [source.register_forward_hook(fixed(key, mlp_delta.get(i), skips.get(i), i)),
                    layer.pre_feedforward_layernorm.register_forward_hook(
                        lambda m, a, o, i=i: got.__setitem__(("x", i), o.detach().clone())),
                    layer.post_per_layer_input_norm.register_forward_hook(fixed(("ple", i), ple_delta.get(i)))]

    def stack_in(module, args):
        stack = rec["stack"].clone()
        if stack_delta is not None:
            stack[:, 0] += stack_delta.to(stack.dtype)
        return (stack, *args[1:])

    handles.append(lm.layers[0].register_forward_pre_hook(stack_in))
    handles.append(lm.layers[-1].register_forward_hook(lambda m, a, o: got.__setitem__("last", o.detach().clone())))
    try:
        with torch.no_grad():
            stock_forward(model, ids)
    finally:
        for h in reversed(handles):
            h.remove()
    return got


@torch.no_grad()
def graph_logit_input(model: nn.Module, rec: dict, last: torch.Tensor, token: int) -> float:
    """A logit node's input on a (replayed) last stack: its demeaned pre-soft-cap logit at the last position,
    with the readout's stream rescale and the final norm's scale frozen at their recorded values."""
    lm = _text(model)
    real = rec["last"][:, 0, -1].float()
    stack = last[:, 0, -1].float()
    target_rms = real[0].pow(2).mean().sqrt()
    merged = stack[0].clone()
    for k in range(1, stack.shape[0]):
        projection = lm.altup_unembed_projections[k - 1]
        factor = target_rms / projection(real[k]).pow(2).mean().clamp(min=1e-5).sqrt()
        merged = merged + factor * (stack[k] @ projection.weight.float().T)
    merged = merged / stack.shape[0]
    weight = model.lm_head.weight.float()
    direction = weight[token] - weight.mean(0)
    return float((merged * _norm_scale(lm.norm, rec["merged"][0, -1]) * direction).sum())
