"""The intervention points: one table, one identity module, one injection routine.

Every Gemma-3n-specific value a researcher wants to read or edit is given a name and a place in the
module tree. The place is a `HookPoint` (TransformerLens' idea): an identity module the value is
passed *through*, so nnsight serves it at ``.output`` and whatever comes back — the same tensor,
edited in place, or a new one — is what the stock forward goes on with. Nothing of the stock
forward is copied; values are routed through the points from outside it:

* ``output``  a torch forward hook on a stock module routes that module's output;
* ``input``   a torch forward pre-hook on a stock module routes its first argument;
* ``method``  an instance-level call-through wrapper on a stock *method* (``altup.predict`` and
              ``altup.correct`` are methods, invisible to module hooks) routes its return value;
* ``module``  the value already is a stock module's output (``laurel``): its envoy is the point;
* ``input_inplace`` for an inline value used twice (``resid_mid``): a write is copied into the
              original tensor so both uses see it;
* a few special routes named in the table (``method_arg``, ``layer_arg``, ``logits``, ``attention``).

`POINTS` is the single source for injection, ``g3n-probe points``, the README table and the tests.
Rows are in execution order: inside one trace, nnsight requires access in this order.

Stream stacks ([S,B,T,D]) carry their batch on dimension 1; every stack handed to nnsight is marked
with `mark_stack` so the probe's batcher narrows and widens invokes on the right axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

STACK_BATCH_DIM = "_g3n_batch_dim"


@dataclass(frozen=True)
class Point:
    """One row of the intervention-point table."""

    name: str
    scope: str  # "layer" (under model.layers[i]) or "model"
    shape: str  # symbolic; S streams, B batch, T tokens, D hidden, P per-layer width, F FFN width, ...
    produced: str  # where the value arises in the stock forward
    meaning: str
    route: str  # how the value reaches the point (see the module docstring)
    site: str  # the stock module or method the route attaches to, relative to the scope
    writable: bool = True
    stack: bool = False  # [S,B,T,D]: batch on dimension 1
    needs: str | None = None  # "eager": only exists when attention probabilities are formed


_LAYER = "layer"
_MODEL = "model"

POINTS: tuple[Point, ...] = (
    # ---- model level, before the layers -------------------------------------------------------
    Point("ple_tokens", _MODEL, "[B,T,L,P]", "language_model.get_per_layer_inputs",
          "per-layer token embeddings (table rows × √P)", "output", "model.language_model.embed_tokens_per_layer"),
    Point("embed", _MODEL, "[B,T,D]", "inputs_embeds entering language_model",
          "token embedding entering the text model, vision/audio ids already swapped (stream 0 of the initial stack)",
          "method_arg", "model.language_model.project_per_layer_inputs"),
    Point("ple_inputs", _MODEL, "[B,T,L,P]", "language_model.project_per_layer_inputs",
          "combined per-layer inputs the layers receive", "method", "model.language_model.project_per_layer_inputs"),
    Point("streams_in", _MODEL, "[S,B,T,D]", "stack built before layer 0",
          "initial stack entering layer 0", "layer_arg", "model.language_model.layers.0", stack=True),
    # ---- per layer, under model.layers[i] ------------------------------------------------------
    Point("ple_input", _LAYER, "[B,T,P]", "per_layer_input argument of the layer",
          "this layer's per-layer input P", "layer_arg", ""),
    Point("altup_router_predict", _LAYER, "[B,T,S]", "altup.compute_router_modalities inside altup.predict",
          "AltUp router's modality coefficients for predict: tanh of the routed, normed active stream",
          "method", "altup.compute_router_modalities"),
    Point("altup_predict", _LAYER, "[S,B,T,D]", "altup.predict (step 1)", "AltUp predict output",
          "method", "altup.predict", stack=True),
    Point("laurel_branch", _LAYER, "[B,T,D]", "laurel.post_laurel_norm",
          "the LAuReL low-rank branch alone, after its norm", "output", "laurel.post_laurel_norm"),
    Point("laurel", _LAYER, "[B,T,D]", "laurel (step 3)", "stock LAuReL block output (normed + branch)",
          "module", "laurel"),
    Point("attn_pattern", _LAYER, "[B,H,T,T]", "eager attention softmax",
          "attention probabilities per head (sliding-window layers included); a write changes the attention output",
          "attention", "self_attn", needs="eager"),
    Point("attn_z", _LAYER, "[B,T,H,Dh]", "input of self_attn.o_proj",
          "per-head attention output before o_proj", "input", "self_attn.o_proj"),
    Point("attn_out", _LAYER, "[B,T,D]", "post_attention_layernorm (step 4)",
          "attention output after the post-attention norm", "output", "post_attention_layernorm"),
    Point("resid_mid", _LAYER, "[B,T,D]", "input of pre_feedforward_layernorm (step 5)",
          "(active + attn_out + laurel) / √2; a write reaches both the MLP input and the residual add",
          "input_inplace", "pre_feedforward_layernorm"),
    Point("mlp_gate", _LAYER, "[B,T,F]", "input of mlp.act_fn",
          "gate pre-activation after the gaussian top-k on sparse layers (the plain gate projection on dense layers)",
          "input", "mlp.act_fn"),
    Point("mlp_act", _LAYER, "[B,T,F]", "input of mlp.down_proj", "activation × up-projection",
          "input", "mlp.down_proj"),
    Point("mlp_out", _LAYER, "[B,T,D]", "post_feedforward_layernorm (step 6)",
          "MLP output after the post-feedforward norm", "output", "post_feedforward_layernorm"),
    Point("altup_router_correct", _LAYER, "[B,T,S]", "altup.compute_router_modalities inside altup.correct",
          "AltUp router's modality coefficients for correct: tanh of the routed, normed layer output",
          "method", "altup.compute_router_modalities"),
    Point("altup_correct", _LAYER, "[S,B,T,D]", "altup.correct (step 7)",
          "AltUp correct output before the in-place PLE add (a snapshot)", "method", "altup.correct", stack=True),
    Point("ple_gate", _LAYER, "[B,T,P]", "input of per_layer_projection (step 9)",
          "gelu(gate(first)) ⊙ P", "input", "per_layer_projection"),
    Point("ple_out", _LAYER, "[B,T,D]", "post_per_layer_input_norm (step 9)",
          "PLE contribution added to streams 1..S-1", "output", "post_per_layer_input_norm"),
    # ---- model level, after the layers ---------------------------------------------------------
    Point("streams_merged", _MODEL, "[B,T,D]", "input of language_model.norm",
          "merged hidden after the unembed projections and mean, before the final norm",
          "input", "model.language_model.norm"),
    Point("logits", _MODEL, "[B,T,V]", "Gemma3nForConditionalGeneration.forward, after the soft cap",
          "soft-capped logits", "logits", "forward"),
)

LAYER_POINTS = tuple(p for p in POINTS if p.scope == _LAYER)
MODEL_POINTS = tuple(p for p in POINTS if p.scope == _MODEL)


def mark_stack(tensor: Any) -> Any:
    """Mark an [S,B,T,D] stream stack: its batch is dimension 1 (see `probe.StreamBatcher`)."""
    if isinstance(tensor, torch.Tensor):
        setattr(tensor, STACK_BATCH_DIM, 1)
    return tensor


def batch_dim(tensor: torch.Tensor) -> int:
    return getattr(tensor, STACK_BATCH_DIM, 0)


class PointWriteError(ValueError):
    """A write to a point had the wrong type, shape, dtype or device."""


class HookPoint(nn.Module):
    """An identity module that makes a value a named, hookable, writable place.

    Calling it returns its input unchanged — unless an nnsight trace (or a torch forward hook on it)
    replaced the output, in which case the replacement is checked against the original's shape,
    dtype and device before the model continues with it.
    """

    def __init__(self, point: Point, layer: int | None, config: Any) -> None:
        super().__init__()
        self.point = point
        self.layer = layer
        self.text_config = config

    @property
    def qualified_name(self) -> str:
        return self.point.name if self.layer is None else f"layers.{self.layer}.{self.point.name}"

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        result = super().__call__(value)
        if result is not value:
            self._check_write(result, value)
        return result

    def _check_write(self, written: Any, original: torch.Tensor) -> None:
        where = f"point {self.qualified_name} {self.point.shape}"
        if not isinstance(written, torch.Tensor):
            raise PointWriteError(f"{where}: wrote a {type(written).__name__}; expected a tensor of shape {tuple(original.shape)}")
        if written.shape != original.shape:
            raise PointWriteError(
                f"{where}: wrote shape {tuple(written.shape)}; expected {tuple(original.shape)}"
            )
        if written.dtype != original.dtype:
            raise PointWriteError(f"{where}: wrote dtype {written.dtype}; expected {original.dtype} (use .to({original.dtype}))")
        if written.device != original.device:
            raise PointWriteError(f"{where}: wrote a tensor on {written.device}; expected {original.device}")

    def available(self) -> str | None:
        """None when the point fires in this model; otherwise why it does not."""
        if self.point.needs == "eager" and getattr(self.text_config, "_attn_implementation", None) != "eager":
            return (
                f"{self.qualified_name} needs the attention probabilities, which "
                f"attn_implementation={self.text_config._attn_implementation!r} never forms: "
                "load with g3n.load(..., attn_implementation='eager')"
            )
        return None

    def observed(self) -> bool:
        """Whether anyone can see this point's value now: an active trace or a torch hook on it."""
        if self._forward_hooks or self._forward_pre_hooks:
            return True
        from nnsight.intervention.source import STATE

        state = self.__dict__.get(STATE)
        return state is not None and state.active()[0] is not None

    def extra_repr(self) -> str:
        return f"{self.point.shape}"


