"""Which component wrote this logit: an exact decomposition through AltUp.

A residual model's logits are a sum over components once the final norm's scale is frozen. Gemma 3n
is not one residual stream: each decoder layer predicts four AltUp streams from all four, runs
attention, LAuReL and the MLP on the active one, and corrects all four from the result; the readout
projects, rescales and averages the streams. Freeze, at their values in the real forward, every
layer's AltUp predict and correct coefficients (the points ``altup_predict_coefs`` and
``altup_correct_coefs``), the RMS scale of ``input_layernorm`` (its output is part of LAuReL's output,
so of the residual path), the readout's magnitude rescale of streams 1..S-1 and the final norm's RMS
scale. Then each layer maps its input stack X and four writes linearly to its output:

    P_k   = X_k + Σ_j C[j,k] · X_j                                   (predict)
    x     = (P_a + s ⊙ P_a + attn_out + laurel_branch) / √2 + mlp_out   (a: the active stream)
    out_k = P_k + c_k · (x − P_a)  (+ ple_out for k ≥ 1)             (correct, then PLE)

and the pre-soft-cap logits are linear in the last stack. So they are exactly the sum of one term per
component: ``embed`` (the initial stack) and each layer's ``attn_out``, ``laurel_branch``, ``mlp_out``
and ``ple_out``. Every map is per token, so a position's logit is the sum of the components at that
position.

`decompose` computes it backwards: the target (a token, a pair, a direction in logit space) becomes a
covector on the last stack, one per readout stream, and is carried back through the frozen maps layer
by layer; a component's contribution is one inner product with its write. Cost: one trace saving the
writes at the chosen positions, then O(L·S²·D) per position — no stack is pushed forward per component.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch.utils.hooks import RemovableHandle

from .._compat import forward_hooks, global_forward_hooks
from ..activations.batch import ActivationCache, encode_inputs
from ..checkpoint import module_tree
from ..points import split_qualified
from ..probe.lens import norm_scale, stream_covectors
from .decompose_view import DecompositionTable, plot_decomposition

if TYPE_CHECKING:
    from ..probe import Gemma3nProbe

COMPONENTS = ("attn_out", "laurel_branch", "mlp_out", "ple_out")


@dataclass
class Decomposition:
    """Each component's exact contribution to a target (see the module doc).

    Attributes:
        names: ``"embed"``, then ``"layers.{i}.{attn_out|laurel_branch|mlp_out|ple_out}"`` in layer order.
        values: ``[N, B, P]`` float32, each component's contribution at each row and position.
        total: ``[B, P]``, the target applied to the real pre-soft-cap logits (or, with ``at=``, to the
            real stack); ``values.sum(0)`` equals it to float rounding.
        by_stream: ``[N, S, B, P]``, each contribution split by the AltUp stream through which it reaches
            the readout (or the ``at=`` stack); sums over S to ``values``.
        positions: the token positions (non-negative) of the P axis.
        tokens: the input tokens at those positions (row 0), when a tokenizer is at hand.
    """

    names: list[str]
    values: torch.Tensor
    total: torch.Tensor
    by_stream: torch.Tensor
    positions: list[int]
    tokens: list[str] | None = None
    _heads: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _neurons: Any = field(default=None, repr=False)

    def heads(self, layer: int) -> torch.Tensor:
        """``[H, B, P]``: layer ``layer``'s ``attn_out`` contribution split per head (the post-attention
        norm's scale frozen as well); sums over H to that layer's ``attn_out`` row."""
        if layer not in self._heads:
            raise KeyError(f"layer {layer} has no attn_out in this decomposition (layers {sorted(self._heads)})")
        return self._heads[layer]

    def neurons(self, layer: int, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` MLP neurons of ``layer`` with the largest contributions (by magnitude) at each row and
        position, the post-feedforward norm's scale frozen: ``(indices [k, B, P], values [k, B, P])``.
        All F neurons together sum to that layer's ``mlp_out`` row. Runs one more trace of the inputs."""
        if self._neurons is None:
            raise ValueError("this decomposition cannot split neurons (it was built without its model)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k is how many neurons to return, a positive integer; got {k!r}")
        return self._neurons(layer, k)

    def component(self, name: str) -> torch.Tensor:
        """``[B, P]``: one component's contribution."""
        return self.values[self.names.index(name)]

    def table(self, k: int = 8, row: int = 0) -> DecompositionTable:
        """The top ``k`` components per position (rich in a terminal, HTML in a notebook)."""
        return DecompositionTable(self.names, self.values[:, row], self.total[row], self.positions, self.tokens, k)

    def plot(self, position: int = -1, row: int = 0, ax: Any = None) -> Any:
        """Bars of every component's contribution at one position, stacked by AltUp stream."""
        return plot_decomposition(self, position, row, ax)

    def __rich__(self) -> Any:
        return self.table().__rich__()

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


