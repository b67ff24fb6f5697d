"""Checking a circuit: set features to new activations and measure what changes, frozen or not.

    check = g3n.circuits.intervene(model, prompt, transcoders, {(3, 7, 101): 0.0})     # layer, position, feature
    check.logit_change            # [n] the demeaned pre-soft-cap logits' change at the last position
    graph.predict({(3, 7, 101): 0.0})     # the graph's direct-effect prediction, node by node

``frozen=True`` runs the frozen replacement model *forward*: the stock model again with every frozen quantity
pinned at its value in the clean forward (each norm applied with its recorded scale; q/k norms, so attention
patterns; AltUp coefficients; PLE contributions; the initial stack) and every MLP's output pinned at its clean
value plus the decoder change of the edited features (a skip transcoder's path stays live). Downstream features
do not respond there, so each target's input changes by exactly the sum of the edited sources' edges: the
graph's prediction, up to float rounding. ``frozen=False`` runs the replacement model as it is (`replaced`, error
terms on): features, norms and attention all respond, and the change is measured, not predicted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nRMSNorm

from ..checkpoint.module_tree import text_model
from ..probe.lens import norm_scale
from ..sae.replaced import replaced
from ..sae.transcoders import TranscoderSet, as_transcoder_set
from .attribute import prompt_ids
from .freeze import demeaned_logits, logit_covectors

_PINNED = ("self_attn.q_norm", "self_attn.k_norm", "altup.prediction_coefs", "altup.correction_coefs")
_UNSCALED = ("post_per_layer_input_norm", "altup.router_norm", "self_attn.q_norm", "self_attn.k_norm")


@dataclass
class Intervention:
    """What an intervention changed: each transcoder feature's pre-activation ``W_enc·x + b_enc``
    (``feature_before/after [L, T, F]`` by layer, for the layers with a transcoder) and the chosen tokens'
    demeaned pre-soft-cap logits at the last position (``logit_before/after [n]``)."""

    tokens: list[int]
    logit_before: torch.Tensor
    logit_after: torch.Tensor
    feature_before: dict[int, torch.Tensor]
    feature_after: dict[int, torch.Tensor]
    frozen: bool

    @property
    def logit_change(self) -> torch.Tensor:
        return self.logit_after - self.logit_before

    def feature_change(self, layer: int) -> torch.Tensor:
        """``[T, F]``: the change of layer ``layer``'s feature pre-activations."""
        return self.feature_after[layer] - self.feature_before[layer]


def _checked_edits(edits: Any, tset: TranscoderSet, tokens: int) -> dict[tuple[int, int, int], float]:
    if not isinstance(edits, dict) or not edits:
        raise TypeError("edits is a non-empty dict {(layer, position, feature): new activation}")
    out = {}
    for key, value in edits.items():
        if not (isinstance(key, tuple) and len(key) == 3 and all(isinstance(k, int) for k in key)):
            raise TypeError(f"edit key {key!r}: give (layer, position, feature)")
        layer, position, feature = key
        if layer not in tset.transcoders:
            raise ValueError(f"edit {key}: layer {layer} has no transcoder (layers {sorted(tset.transcoders)})")
        if not -tokens <= position < tokens or not 0 <= feature < tset[layer].width:
            raise ValueError(f"edit {key}: position must be in [-{tokens}, {tokens}), feature in 0..{tset[layer].width - 1}")
        out[(layer, position % tokens, feature)] = float(value)
    return out


# ---- the frozen replacement model, forward ---------------------------------------------------------------


