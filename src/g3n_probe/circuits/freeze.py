"""The replacement model, frozen: one forward of the stock model whose backward is the graph's linear map.

An attribution graph's edge is a direct effect in the *replacement model*: MLPs replaced by transcoders (their
features, an error term and, for a skip transcoder, the affine skip path), and everything else that is
nonlinear frozen at its value in the real forward. `frozen_forward` runs the stock model once with torch
hooks that make each of those freezes a detach, and leaves standing in for the graph's sources:

    RMS norms on the path (input, post-attention, pre/post-feedforward, LAuReL's, ``v_norm``)
        output.detach() + (x − x.detach()) · scale        value: the stock output, bit for bit;
                                                          derivative: the norm with its scale frozen
    q_norm, k_norm outputs                 detached      → attention patterns frozen (values still flow,
                                                          KV-shared layers through the store layer's)
    altup.prediction_coefs / correction_coefs outputs  detached  → AltUp's router coefficients frozen
    the MLP's output at the transcoder's site          a leaf    (source: features + error; a skip
                                                          transcoder adds W_skip · x, x live)
    post_per_layer_input_norm's output (ple_out)       a leaf    (source: the PLE node, its gate frozen)
    the stack entering layer 0                         a leaf    (source: the embedding nodes; the
                                                          rescale of streams 1..S-1 is frozen there)

The MLP itself runs without autograd (its output is a source). Backward passes from a feature's encoder
direction at the MLP's input, or from a logit's covector on the last stack, read the gradient at each leaf.
The readout (unembed projections, rescale, mean, final norm) is linear once frozen and is applied as a covector
(`logit_covectors`), so no backward runs through its inline code.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nRMSNorm

from ..checkpoint.module_tree import text_model
from ..probe.lens import norm_scale, stream_covectors


@dataclass
class Frozen:
    """What one frozen forward leaves: per layer the MLP's input (graph-connected), the MLP-site leaf and its
    value, the PLE leaf; the initial stack's leaf, the last stack and the merged hidden (before the final norm)."""

    mlp_input: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp_leaf: dict[int, torch.Tensor] = field(default_factory=dict)
    ple_leaf: dict[int, torch.Tensor] = field(default_factory=dict)
    stack_leaf: torch.Tensor | None = None
    last_stack: torch.Tensor | None = None
    merged: torch.Tensor | None = None
    skips: dict[int, Any] = field(default_factory=dict)

    def sources(self, layers: list[int]) -> list[torch.Tensor]:
        """The leaves in a fixed order: the initial stack, then each layer's MLP leaf and PLE leaf."""
        assert self.stack_leaf is not None, "the frozen forward has not run"
        return [self.stack_leaf] + [self.mlp_leaf[i] for i in layers] + [self.ple_leaf[i] for i in layers]