# ---- arguments ---------------------------------------------------------------------------------------

def _positions(positions: Sequence[int] | int | None, tokens: int) -> list[int]:
    if positions is None:
        return list(range(tokens))
    wanted = [positions] if isinstance(positions, int) else list(positions)
    if not wanted or not all(isinstance(p, int) and not isinstance(p, bool) for p in wanted):
        raise TypeError(f"positions must be integers (negative counts from the end); got {positions!r}")
    bad = [p for p in wanted if not -tokens <= p < tokens]
    if bad:
        raise ValueError(f"positions {bad} fall outside the sequence of {tokens} tokens")
    resolved = [p % tokens for p in wanted]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"positions {wanted} name the same token twice")
    return resolved


def _token_id(model: Any, token: Any, vocab: int) -> int:
    if isinstance(token, str):
        if model.tokenizer is None:
            raise ValueError(f"target {token!r} is a string: naming tokens needs a tokenizer (or pass token ids)")
        ids = model.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"target {token!r} is {len(ids)} tokens ({ids}); a target names one token")
        token = ids[0]
    if isinstance(token, bool) or not isinstance(token, int):
        raise TypeError(f"a target token is an id or a string, not {type(token).__name__}")
    if not 0 <= token < vocab:
        raise ValueError(f"target token id {token} is out of range (0..{vocab - 1})")
    return token


def logit_direction(model: Any, target: Any, batch: int) -> torch.Tensor:
    """``target`` as a direction in logit space, ``[B, V]`` float32: a token (id or string) is its unit
    vector, a pair ``(a, b)`` the difference ``e_a − e_b``, a float tensor ``[V]`` or ``[B, V]`` itself."""
    vocab = model.text_config.vocab_size
    if isinstance(target, torch.Tensor):
        if not target.is_floating_point() or target.shape[-1] != vocab or target.dim() not in (1, 2) or \
                (target.dim() == 2 and target.shape[0] != batch):
            raise ValueError(f"a target tensor is a float direction [V={vocab}] or [B={batch}, V]; "
                             f"got {target.dtype} {tuple(target.shape)}")
        if not bool(torch.isfinite(target).all()):
            raise ValueError("a target direction must be finite: it has inf or NaN entries (the components would be "
                             "NaN beside an infinite total)")
        return target.detach().float().expand(batch, vocab).clone()
    direction = torch.zeros(batch, vocab)
    if isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise ValueError(f"a target pair is (a, b), for logit(a) − logit(b); got {len(target)} entries")
        direction[:, _token_id(model, target[0], vocab)] += 1.0
        direction[:, _token_id(model, target[1], vocab)] -= 1.0
        return direction
    direction[:, _token_id(model, target, vocab)] = 1.0
    return direction


def _where(at: str | None, layers: int) -> tuple[int, str] | None:
    """``"layers.{i}.input"`` / ``"layers.{i}.output"`` -> (i, side)."""
    if at is None:
        return None
    layer, side = split_qualified(at) if isinstance(at, str) else (None, "")
    if layer is None or side not in ("input", "output"):
        raise ValueError(f"at={at!r}: decompose a layer's stack with 'layers.<i>.input' or 'layers.<i>.output'")
    if not -layers <= layer < layers:
        raise ValueError(f"at={at!r}: this model has layers 0..{layers - 1}")
    return layer % layers, side


ActivationCache.decomposer = staticmethod(lambda *args, **kwargs: decompose(*args, **kwargs))   # decompose_resid


# ---- what the model runs --------------------------------------------------------------------------------

# The text model's inputs: every value decompose reads is computed after these, so a hook on them (the host
# table's device moves, a user's edit of the embedding) is part of what the decomposition sees.
_UPSTREAM = ("embed_tokens", "embed_tokens_per_layer", "per_layer_model_projection", "per_layer_projection_norm")


def _hook_name(fn: Any) -> str:
    if isinstance(fn, functools.partial):
        held = fn.args[0] if fn.args else None
        where = getattr(held, "where", None)
        if where is not None:
            return f"an SAE splice at {where} without its error term (error=False)"
        fn = fn.func
    return getattr(fn, "__qualname__", None) or repr(fn)


