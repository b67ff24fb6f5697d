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
        inputs = {"mlp_gate": "mlp.act_fn", "mlp_act": "mlp.down_proj", "ple_gate": "per_layer_projection"}
        if name in outputs:
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
