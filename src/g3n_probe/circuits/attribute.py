"""Attribution graphs through AltUp: which features cause which, across layers and positions, exactly.

`attribute` builds the graph of one prompt on the frozen replacement model (`freeze`): nodes are the prompt's
token embeddings, each layer's per-layer-embedding contribution (PLE) and MLP error at each position, the active
transcoder features, and the most likely next tokens; ``adjacency[t, s]`` is the direct effect of source s on
target t's input. Rows are computed as circuit-tracer computes them: one forward of ``batch_size`` copies of the
prompt with the freezes as detaches, then one backward per batch of targets, each copy seeded with one target's
direction (a feature's encoder row at the MLP's input; a logit's covector on the last stack).

Completeness, exact up to float rounding: a feature row's sum plus ``b_enc[f]`` is ``W_enc[f] · x + b_enc[f]`` at
its layer and position (x the MLP's input in the real forward); a logit row's sum is the pre-soft-cap logit
minus its mean over the vocabulary. An error node carries the MLP's real output minus its features' decoder
writes (``b_dec`` included in the error; a skip transcoder's ``W_skip · x`` is a path, not a node). A PLE node
carries the layer's whole per-layer contribution at that position with its gate frozen: the token table's row
and the embedding's projection (``per_layer_model_projection``) together, so the embedding nodes' edges count
only the path through the four streams.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psutil  # a dependency of accelerate's
import torch

from ..sae.tokens import bos_id, token_mask
from ..sae.transcoders import TranscoderSet, as_transcoder_set
from .freeze import demeaned_logits, frozen_forward, logit_covectors
from .graph import Graph, Node, partial_influence


@dataclass
class _Sources:
    """The source nodes' values in the real forward: features per layer, errors, PLE, the initial stack."""

    feature_layer: torch.Tensor      # [n_f] layer of each active feature
    feature_position: torch.Tensor   # [n_f]
    feature_index: torch.Tensor      # [n_f]
    feature_activation: torch.Tensor  # [n_f]
    feature_pre: torch.Tensor        # [n_f] W_enc·x + b_enc (the node's input, for completeness checks)
    errors: torch.Tensor             # [L, T, D]
    ples: torch.Tensor               # [L, T, D]
    stack: torch.Tensor              # [S, T, D]


def _checked(max_logits: Any, logit_probability: Any, max_feature_nodes: Any, batch_size: Any) -> None:
    if isinstance(max_logits, bool) or not isinstance(max_logits, int) or max_logits < 1:
        raise ValueError(f"max_logits must be an integer ≥ 1; got {max_logits!r}")
    if isinstance(logit_probability, bool) or not isinstance(logit_probability, (int, float)) or \
            not 0 < logit_probability <= 1:
        raise ValueError(f"logit_probability must be in (0, 1]; got {logit_probability!r}")
    for name, value in (("max_feature_nodes", max_feature_nodes), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or an integer ≥ 1; got {value!r}")


def prompt_ids(model: Any, inputs: Any) -> torch.Tensor:
    """One prompt as ids ``[1, T]``: a string (tokenized with its BOS), ids ``[T]`` / ``[1, T]`` / a list, or a
    tokenizer's output (a dict or ``BatchEncoding`` with ``input_ids`` of one row and no padding)."""
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise TypeError(f"a mapping prompt needs 'input_ids' (a tokenizer's output); got keys {sorted(inputs)}")
        mask = inputs.get("attention_mask")
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            raise ValueError("attribute takes one unpadded prompt: this attention_mask masks tokens out")
        inputs = torch.as_tensor(inputs["input_ids"])
    if isinstance(inputs, str):
        if model.tokenizer is None:
            raise ValueError("the prompt is a string: this model has no tokenizer (pass token ids [1, T])")
        ids = model.tokenizer(inputs, return_tensors="pt")["input_ids"]
    elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, int) and not isinstance(t, bool)
                                                              for t in inputs):
        ids = torch.tensor([list(inputs)])
    elif isinstance(inputs, torch.Tensor) and not inputs.is_floating_point() and inputs.dtype != torch.bool:
        ids = inputs if inputs.dim() == 2 else inputs[None]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"attribute takes one prompt: ids [T] or [1, T]; got {tuple(inputs.shape)}")
    else:
        raise TypeError(f"attribute takes one prompt: a string or token ids [1, T]; got {type(inputs).__name__}")
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    vocab = model.text_config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"token ids must be in 0..{vocab - 1}; got {int(ids.min())}..{int(ids.max())}")
    return ids.long()