# --------------------------------------------------------------------------------------------------
# Injection
# --------------------------------------------------------------------------------------------------


def _resolve(root: nn.Module, dotted: str) -> tuple[Any, str]:
    owner_path, _, attr = dotted.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    return owner, attr


def _set_plain(obj: Any, name: str, value: Any) -> None:
    # A reference that must not become a registered submodule (that would move the point in the tree).
    object.__setattr__(obj, name, value)


def _pass_through(point: HookPoint, value: torch.Tensor) -> torch.Tensor:
    if point.point.stack:
        mark_stack(value)
    if not point.observed():
        return value  # nobody can see or change it: skip the module call (the points' only cost)
    result = point(value)
    return mark_stack(result) if point.point.stack else result


def _output_hook(point: HookPoint, view: Callable | None = None, unview: Callable | None = None):
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        value = view(output) if view else output
        result = _pass_through(point, value)
        if result is value:
            return None
        return unview(result, output) if unview else result

    return hook


def _input_hook(point: HookPoint, view: Callable | None = None, unview: Callable | None = None):
    def hook(module: nn.Module, args: tuple) -> tuple | None:
        original = args[0]
        value = view(original) if view else original
        result = _pass_through(point, value)
        if result is value:
            return None
        return (unview(result, original) if unview else result, *args[1:])

    return hook