def _record(store: dict, key: Any, kind: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    if kind == "scale":
        store[key] = norm_scale(module, args[0].detach())
    else:
        store[key] = (output if kind == "output" else args[0]).detach().clone()


def _pin(store: dict, key: Any, kind: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    if kind == "scale":
        return (args[0].float() * store[key]).to(output.dtype)
    return store[key]


def _site_pin(store: dict, layer: int, delta: torch.Tensor | None, skip: Any, module: nn.Module, args: tuple,
              output: torch.Tensor) -> torch.Tensor:
    value = store[("site", layer)].clone()
    if delta is not None:
        value[0] += delta.to(value)
    if skip is not None:
        value = value + skip((store[("now", layer)] - store[("x", layer)]).float()).to(value.dtype)
    return value


def _hooks(hf: Any, store: dict, hook: Any, site: str) -> list:
    """Register ``hook(store, key, kind)`` on every frozen quantity; returns the handles."""
    handles = []
    for i, layer in enumerate(text_model(hf).layers):
        for name, module in layer.named_modules():
            if name in _PINNED:
                handles.append(module.register_forward_hook(functools.partial(hook, store, (name, i), "output")))
            elif isinstance(module, Gemma3nRMSNorm) and name not in _UNSCALED:
                handles.append(module.register_forward_hook(functools.partial(hook, store, (name, i), "scale")))
        handles.append(layer.post_per_layer_input_norm.register_forward_hook(
            functools.partial(hook, store, ("ple", i), "output")))
        key = ("x", i) if hook is _record else ("now", i)
        handles.append(layer.pre_feedforward_layernorm.register_forward_hook(
            functools.partial(_record, store, key, "output")))
    return handles


def _frozen_run(hf: Any, ids: torch.Tensor, tset: TranscoderSet, deltas: dict[int, torch.Tensor]) -> dict:
    """A clean forward recording every frozen quantity, then the pinned forward with the MLP sites moved by
    ``deltas``; ``store`` holds both passes' MLP inputs (``("x", i)``, ``("now", i)``) and last stacks."""
    store: dict = {}
    for pinned in (False, True):
        _run(hf, ids, store, functools.partial(_frozen_hooks, hf, store, tset, deltas, pinned), pinned)
    return store


def _frozen_hooks(hf: Any, store: dict, tset: TranscoderSet, deltas: dict, pinned: bool) -> list:
    handles = _hooks(hf, store, _pin if pinned else _record, tset.output_point)
    for i, layer in enumerate(text_model(hf).layers):
        site = layer.mlp if tset.output_point == "mlp" else layer.post_feedforward_layernorm
        skip = tset[i].skip if i in tset.transcoders and tset[i].W_skip is not None else None
        on_site = functools.partial(_site_pin, store, i, deltas.get(i), skip) if pinned else \
            functools.partial(_record, store, ("site", i), "output")
        handles.append(site.register_forward_hook(on_site))
    return handles


def _run(hf: Any, ids: torch.Tensor, store: dict, register: Any, after: bool) -> None:
    """One forward with ``register()``'s hooks, reading the last stack and the merged hidden into ``store``
    (keys ``(…, after)``); every hook comes off afterwards, in reverse, however the forward ends."""
    language_model = text_model(hf)
    handles: list = []
    try:
        handles += register()
        handles.append(language_model.layers[-1].register_forward_hook(
            functools.partial(_record, store, ("last", after), "output")))
        handles.append(language_model.norm.register_forward_hook(
            functools.partial(_record, store, ("merged", after), "input")))
        with torch.no_grad():
            hf(input_ids=ids.to(hf.device), use_cache=False, logits_to_keep=1)
    finally:
        while handles:
            handles.pop().remove()


# ---- the replacement model as it runs --------------------------------------------------------------------


def _set_features(edits: dict, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    output = output.clone()
    for (position, feature), value in edits.items():
        output[0, position, feature] = value
    return output


def _free_hooks(hf: Any, store: dict, tset: TranscoderSet, replacement: Any, edits: dict) -> list:
    handles = []
    for layer in tset:
        chosen = {(p, f): v for (at, p, f), v in edits.items() if at == layer}
        if chosen:
            features = replacement.splice(layer).features
            handles.append(features.register_forward_hook(functools.partial(_set_features, chosen)))
        handles.append(text_model(hf).layers[layer].pre_feedforward_layernorm.register_forward_hook(
            functools.partial(_record, store, ("now", layer), "output")))
    return handles


def _free_run(model: Any, ids: torch.Tensor, tset: TranscoderSet, edits: dict) -> dict:
    """The replacement model (error terms on) with the edited features written: everything downstream responds."""
    store: dict = {}
    with replaced(model, tset, error=True) as replacement:
        hf = model.hf_model
        _run(hf, ids, store, functools.partial(_free_hooks, hf, store, tset, replacement, edits), True)
    return store


def _pre_activations(tset: TranscoderSet, store: dict, key: str) -> dict[int, torch.Tensor]:
    return {layer: tset[layer].pre_activation(store[(key, layer)][0].float().to(tset[layer].W_enc.device)).float()
            for layer in tset}


def intervene(model: Any, inputs: Any, transcoders: Any, edits: dict, *, frozen: bool = True,
              tokens: list[int] | None = None) -> Intervention:
    """Set features to new activations (``edits``: ``{(layer, position, feature): value}``) and return what
    changed (see the module doc): every transcoder feature's pre-activation and the demeaned pre-soft-cap logits
    of ``tokens`` (default: the 10 most likely) at the last position. ``frozen`` picks the frozen replacement
    model (the graph's exact prediction) or the replacement model as it runs."""
    ids = prompt_ids(model, inputs)
    tset = as_transcoder_set(transcoders, model)
    chosen = _checked_edits(edits, tset, ids.shape[1])
    hf = model.hf_model
    clean = _frozen_run(hf, ids, tset, {})
    before = _pre_activations(tset, clean, "x")
    if frozen:
        deltas: dict[int, torch.Tensor] = {}
        for (layer, position, feature), value in chosen.items():
            old = float(tset[layer].activate(before[layer][position])[feature])
            delta = deltas.setdefault(layer, torch.zeros(ids.shape[1], model.text_config.hidden_size))
            delta[position] += (value - old) * tset[layer].W_dec[feature].float().cpu()
        after_store = _frozen_run(hf, ids, tset, deltas)
    else:
        after_store = _free_run(model, ids, tset, chosen)
    merged = clean[("merged", False)][0, -1]
    if tokens is None:
        tokens = demeaned_logits(hf, merged).topk(min(10, model.text_config.vocab_size)).indices.tolist()
    index = torch.tensor(tokens, device=merged.device)
    if frozen:   # the readout frozen too: the clean covectors on the last stack, before and after
        covectors = logit_covectors(hf, clean[("last", False)][:, 0, -1], merged, tokens)
        before_logits, after_logits = ((covectors * store[("last", key)][:, 0, -1].float()[None]).sum((-1, -2))
                                       for store, key in ((clean, False), (after_store, True)))
    else:
        before_logits = demeaned_logits(hf, merged)[index]
        after_logits = demeaned_logits(hf, after_store[("merged", True)][0, -1])[index]
    return Intervention(tokens, before_logits.cpu(), after_logits.cpu(), before,
                        _pre_activations(tset, after_store, "now"), frozen)