def _freeze_norm(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    if not x.requires_grad:
        return output
    scale = norm_scale(module, x.detach())
    return output.detach() + ((x - x.detach()).float() * scale).to(output.dtype)


def _detach(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.detach()


def _leaf(frozen: Frozen, store: str, layer: int, module: nn.Module, args: tuple, output: torch.Tensor
          ) -> torch.Tensor:
    leaf = output.detach().requires_grad_(True)
    getattr(frozen, store)[layer] = leaf
    return leaf


def _mlp_site(frozen: Frozen, layer: int, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """The MLP's output at the transcoder's site as a leaf; a skip transcoder's path ``W_skip · x`` stays live."""
    torch.set_grad_enabled(True)
    skip = frozen.skips.get(layer)
    if skip is None:
        return _leaf(frozen, "mlp_leaf", layer, module, args, output)
    path = skip(frozen.mlp_input[layer].float()).to(output.dtype)
    leaf = (output.detach() - path.detach()).requires_grad_(True)
    frozen.mlp_leaf[layer] = leaf
    return leaf + path


def _mlp_input(frozen: Frozen, layer: int, module: nn.Module, args: tuple) -> None:
    frozen.mlp_input[layer] = args[0]
    torch.set_grad_enabled(False)   # the MLP's output is a source: no graph through it


def _mlp_done(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    torch.set_grad_enabled(True)


def _stack_in(frozen: Frozen, module: nn.Module, args: tuple) -> tuple:
    frozen.stack_leaf = args[0].detach().requires_grad_(True)
    return (frozen.stack_leaf, *args[1:])


def _stack_out(frozen: Frozen, module: nn.Module, args: tuple, output: Any) -> None:
    frozen.last_stack = output[0] if isinstance(output, tuple) else output


def _merged(frozen: Frozen, module: nn.Module, args: tuple) -> None:
    frozen.merged = args[0].detach()


def _layer_hooks(frozen: Frozen, layer: Any, index: int, site: str) -> list:
    handles = []
    for name, module in layer.named_modules():
        if name in ("self_attn.q_norm", "self_attn.k_norm"):
            handles.append(module.register_forward_hook(_detach))
        elif name in ("altup.prediction_coefs", "altup.correction_coefs"):
            handles.append(module.register_forward_hook(_detach))
        elif isinstance(module, Gemma3nRMSNorm) and name not in ("post_per_layer_input_norm", "altup.router_norm"):
            handles.append(module.register_forward_hook(_freeze_norm))
    handles.append(layer.mlp.register_forward_pre_hook(functools.partial(_mlp_input, frozen, index)))
    handles.append(layer.mlp.register_forward_hook(_mlp_done, always_call=True))
    site_module = layer.mlp if site == "mlp" else layer.post_feedforward_layernorm
    handles.append(site_module.register_forward_hook(functools.partial(_mlp_site, frozen, index)))
    handles.append(layer.post_per_layer_input_norm.register_forward_hook(
        functools.partial(_leaf, frozen, "ple_leaf", index)))
    return handles


@contextmanager
def frozen_forward(hf: Any, site: str, skips: dict[int, Any]) -> Iterator[Frozen]:
    """Hooks on ``hf`` (a stock Gemma 3n model) that make its next forward the frozen replacement model (see the
    module doc); ``site`` is ``"mlp_out"`` or ``"mlp"``, ``skips`` layer → a skip transcoder's ``skip``.
    Every hook comes off, in reverse, when the block ends; grad mode and the parameters' ``requires_grad`` are
    restored."""
    language_model = text_model(hf)
    frozen = Frozen(skips=dict(skips))
    handles = []
    grad_mode = torch.is_grad_enabled()
    # no parameter needs a gradient here: without this autograd would keep every linear layer's input, for
    # weight gradients nobody asks for (the memory of a batch of copies); put back as they were afterwards
    flags = [(parameter, parameter.requires_grad) for parameter in hf.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        for index, layer in enumerate(language_model.layers):
            handles.extend(_layer_hooks(frozen, layer, index, site))
        handles.append(language_model.layers[0].register_forward_pre_hook(functools.partial(_stack_in, frozen)))
        handles.append(language_model.layers[-1].register_forward_hook(functools.partial(_stack_out, frozen)))
        handles.append(language_model.norm.register_forward_pre_hook(functools.partial(_merged, frozen)))
        yield frozen
    finally:
        torch.set_grad_enabled(grad_mode)
        while handles:
            handles.pop().remove()
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@torch.no_grad()
def logit_covectors(hf: Any, last_stack: torch.Tensor, merged: torch.Tensor, tokens: list[int]
                    ) -> torch.Tensor:
    """``[n, S, D]`` float32: for each token id, the covector on the last stack (one position) of its
    demeaned pre-soft-cap logit ``(W_U[v] − mean_v W_U) · norm(merged)``, with the readout's rescale of streams
    1..S-1 and the final norm's scale frozen. ``last_stack`` ``[S, D]`` and ``merged`` ``[D]`` at that position."""
    language_model = text_model(hf)
    weight = hf.lm_head.weight
    mean_row = torch.zeros(weight.shape[1], device=weight.device)
    for chunk in weight.split(16384):
        mean_row += chunk.float().sum(0)
    mean_row /= weight.shape[0]
    rows = weight[torch.tensor(tokens, device=weight.device)].float() - mean_row        # [n, D]
    per_stream = stream_covectors(language_model, last_stack[:, None], merged[None], rows)
    return torch.stack([c.expand_as(rows) for c in per_stream], 1)                       # [n, S, D]


@torch.no_grad()
def demeaned_logits(hf: Any, merged: torch.Tensor) -> torch.Tensor:
    """``[V]`` float32: the real pre-soft-cap logits at one position (the stock final norm and lm_head on the
    merged hidden ``[D]``) minus their mean over the vocabulary."""
    logits = hf.lm_head(text_model(hf).norm(merged[None])).float()[0]
    return logits - logits.mean()