def _memory_check(nodes: int, rows: int, columns: int, tokens: int, model: Any) -> None:
    """Refuse a graph that would not fit, stating what it needs: the rows as they are computed (on the model's
    device) and the adjacency (on the host)."""
    needs = {"host": nodes * nodes * 4}
    device = model.hf_model.device
    if device.type == "cuda":
        needs[str(device)] = rows * columns * 4
        free = {"host": psutil.virtual_memory().available, str(device): torch.cuda.mem_get_info(device)[0]}
    else:
        needs["host"] += rows * columns * 4
        free = {"host": psutil.virtual_memory().available}
    for where, amount in needs.items():
        if amount > free[where]:
            raise MemoryError(f"this prompt ({tokens} tokens) has {nodes:,} nodes: its graph needs "
                              f"{amount / 2**30:.1f} GiB on the {where} and {free[where] / 2**30:.1f} GiB is free; "
                              "pass max_feature_nodes (circuit-tracer's default is 7500) or a shorter prompt")


def _sources(frozen: Any, tset: TranscoderSet, ids: torch.Tensor, layers: int, bos: int | None,
             include_bos: bool) -> _Sources:
    """Row 0 of the frozen forward: the real values every source node carries."""
    errors, rows = [], []
    for layer in range(layers):
        site = frozen.mlp_leaf[layer][0].detach().float()                                # [T, D]
        if layer not in tset.transcoders:
            errors.append(site)
            continue
        transcoder = tset[layer]
        x = frozen.mlp_input[layer][0].detach().float()
        pre = transcoder.pre_activation(x.to(transcoder.W_enc.device)).float().to(site.device)
        acts = transcoder.activate(pre)
        acts[~token_mask(ids[0], bos, include_bos).to(acts.device)] = 0   # the transcoders' one rule for <bos>
        position, index = acts.nonzero(as_tuple=True)
        values = acts[position, index]
        decoded = torch.zeros_like(site).index_add_(0, position, values[:, None] * transcoder.W_dec.float()[index]
                                                    .to(site.device))
        errors.append(site - decoded)
        rows.append((torch.full_like(position, layer), position, index, values, pre[position, index]))
    columns = [torch.cat(c) if c else torch.zeros(0) for c in zip(*rows)] if rows else [torch.zeros(0)] * 5
    return _Sources(columns[0].long(), columns[1].long(), columns[2].long(), columns[3].float(), columns[4].float(),
                    torch.stack(errors), torch.stack([frozen.ple_leaf[i][0].detach().float() for i in range(layers)]),
                    frozen.stack_leaf[:, 0].detach().float())


class _Rows:
    """Computes adjacency rows: seeds a batch of targets into the frozen forward's copies and reads each source's
    gradient (the graph's backward pass)."""

    def __init__(self, frozen: Any, sources: _Sources, tset: TranscoderSet, covectors: torch.Tensor,
                 layers: int) -> None:
        self.frozen, self.sources, self.tset, self.covectors = frozen, sources, tset, covectors
        self.layers = list(range(layers))
        self.tokens = frozen.stack_leaf.shape[2]
        self.n_features = len(sources.feature_index)

    @property
    def n_columns(self) -> int:
        """Sources: features, errors [L·T], PLE [L·T], embeddings [T]."""
        return self.n_features + 2 * len(self.layers) * self.tokens + self.tokens

    def compute(self, targets: list[tuple[str, int]]) -> torch.Tensor:
        """``[len(targets), n_columns]``: each target (``("feature", j)`` or ``("logit", k)``) one row."""
        seeds: dict[int, torch.Tensor] = {}
        last = None
        frozen, src = self.frozen, self.sources
        for row, (kind, j) in enumerate(targets):
            if kind == "logit":
                if last is None:
                    last = torch.zeros_like(frozen.last_stack)
                last[:, row, -1] = self.covectors[j].to(last.dtype)
                continue
            layer, position = int(src.feature_layer[j]), int(src.feature_position[j])
            seed = seeds.setdefault(layer, torch.zeros_like(frozen.mlp_input[layer]))
            seed[row, position] = self.tset[layer].W_enc[src.feature_index[j]].to(seed)
        outputs = [frozen.mlp_input[layer] for layer in seeds] + ([frozen.last_stack] if last is not None else [])
        grads_out = list(seeds.values()) + ([last] if last is not None else [])
        grads = torch.autograd.grad(outputs, frozen.sources(self.layers), grads_out, retain_graph=True,
                                    allow_unused=True, materialize_grads=True)
        return self._edges(grads, len(targets))

    def _edges(self, grads: tuple, rows: int) -> torch.Tensor:
        src, layers = self.sources, len(self.layers)
        stack_grad, mlp_grads, ple_grads = grads[0], grads[1:1 + layers], grads[1 + layers:]
        features = torch.zeros(rows, self.n_features, device=src.errors.device)
        for layer in self.tset:
            chosen = (src.feature_layer == layer).nonzero().flatten()
            if len(chosen) == 0:
                continue
            g = mlp_grads[layer][:rows].float()                                             # [r, T, D]
            w_dec = self.tset[layer].W_dec.float().to(g.device)
            index, position = src.feature_index[chosen], src.feature_position[chosen]
            per_position = torch.einsum("rcd,cd->rc", g[:, position], w_dec[index])
            features[:, chosen] = per_position * src.feature_activation[chosen].to(g.device)
        errors = torch.stack([(mlp_grads[i][:rows].float() * src.errors[i]).sum(-1) for i in range(layers)], 1)
        ples = torch.stack([(ple_grads[i][:rows].float() * src.ples[i]).sum(-1) for i in range(layers)], 1)
        embeds = (stack_grad[:, :rows].float() * src.stack[:, None]).sum(-1).sum(0)
        return torch.cat([features, errors.flatten(1), ples.flatten(1), embeds], 1)


