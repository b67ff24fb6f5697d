"""The table of intervention points: one row per value, in execution order. Injection, the
``g3n-probe points`` listing, the README and the tests all read these rows; adding a point of an
existing kind is one row (plus its reference in tests/reference.py and the README table).

Per-layer rows live under ``model.layers[i]``; model-level rows under ``model``. The decoder layer's
own ``.input`` and ``.output`` stream stacks are rows too (`routes.LayerStack`), first and last of a
layer, so execution order, shapes and the batcher's marks come from one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from ..checkpoint import module_tree
from .attention import AttentionWeights
from .routes import (
    InputOf,
    KeyValueOutputOf,
    LayerArgument,
    LayerStack,
    MethodResult,
    ModuleItself,
    Offset,
    OutputOf,
    RootOutput,
    Route,
    SplitLast,
    SquareTransposed,
)

LAYER, MODEL = "layer", "model"


@dataclass(frozen=True)
class Point:
    """One row of the table. Every point is writable.

    ``shape`` is symbolic: S streams, B batch, T tokens, D hidden, P per-layer width, L layers,
    F FFN width, V vocabulary, H heads, Dh head dimension. ``route`` is relative to the decoder layer
    (LAYER rows) or the ``Gemma3nTextModel`` (MODEL rows); ``stack``: an [S,B,T,D] stream stack,
    batch on dimension 1.
    """

    name: str
    scope: str
    shape: str
    produced: str
    meaning: str
    route: Route
    stack: bool = False

    @property
    def needs(self) -> str | None:
        """What the model must use for the value to exist (``"eager"`` attention), or None."""
        return self.route.needs

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(self.shape.strip("[]").split(","))

    def axis(self, letter: str) -> int:
        """The dimension of the value named ``letter`` ("T": the token axis, the query axis of a pattern)."""
        return self.axes.index(letter)

    @property
    def batch_axis(self) -> int:
        return 1 if self.stack else 0

    def qualified(self, layer: int | None) -> str:
        return self.name if layer is None else f"layers.{layer}.{self.name}"

    def read(self, model: Any, layer: int | None) -> Any:
        """The value inside a trace on a `g3n_probe.Gemma3nProbe` (``layer`` for per-layer rows)."""
        owner = model if layer is None else model.layers[layer]
        return self.route.read(owner, self.name)


_QUALIFIED = re.compile(r"layers\.(-?\d+)\.(\w+)")


def split_qualified(name: str) -> tuple[int | None, str]:
    """``"layers.3.mlp_out"`` -> (3, ``"mlp_out"``), the inverse of `Point.qualified` (also for the layer
    stacks ``input``/``output`` and the layer's modules, ``"layers.3.mlp"``); any other name -> (None, name).
    The layer is as written (negative too): its range is the caller's to check."""
    match = _QUALIFIED.fullmatch(name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


_HEADS = SplitLast("num_attention_heads")
_PER_LAYER = SplitLast("num_hidden_layers")

TABLE: tuple[Point, ...] = (
    # ---- model level, before the layers -------------------------------------------------------
    Point("ple_tokens", MODEL, "[B,T,L,P]", "output of embed_tokens_per_layer",
          "per-layer token embeddings (table rows × √P)", OutputOf(module_tree.PER_LAYER_TABLE, view=_PER_LAYER)),
    Point("embed", MODEL, "[B,T,D]", "inputs_embeds, input of per_layer_model_projection",
          "token embedding entering the text model, vision/audio ids already swapped (stream 0 of the initial stack)",
          InputOf("per_layer_model_projection", in_place=True, private_copy_of="inputs_embeds")),
    Point("ple_inputs", MODEL, "[B,T,L,P]", "result of project_per_layer_inputs",
          "combined per-layer inputs the layers receive", MethodResult("project_per_layer_inputs")),
    Point("streams_in", MODEL, "[S,B,T,D]", "input of layers.0",
          "initial stack entering layer 0", InputOf("layers.0"), stack=True),
    # ---- per layer, under model.layers[i] ------------------------------------------------------
    Point("input", LAYER, "[S,B,T,D]", "input of the decoder layer",
          "the layer's own `.input`: the stream stack entering the layer", LayerStack("input"), stack=True),
    Point("ple_input", LAYER, "[B,T,P]", "per_layer_input argument of the layer",
          "this layer's per-layer input P", LayerArgument(2, "per_layer_input", served_by="altup.predict")),
    Point("altup_router_predict", LAYER, "[B,T,S]", "altup.compute_router_modalities inside altup.predict",
          "AltUp router's modality coefficients for predict: tanh of the routed, normed active stream",
          MethodResult("altup.compute_router_modalities", inside="predict")),
    Point("altup_predict_coefs", LAYER, "[B,T,S,S]", "output of altup.prediction_coefs, reshaped and transposed as predict does",
          "AltUp predict coefficients: [..., j, k] weighs source stream j in prediction k (P_k = X_k + Σ_j C[j,k]·X_j)",
          OutputOf("altup.prediction_coefs", view=SquareTransposed("altup_num_inputs"))),
    Point("altup_predict", LAYER, "[S,B,T,D]", "result of altup.predict (step 1)", "AltUp predict output",
          MethodResult("altup.predict"), stack=True),
    Point("laurel_branch", LAYER, "[B,T,D]", "output of laurel.post_laurel_norm",
          "the LAuReL low-rank branch alone, after its norm", OutputOf("laurel.post_laurel_norm")),
    Point("laurel", LAYER, "[B,T,D]", "output of laurel (step 3)", "stock LAuReL block output (normed + branch)",
          ModuleItself("laurel")),
    Point("attn_q", LAYER, "[B,T,H,Dh]", "output of self_attn.q_norm", "per-head queries after their norm, before RoPE",
          OutputOf("self_attn.q_norm")),
    Point("attn_k", LAYER, "[B,T,Hkv,Dh]", "output of self_attn.k_norm",
          "per-head keys after their norm, before RoPE (absent on KV-reuse layers: the error names the store layer)",
          KeyValueOutputOf("self_attn.k_norm")),
    Point("attn_v", LAYER, "[B,T,Hkv,Dh]", "output of self_attn.v_norm",
          "per-head values after their norm (absent on KV-reuse layers: the error names the store layer)",
          KeyValueOutputOf("self_attn.v_norm")),
    Point("attn_pattern", LAYER, "[B,H,T,T]", "eager attention softmax",
          "attention probabilities per head (sliding-window layers included); a write changes the attention output",
          AttentionWeights("self_attn")),
    Point("attn_z", LAYER, "[B,T,H,Dh]", "input of self_attn.o_proj",
          "per-head attention output before o_proj", InputOf("self_attn.o_proj", view=_HEADS)),
    Point("attn_out", LAYER, "[B,T,D]", "output of post_attention_layernorm (step 4)",
          "attention output after the post-attention norm", OutputOf("post_attention_layernorm")),
    Point("resid_mid", LAYER, "[B,T,D]", "input of pre_feedforward_layernorm (step 5)",
          "(active + attn_out + laurel) / √2; a write reaches both the MLP input and the residual add",
          InputOf("pre_feedforward_layernorm", in_place=True)),
    Point("mlp_gate", LAYER, "[B,T,F]", "input of mlp.act_fn",
          "gate pre-activation after the gaussian top-k on sparse layers (the plain gate projection on dense layers)",
          InputOf("mlp.act_fn")),
    Point("mlp_act", LAYER, "[B,T,F]", "input of mlp.down_proj", "activation × up-projection",
          InputOf("mlp.down_proj")),
    Point("mlp_out", LAYER, "[B,T,D]", "output of post_feedforward_layernorm (step 6)",
          "MLP output after the post-feedforward norm", OutputOf("post_feedforward_layernorm")),
    Point("altup_router_correct", LAYER, "[B,T,S]", "altup.compute_router_modalities inside altup.correct",
          "AltUp router's modality coefficients for correct: tanh of the routed, normed layer output",
          MethodResult("altup.compute_router_modalities", inside="correct")),
    Point("altup_correct_coefs", LAYER, "[B,T,S]", "output of altup.correction_coefs, + 1 as correct adds it (step 7)",
          "AltUp correct coefficients: each stream's factor on the innovation (layer output − active prediction)",
          OutputOf("altup.correction_coefs", view=Offset(1.0))),
    Point("altup_correct", LAYER, "[S,B,T,D]", "result of altup.correct (step 7)",
          "AltUp correct output before the in-place PLE add (a snapshot)",
          MethodResult("altup.correct", snapshot=True), stack=True),
    Point("ple_gate", LAYER, "[B,T,P]", "input of per_layer_projection (step 9)",
          "gelu(gate(first)) ⊙ P", InputOf("per_layer_projection")),
    Point("ple_out", LAYER, "[B,T,D]", "output of post_per_layer_input_norm (step 9)",
          "PLE contribution added to streams 1..S-1", OutputOf("post_per_layer_input_norm")),
    Point("output", LAYER, "[S,B,T,D]", "output of the decoder layer",
          "the layer's own `.output`: the stream stack leaving the layer", LayerStack("output"), stack=True),
    # ---- model level, after the layers ---------------------------------------------------------
    Point("streams_merged", MODEL, "[B,T,D]", "input of the text model's norm",
          "merged hidden after the unembed projections and mean, before the final norm", InputOf("norm")),
    Point("logits", MODEL, "[B,T,V]", "the root model's output.logits, after the soft cap",
          "soft-capped logits (served after model.output)", RootOutput("logits", requires="lm_head")),
)

#: The layer stacks (rows whose value is the decoder layer's own ``.input`` / ``.output``).
STACK_ROWS = tuple(p for p in TABLE if isinstance(p.route, LayerStack))
#: The points: rows whose value is ``<name>.output`` of an envoy of their own.
POINTS = tuple(p for p in TABLE if p not in STACK_ROWS)
LAYER_POINTS = tuple(p for p in POINTS if p.scope == LAYER)
MODEL_POINTS = tuple(p for p in POINTS if p.scope == MODEL)
_FIRST_LAYER_ROW = next(i for i, p in enumerate(TABLE) if p.scope == LAYER)
BY_NAME = {p.name: p for p in TABLE}


def execution_rank(point: Point, layer: int | None) -> tuple[int, int, int]:
    """Sorts (row, layer) pairs into the order a forward produces them (nnsight's access order)."""
    index = TABLE.index(point)
    if point.scope == LAYER:
        return (1, layer or 0, index)
    return (0 if index < _FIRST_LAYER_ROW else 2, 0, index)


def in_execution_order(items: Iterable[tuple[Point, int | None]]) -> list[tuple[Point, int | None]]:
    return sorted(items, key=lambda item: execution_rank(*item))


def requirement(point: Point) -> str:
    """The note a listing adds for a point that exists only under some settings."""
    return " (eager attention only: load with `attn_implementation=\"eager\"`)" if point.needs == "eager" else ""


def concrete_shape(point: Point, config: Any, batch: int = 1, tokens: int = 1, layer: int = 0) -> tuple[int, ...]:
    """The point's shape for a given text config, batch and sequence length."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = {
        "S": text.altup_num_inputs, "B": batch, "T": tokens, "D": text.hidden_size,
        "P": text.hidden_size_per_layer_input, "L": text.num_hidden_layers,
        "F": text.intermediate_size[layer], "V": text.vocab_size, "H": text.num_attention_heads,
        "Dh": text.head_dim, "Hkv": text.num_key_value_heads,
    }
    return tuple(sizes[s] for s in point.axes)


def listing(config: Any = None, batch: int = 1, tokens: int = 8) -> list[tuple[str, str, str, str, str]]:
    """(where, name, shape, value, produced at) per row: what the README table and `g3n-probe points` show."""
    rows = []
    for point in TABLE:
        where = "model.layers[i]" if point.scope == LAYER else "model"
        shape = point.shape if config is None else f"{point.shape} = {list(concrete_shape(point, config, batch, tokens))}"
        rows.append((where, point.name, shape, point.meaning + requirement(point), point.produced))
    return rows


def markdown_table() -> str:
    """The README's table of points, rendered from `TABLE` (a test keeps the README in sync)."""
    lines = ["| where | name | shape | value | produced at |", "|---|---|---|---|---|"]
    for where, name, shape, value, produced in listing():
        lines.append(f"| `{where}` | `{name}` | {shape} | {value} | {produced} |")
    return "\n".join(lines)