def _keeps_value(fn: Any) -> bool:
    """A splice with its error term: unless a trace writes its features, the value passes bit for bit."""
    held = fn.args[0] if isinstance(fn, functools.partial) and fn.args else None
    return bool(getattr(held, "keeps_value", False))


def changing_hooks(model: Any) -> list[str]:
    """Torch hooks that could make the model run on other values than the points hand out (a point's value is
    produced before the torch hooks on the modules that carry it): every hook on the root, the text model,
    its layers, final norm and AltUp projections, the lm_head and the points that `inject` did not put there,
    except a splice with its error term. Named as ``"<module path>: <hook> (forward hook)"``."""
    injection = model.injection
    ours = {record.id for record in injection.attached if isinstance(record, RemovableHandle)}
    text = injection.text_model
    upstream = {id(m) for name in _UPSTREAM if hasattr(text, name) for m in getattr(text, name).modules()}
    relevant = {id(m) for m in text.modules()} - upstream
    relevant |= {id(model.hf_model)} | ({id(model.hf_model.lm_head)} if hasattr(model.hf_model, "lm_head") else set())
    found = [f"a process-wide torch hook: {_hook_name(fn)}" for fn in global_forward_hooks()]
    for path, module in model.hf_model.named_modules():
        if id(module) not in relevant:
            continue
        for key, fn, kind in forward_hooks(module):
            if key not in ours and not _keeps_value(fn):
                found.append(f"{path or '(the model itself)'}: {_hook_name(fn)} ({kind})")
    return found


def _refuse_changing_hooks(model: Any) -> None:
    found = changing_hooks(model)
    if found:
        listed = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
        raise ValueError(
            f"decompose reads each component where the model produces it, before the torch hooks on it, so a hook "
            f"that changes a value would make the components sum to something the model did not run: {listed}. "
            "Remove the hook (handle.remove()) or leave the `spliced` block, or splice with error=True (the value "
            "then passes unchanged), and decompose again")


# ---- the one trace -------------------------------------------------------------------------------------