def _logit_targets(logits: torch.Tensor, max_logits: int, probability: float) -> tuple[list[int], list[float]]:
    """The most likely next tokens, in order, until their cumulative probability reaches ``probability``
    (at most ``max_logits``)."""
    probs = torch.softmax(logits.float(), -1)
    top = probs.topk(min(max_logits, probs.numel()))
    cumulative = top.values.cumsum(0)
    count = int((cumulative < probability).sum()) + 1
    count = min(count, len(top.values))
    return top.indices[:count].tolist(), top.values[:count].tolist()


def attribute(model: Any, inputs: Any, transcoders: Any, *, max_logits: int = 10, logit_probability: float = 0.95,
              max_feature_nodes: int | None = None, batch_size: int | None = None, include_bos: bool = False
              ) -> Graph:
    """The attribution graph of one prompt (a string or ids ``[1, T]``) through ``transcoders`` (a directory, a
    `TranscoderSet` or a mapping ``layer -> Transcoder``; layers without one keep their whole MLP output as
    error nodes). See the module doc for what the nodes and edges are.

    ``max_logits``/``logit_probability`` choose the logit nodes; ``max_feature_nodes`` keeps that many features,
    chosen as circuit-tracer chooses (by influence on the logits over the rows computed so far), else every
    active feature; ``batch_size`` targets per backward pass (default 64 on a GPU, 32 on a CPU);
    ``include_bos`` keeps features at ``<bos>`` (by default, as in training, none are read there)."""
    _checked(max_logits, logit_probability, max_feature_nodes, batch_size)
    ids = prompt_ids(model, inputs)
    tset = as_transcoder_set(transcoders, model)
    hf = model.hf_model
    if hf.training:
        raise ValueError("the model is in training mode (AltUp clamps its weights in place there): call model.eval()")
    batch = batch_size or (64 if hf.device.type == "cuda" else 32)
    layers = model.text_config.num_hidden_layers
    skips = {layer: t.skip for layer, t in tset.transcoders.items() if t.W_skip is not None}
    bos = bos_id(model.tokenizer) if model.tokenizer is not None else getattr(model.text_config, "bos_token_id", None)
    with frozen_forward(hf, tset.output_point, skips) as frozen, torch.enable_grad():
        out = hf(input_ids=ids.expand(batch, -1).to(hf.device), use_cache=False, logits_to_keep=1)
        sources = _sources(frozen, tset, ids, layers, bos, include_bos)
        tokens, probabilities = _logit_targets(out.logits[0, -1], max_logits, logit_probability)
        assert frozen.merged is not None and frozen.last_stack is not None, "the forward ran through the readout"
        merged = frozen.merged[0, -1]
        covectors = logit_covectors(hf, frozen.last_stack[:, 0, -1].detach(), merged, tokens)
        rows = _Rows(frozen, sources, tset, covectors, layers)
        kept = max_feature_nodes if max_feature_nodes is not None else rows.n_features
        nodes = min(kept, rows.n_features) + rows.n_columns - rows.n_features + len(tokens)
        _memory_check(nodes, min(kept, rows.n_features) + len(tokens), rows.n_columns + len(tokens), ids.shape[1],
                      model)
        logit_rows = torch.cat([rows.compute([("logit", k) for k in range(i, min(i + batch, len(tokens)))])
                                for i in range(0, len(tokens), batch)])
        chosen, feature_rows = _feature_rows(rows, logit_rows, torch.tensor(probabilities), kept, batch)
        logit_values = (demeaned_logits(hf, merged)[torch.tensor(tokens, device=merged.device)]).tolist()
    return _assemble(model, ids, sources, chosen, feature_rows, logit_rows, tokens, probabilities, logit_values,
                     layers)