def _input_inplace_hook(point: HookPoint):
    """For inline values used more than once (``resid_mid``): a write is copied into the original
    tensor, so every later use in the stock forward sees it."""

    def hook(module: nn.Module, args: tuple) -> None:
        original = args[0]
        result = _pass_through(point, original)
        if result is not original:
            original.copy_(result)
        return None

    return hook


def _heads_view(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    return tensor.view(*tensor.shape[:-1], heads, tensor.shape[-1] // heads)


def _merge_heads(written: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    return written.reshape(original.shape)


def inject(model: nn.Module) -> dict[str, Any]:
    """Attach every point of `POINTS` to a stock ``Gemma3nForConditionalGeneration``.

    Must run before nnsight wraps the model (nnsight installs its controller per module once;
    modules added or forwards replaced later would be invisible to it). Returns the torch hook
    handles, so a caller can remove them.
    """
    if getattr(model, "_g3n_injected", False):
        raise RuntimeError("intervention points are already injected into this model")
    text_config = model.config.get_text_config()
    language_model = model.model.language_model
    handles: list[Any] = []
    model_points = {p.name: HookPoint(p, None, text_config) for p in MODEL_POINTS}
    for name, point in model_points.items():
        model.add_module(name, point)

    # ---- model level ----
    plt = language_model.embed_tokens_per_layer
    layers, width = text_config.num_hidden_layers, text_config.hidden_size_per_layer_input
    handles.append(plt.register_forward_hook(_output_hook(
        model_points["ple_tokens"],
        view=lambda out: out.view(*out.shape[:-1], layers, width),
        unview=lambda written, out: written.reshape(out.shape),
    )))
    _wrap_project_per_layer_inputs(language_model, model_points["embed"], model_points["ple_inputs"])
    handles.append(language_model.norm.register_forward_pre_hook(_input_hook(model_points["streams_merged"])))
    _wrap_forward_for_logits(model, model_points["logits"])

    # ---- per layer ----
    for index, layer in enumerate(language_model.layers):
        points = {p.name: HookPoint(p, index, text_config) for p in LAYER_POINTS if p.route != "module"}
        for name, point in points.items():
            layer.add_module(name, point)
        handles.extend(_inject_layer(layer, points, model_points["streams_in"] if index == 0 else None))
    _install_eager_pattern_route()
    model._g3n_injected = True
    return {"handles": handles}


def _inject_layer(layer: nn.Module, points: dict[str, HookPoint], streams_in: HookPoint | None) -> list[Any]:
    handles = []
    heads = layer.self_attn.config.num_attention_heads
    for point in points.values():
        spec = point.point
        if spec.route == "output":
            target = layer.get_submodule(spec.site)
            handles.append(target.register_forward_hook(_output_hook(point)))
        elif spec.route == "input":
            target = layer.get_submodule(spec.site)
            if spec.name == "attn_z":
                hook = _input_hook(point, view=lambda t, h=heads: _heads_view(t, h), unview=_merge_heads)
            else:
                hook = _input_hook(point)
            handles.append(target.register_forward_pre_hook(hook))
        elif spec.route == "input_inplace":
            handles.append(layer.get_submodule(spec.site).register_forward_pre_hook(_input_inplace_hook(point)))
    _set_plain(layer.self_attn, "_g3n_attn_pattern", points["attn_pattern"])
    _wrap_altup(layer, points)
    handles.append(layer.register_forward_pre_hook(_layer_pre_hook(points["ple_input"], streams_in), with_kwargs=True))
    handles.append(layer.register_forward_hook(_layer_post_hook, always_call=True))
    return handles


_PLE_ARG = 2  # decoder_layer(hidden_states, position_embeddings, per_layer_input, ...)


def _layer_pre_hook(ple_input: HookPoint, streams_in: HookPoint | None):
    def hook(layer: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        args = list(args)
        if args:
            mark_stack(args[0])
            if streams_in is not None:
                args[0] = _pass_through(streams_in, args[0])
        per_layer_input = args[_PLE_ARG] if len(args) > _PLE_ARG else kwargs.get("per_layer_input")
        if per_layer_input is not None and ple_input.observed():
            # A private copy, so a write to ple_input can be copied into the tensor the stock body
            # multiplies with, without touching the model-level ple_inputs a user may have saved.
            per_layer_input = per_layer_input.clone()
            if len(args) > _PLE_ARG:
                args[_PLE_ARG] = per_layer_input
            else:
                kwargs["per_layer_input"] = per_layer_input
        _set_plain(layer, "_g3n_per_layer_input", per_layer_input)
        return tuple(args), kwargs

    return hook


def _layer_post_hook(layer: nn.Module, args: Any, output: Any) -> None:
    _set_plain(layer, "_g3n_per_layer_input", None)
    return None


def _wrap_altup(layer: nn.Module, points: dict[str, HookPoint]) -> None:
    altup = layer.altup
    stock_predict, stock_correct, stock_router = altup.predict, altup.correct, altup.compute_router_modalities
    _set_plain(altup, "_g3n_phase", None)

    def compute_router_modalities(x: torch.Tensor) -> torch.Tensor:
        coefficients = stock_router(x)
        phase = altup.__dict__.get("_g3n_phase")
        if phase is None:
            return coefficients
        return _pass_through(points[f"altup_router_{phase}"], coefficients)

    def predict(hidden_states: torch.Tensor) -> torch.Tensor:
        per_layer_input = layer.__dict__.get("_g3n_per_layer_input")
        if per_layer_input is not None:
            written = _pass_through(points["ple_input"], per_layer_input)
            if written is not per_layer_input:
                per_layer_input.copy_(written)
        _set_plain(altup, "_g3n_phase", "predict")
        try:
            predictions = stock_predict(hidden_states)
        finally:
            _set_plain(altup, "_g3n_phase", None)
        return _pass_through(points["altup_predict"], predictions)

    def correct(predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        _set_plain(altup, "_g3n_phase", "correct")
        try:
            corrected = stock_correct(predictions, activated)
        finally:
            _set_plain(altup, "_g3n_phase", None)
        point = points["altup_correct"]
        result = _pass_through(point, corrected)
        # The decoder layer adds the PLE contribution to this tensor in place; what the point
        # handed out must stay the pre-PLE value, so the body gets a copy while anyone watches.
        return mark_stack(result.clone()) if point.observed() else result

    _set_plain(altup, "compute_router_modalities", compute_router_modalities)
    _set_plain(altup, "predict", predict)
    _set_plain(altup, "correct", correct)


def _wrap_project_per_layer_inputs(language_model: nn.Module, embed: HookPoint, ple_inputs: HookPoint) -> None:
    stock = language_model.project_per_layer_inputs

    def project_per_layer_inputs(inputs_embeds: torch.Tensor, per_layer_inputs: torch.Tensor | None = None) -> torch.Tensor:
        # The text model keeps using its own inputs_embeds after this call (stream 0, AltUp
        # projections, masks), so a write is copied into that tensor.
        written = _pass_through(embed, inputs_embeds)
        if written is not inputs_embeds:
            inputs_embeds.copy_(written)
        return _pass_through(ple_inputs, stock(inputs_embeds, per_layer_inputs))

    _set_plain(language_model, "project_per_layer_inputs", project_per_layer_inputs)


def _wrap_forward_for_logits(model: nn.Module, point: HookPoint) -> None:
    """The soft cap is inline at the end of the stock forward, so ``logits`` is routed from an
    instance-level call-through ``forward``. Set before nnsight wraps the model, it becomes the body
    nnsight runs, so ``model.logits`` is served before ``model.output``."""
    stock_forward = type(model).forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        output = stock_forward(model, *args, **kwargs)
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor):
            written = _pass_through(point, logits)
            if written is not logits:
                output.logits = written
        return output

    _set_plain(model, "forward", forward)


# ---- attention probabilities ---------------------------------------------------------------------

_STOCK_EAGER: Callable | None = None


def _install_eager_pattern_route() -> None:
    """Route eager attention probabilities through each layer's ``attn_pattern`` point.

    ``Gemma3nTextAttention.forward`` looks up the module-level ``eager_attention_forward`` of
    ``modeling_gemma3n`` when it runs eagerly. It is replaced (once, idempotently) by a call-through
    wrapper: attention modules without a point get the stock function untouched; for the others the
    probabilities pass through the point, and only if they were written is the output recomputed as
    ``written @ V`` (the last step of the stock function), so an untouched read stays bit-exact.
    """
    global _STOCK_EAGER
    from transformers.models.gemma3n import modeling_gemma3n

    if _STOCK_EAGER is not None:
        return
    _STOCK_EAGER = modeling_gemma3n.eager_attention_forward

    def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any):
        output, weights = _STOCK_EAGER(module, query, key, value, attention_mask, *args, **kwargs)
        point = module.__dict__.get("_g3n_attn_pattern")
        if point is None or not point.observed():
            return output, weights
        version = weights._version
        written = point(weights)
        if written is weights and weights._version == version:
            return output, weights
        values = modeling_gemma3n.repeat_kv(value, module.num_key_value_groups)
        output = torch.matmul(written, values).transpose(1, 2).contiguous()
        return output, written

    modeling_gemma3n.eager_attention_forward = eager_attention_forward


def markdown_table() -> str:
    """The README's table of points, rendered from `POINTS` (a test keeps the README in sync)."""
    lines = ["| where | name | shape | value | writable |", "|---|---|---|---|---|"]
    for point in POINTS:
        where = "`model.layers[i]`" if point.scope == _LAYER else "`model`"
        note = " (load with `attn_implementation=\"eager\"`)" if point.needs == "eager" else ""
        lines.append(f"| {where} | `{point.name}` | {point.shape} | {point.meaning}{note} | {'yes' if point.writable else 'no'} |")
    return "\n".join(lines)


def concrete_shape(point: Point, config: Any, batch: int = 1, tokens: int = 1, layer: int = 0) -> tuple[int, ...]:
    """The point's shape for a given text config, batch and sequence length."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = {
        "S": text.altup_num_inputs, "B": batch, "T": tokens, "D": text.hidden_size,
        "P": text.hidden_size_per_layer_input, "L": text.num_hidden_layers,
        "F": text.intermediate_size[layer], "V": text.vocab_size, "H": text.num_attention_heads,
        "Dh": text.head_dim,
    }
    return tuple(sizes[s] for s in point.shape.strip("[]").split(","))