def _capture(model: Any, ids: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor,
             where: tuple[int, str] | None) -> dict[str, Any]:
    """Every value the decomposition freezes or splits, at the chosen positions only."""
    layers = model.text_config.num_hidden_layers
    last = layers - 1 if where is None else where[0]
    saved: dict[str, Any] = {}
    inputs = ids if mask is None else {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad(), model.trace(inputs):
        saved["embed"] = model.streams_in.output.index_select(2, index).save()
        for i in range(last + 1):
            layer = model.layers[i]
            if where == (i, "input"):
                saved["stack"] = layer.input.index_select(2, index).save()
                break
            saved[f"{i}.predict_coefs"] = layer.altup_predict_coefs.output.index_select(1, index).save()
            saved[f"{i}.active"] = layer.altup_predict.output[model.text_config.altup_active_idx].index_select(1, index).save()
            for name in ("laurel_branch", "attn_z", "attn_out", "mlp_out"):
                saved[f"{i}.{name}"] = getattr(layer, name).output.index_select(1, index).save()
            saved[f"{i}.correct_coefs"] = layer.altup_correct_coefs.output.index_select(1, index).save()
            saved[f"{i}.ple_out"] = layer.ple_out.output.index_select(1, index).save()
            if i == last:
                saved["stack"] = layer.output.index_select(2, index).save()
        if where is None:
            saved["merged"] = model.streams_merged.output.index_select(1, index).save()
    return saved


# ---- the covectors -------------------------------------------------------------------------------------

def _readout_covector(model: Any, saved: dict, direction: torch.Tensor) -> torch.Tensor:
    """``[R=S, S, B, P, D]``: the target on the last stack, readout stream r on stream r (zero elsewhere),
    with the merge's rescale and the final norm's scale frozen."""
    hf = model.hf_model
    language_model = module_tree.text_model(hf)
    stack, merged = saved["stack"], saved["merged"]
    streams = stack.shape[0]
    u = _through_unembedding(hf.lm_head.weight, direction.to(stack.device))   # [B, D]
    covector = stack.new_zeros((streams, *stack.shape), dtype=torch.float32)
    for k, on_stream in enumerate(stream_covectors(language_model, stack, merged, u[:, None, :])):
        covector[k, k] = on_stream
    return covector


_VOCAB_CHUNK = 16384   # unembedding rows converted to float32 at a time (E2B's whole matrix would be 2 GiB)


def _vocabulary_chunks(direction: torch.Tensor) -> list[torch.Tensor]:
    """The vocabulary ids a direction ``[B, V]`` touches, in chunks (a token or a pair: one small chunk)."""
    ids = direction.abs().sum(0).nonzero().flatten()
    return list(ids.split(_VOCAB_CHUNK))


def _through_unembedding(weight: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``direction @ W_U`` in float32 ``[B, D]``, reading only the rows the direction touches."""
    u = torch.zeros(direction.shape[0], weight.shape[1], device=direction.device)
    for ids in _vocabulary_chunks(direction):
        u += direction[:, ids] @ weight.index_select(0, ids.to(weight.device)).float().to(direction.device)
    return u


def _target_on_real_logits(model: Any, merged: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``[B, P]``: the direction applied to the real pre-soft-cap logits (the stock final norm, then the
    lm_head's rows for the ids the direction touches, in the model's dtype: those logits' own values)."""
    hf = model.hf_model
    hidden = module_tree.text_model(hf).norm(merged)
    total = torch.zeros(merged.shape[:2], device=merged.device)
    for ids in _vocabulary_chunks(direction):
        rows = hf.lm_head.weight.index_select(0, ids.to(hidden.device))
        total += torch.einsum("bpv,bv->bp", (hidden @ rows.T).float(), direction[:, ids].to(hidden.device))
    return total


def _stack_covector(target: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """``[R=S, S, B, P, D]`` for a vector target on a stack: ``[D]`` on every stream, or ``[S, D]``."""
    streams, dim = stack.shape[0], stack.shape[-1]
    if not isinstance(target, torch.Tensor) or not target.is_floating_point() or \
            tuple(target.shape) not in ((dim,), (streams, dim)):
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"with at=, the target is a float vector [D={dim}] (every stream) or [S={streams}, D]; "
                         f"got {shape}")
    if not bool(torch.isfinite(target).all()):
        raise ValueError("with at=, the target vector must be finite: it has inf or NaN entries")
    per_stream = target.detach().float().to(stack.device).expand(streams, dim)
    covector = stack.new_zeros((streams, *stack.shape), dtype=torch.float32)
    for k in range(streams):
        covector[k, k] = per_stream[k]
    return covector


# ---- backwards through the layers ----------------------------------------------------------------------

def _layer_backward(layer: Any, saved: dict, i: int, covector: torch.Tensor, active_index: int
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One layer, backwards: the covector on its input, each write's contribution ``[R, B, P]``, and the
    covector on ``x`` (the layer's output before AltUp correct, ``[R, B, P, D]``)."""
    correct = saved[f"{i}.correct_coefs"].float().permute(2, 0, 1)               # [S, B, P]
    on_x = (covector * correct[None, ..., None]).sum(1)                          # [R, B, P, D]
    dot = lambda cov, value: (cov * value.float()).sum(-1)
    contributions = {
        "attn_out": dot(on_x, saved[f"{i}.attn_out"]) / math.sqrt(2),
        "laurel_branch": dot(on_x, saved[f"{i}.laurel_branch"]) / math.sqrt(2),
        "mlp_out": dot(on_x, saved[f"{i}.mlp_out"]),
        "ple_out": dot(covector[:, 1:].sum(1), saved[f"{i}.ple_out"]),
    }
    norm = layer.input_layernorm
    scale = norm_scale(norm, saved[f"{i}.active"])   # normed = scale ⊙ active
    on_predictions = covector.clone()
    on_predictions[:, active_index] += on_x * ((1 + scale) / math.sqrt(2) - 1)
    mixing = saved[f"{i}.predict_coefs"].float() + torch.eye(correct.shape[0], device=correct.device)
    on_input = torch.einsum("bpjk,rkbpd->rjbpd", mixing, on_predictions)
    return on_input, contributions, on_x


def _heads(layer: Any, saved: dict, i: int, on_x: torch.Tensor) -> torch.Tensor:
    """``[H, B, P]``: ``attn_out``'s contribution per head, the post-attention norm's scale frozen."""
    attention, norm = layer.self_attn, layer.post_attention_layernorm
    z = saved[f"{i}.attn_z"]                                                     # [B, P, H, Dh]
    before_norm = attention.o_proj(z.flatten(-2))
    covector = on_x.sum(0) / math.sqrt(2) * norm_scale(norm, before_norm)
    per_head = (covector @ attention.o_proj.weight.float()).unflatten(-1, z.shape[-2:])
    return (per_head * z.float()).sum(-1).permute(2, 0, 1)


def _backward(model: Any, saved: dict, covector: torch.Tensor, last: int
              ) -> tuple[list[str], torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Every component's contribution per readout stream ``[N, R, B, P]``, the heads per layer, and the
    covector on each layer's ``x`` (for neurons)."""
    layers = module_tree.text_model(model.hf_model).layers
    active = model.text_config.altup_active_idx
    per_layer: list[dict[str, torch.Tensor]] = []
    heads, on_xs = {}, {}
    for i in range(last, -1, -1):
        covector, contributions, on_x = _layer_backward(layers[i], saved, i, covector, active)
        heads[i], on_xs[i] = _heads(layers[i], saved, i, on_x), on_x.sum(0)
        per_layer.insert(0, contributions)
    embed = (covector * saved["embed"].float()).sum(-1).sum(1)                   # [R, B, P]
    names = ["embed"] + [f"layers.{i}.{c}" for i in range(last + 1) for c in COMPONENTS]
    values = torch.stack([embed] + [layer[c] for layer in per_layer for c in COMPONENTS])
    return names, values, heads, on_xs


def _neuron_splitter(model: Any, inputs: Any, index: torch.Tensor, on_xs: dict[int, torch.Tensor]) -> Any:
    @torch.no_grad()
    def split(layer: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in on_xs:
            raise KeyError(f"layer {layer} has no mlp_out in this decomposition (layers {sorted(on_xs)})")
        _refuse_changing_hooks(model)   # a hook added since would split another forward than the one decomposed
        with torch.no_grad(), model.trace(inputs):
            act = model.layers[layer].mlp_act.output.index_select(1, index).save()
        module = module_tree.text_model(model.hf_model).layers[layer]
        norm = module.post_feedforward_layernorm
        covector = on_xs[layer] * norm_scale(norm, module.mlp.down_proj(act))
        per_neuron = (covector @ module.mlp.down_proj.weight.float()) * act.float()      # [B, P, F]
        top = per_neuron.abs().topk(min(k, per_neuron.shape[-1]), dim=-1).indices
        return top.permute(2, 0, 1), per_neuron.gather(-1, top).permute(2, 0, 1)
    return split


def decompose(model: Gemma3nProbe, inputs: Any, target: Any, positions: Sequence[int] | int | None = None,
              at: str | None = None) -> Decomposition:
    """The exact decomposition of ``target`` into components (see the module doc).

    ``inputs`` as for a trace (text, texts, or token ids ``[B, T]``). ``target``: a token id or string, a
    pair ``(a, b)`` for logit(a) − logit(b), or a float direction ``[V]`` / ``[B, V]`` in logit space — on
    the pre-soft-cap logits. ``positions``: token positions (default all, negative from the end).
    ``at="layers.{i}.input"`` / ``"layers.{i}.output"`` decomposes that stack instead, for a target vector
    ``[D]`` (every stream) or ``[S, D]``: the components written before it (TransformerLens'
    ``decompose_resid``, exact through AltUp).
    """
    with torch.no_grad():
        return _decompose(model, inputs, target, positions, at)


def _decompose(model: Any, inputs: Any, target: Any, positions: Sequence[int] | int | None,
               at: str | None) -> Decomposition:
    ids, mask = encode_inputs(model, inputs)
    layers = model.text_config.num_hidden_layers
    where = _where(at, layers)
    _refuse_changing_hooks(model)
    if where is None and not hasattr(model.hf_model, "lm_head"):
        raise ValueError(f"{type(model.hf_model).__name__} has no lm_head: decompose a stack with at= instead")
    chosen = _positions(positions, ids.shape[1])
    direction = logit_direction(model, target, ids.shape[0]) if where is None else None
    index = torch.tensor(chosen, device=ids.device)
    saved = _capture(model, ids, mask, index, where)
    if where is None:
        assert direction is not None
        covector, last = _readout_covector(model, saved, direction), layers - 1
        total = _target_on_real_logits(model, saved["merged"], direction)
    else:
        covector = _stack_covector(target, saved["stack"])
        last = where[0] if where[1] == "output" else where[0] - 1
        total = (covector.sum(0) * saved["stack"].float()).sum(-1).sum(0)
    names, by_readout, heads, on_xs = _backward(model, saved, covector, last)
    inputs_used = ids if mask is None else {"input_ids": ids, "attention_mask": mask}
    tokens = [model.tokenizer.decode([int(ids[0, p])]) for p in chosen] if model.tokenizer is not None else None
    return Decomposition(names, by_readout.sum(1), total.float(), by_readout, chosen, tokens, heads,
                         _neuron_splitter(model, inputs_used, index, on_xs))