def _feature_rows(rows: _Rows, logit_rows: torch.Tensor, probabilities: torch.Tensor, kept: int, batch: int,
                  refresh: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The features that get rows, in node order, and their rows: all of them, or ``kept`` chosen as
    circuit-tracer chooses — the unvisited features with the highest influence on the logits over the rows
    computed so far, a batch at a time, the influence refreshed every ``refresh`` batches."""
    n = rows.n_features
    if kept >= n:
        computed = [rows.compute([("feature", j) for j in range(i, min(i + batch, n))]) for i in range(0, n, batch)]
        return torch.arange(n), torch.cat(computed) if computed else logit_rows.new_zeros(0, rows.n_columns)
    logits, device = len(probabilities), logit_rows.device
    edge_rows = logit_rows.new_zeros(logits + kept, rows.n_columns + logits)   # every row it will hold, at once
    edge_rows[:logits, :rows.n_columns] = logit_rows
    row_nodes = torch.cat([torch.arange(rows.n_columns, rows.n_columns + logits), torch.zeros(kept, dtype=torch.long)])
    weights = torch.zeros(rows.n_columns + logits, device=device)
    weights[-logits:] = probabilities.to(device)
    visited = torch.zeros(n, dtype=torch.bool, device=device)
    chosen: list[int] = []
    for round_ in range(-(-kept // batch)):
        if round_ % refresh == 0:
            filled = logits + len(chosen)
            influence = partial_influence(edge_rows[:filled], weights, row_nodes[:filled].to(device))[:n]
        ranked = influence.masked_fill(visited, -1.0)
        take = ranked.topk(min(batch, kept - len(chosen))).indices.tolist()
        start = logits + len(chosen)
        edge_rows[start:start + len(take), :rows.n_columns] = rows.compute([("feature", j) for j in take])
        row_nodes[start:start + len(take)] = torch.tensor(take)
        visited[take] = True
        chosen += take
    order = torch.tensor(chosen).argsort()          # node order (layer, position, feature), as without the limit
    return torch.tensor(chosen)[order], edge_rows[logits:, :rows.n_columns][order.to(device)]


def _assemble(model: Any, ids: torch.Tensor, sources: _Sources, chosen: torch.Tensor, feature_rows: torch.Tensor,
              logit_rows: torch.Tensor, tokens: list[int], probabilities: list[float], logit_values: list[float],
              layers: int) -> Graph:
    """Nodes in circuit-tracer's order (features, errors, PLE, embeddings, logits) and the adjacency over them."""
    positions = ids.shape[1]
    n_f, n_all = len(chosen), len(sources.feature_index)
    keep_columns = torch.cat([chosen.long(), torch.arange(n_all, logit_rows.shape[1])])
    total = keep_columns.numel() + len(tokens)
    adjacency = torch.zeros(total, total)
    if n_f:
        adjacency[:n_f, :keep_columns.numel()] = feature_rows[:, keep_columns].cpu()
    adjacency[total - len(tokens):, :keep_columns.numel()] = logit_rows[:, keep_columns].cpu()
    nodes = [Node("feature", int(sources.feature_layer[j]), int(sources.feature_position[j]),
                  int(sources.feature_index[j]), float(sources.feature_activation[j]),
                  target_input=float(sources.feature_pre[j])) for j in chosen.tolist()]
    nodes += [Node("error", layer, p) for layer in range(layers) for p in range(positions)]
    nodes += [Node("ple", layer, p) for layer in range(layers) for p in range(positions)]
    nodes += [Node("embed", None, p, int(ids[0, p])) for p in range(positions)]
    nodes += [Node("logit", None, positions - 1, token, probability, target_input=value)
              for token, probability, value in zip(tokens, probabilities, logit_values)]
    text = [model.tokenizer.decode([int(t)]) for t in ids[0]] if model.tokenizer is not None else \
        [str(int(t)) for t in ids[0]]
    logit_text = [model.tokenizer.decode([t]) for t in tokens] if model.tokenizer is not None else \
        [str(t) for t in tokens]
    return Graph(nodes, adjacency, ids[0].tolist(), text, logit_text, layers)
