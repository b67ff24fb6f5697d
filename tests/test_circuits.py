"""Attribution graphs: completeness for every feature and logit node, and single edges against an independent
frozen replay of the replacement model written from stock modules with plain hooks (tests/reference.py)."""

from __future__ import annotations

import json

import pytest
import torch

import g3n_probe as g3n
from g3n_probe.circuits import Graph, attribute, intervene
from g3n_probe.sae.transcoders import Transcoder, TranscoderSet, save_transcoders
from reference import graph_logit_input, graph_record, graph_replay

PROMPT = torch.tensor([[2, 50, 60, 7, 9, 10, 11, 12, 300, 301, 40, 41]])   # longer than the sliding window (8)


def random_transcoders(config, width=48, skip_layers=(), seed=0, layers=None):
    gen = torch.Generator().manual_seed(seed)
    d = config.hidden_size
    out = {}
    for layer in (range(config.num_hidden_layers) if layers is None else layers):
        skip = torch.randn(d, d, generator=gen) * 0.02 if layer in skip_layers else None
        out[layer] = Transcoder(torch.randn(width, d, generator=gen) * 0.3, torch.randn(width, d, generator=gen) * 0.05,
                                torch.randn(width, generator=gen) * 0.2 - 0.1, torch.randn(d, generator=gen) * 0.01,
                                W_skip=skip, layer=layer)
    return out


@pytest.fixture(scope="module")
def transcoders(probe):
    return random_transcoders(probe.text_config, skip_layers=(2,))


@pytest.fixture(scope="module")
def graph(probe, transcoders):
    return attribute(probe, PROMPT, transcoders, batch_size=16)


@pytest.fixture(scope="module")
def record(stock):
    return graph_record(stock, PROMPT)


def relative_gap(row: torch.Tensor, bias: float, expected: float) -> float:
    """|Σ edges + bias − expected| over the mass the sum is made of."""
    return abs(float(row.double().sum()) + bias - expected) / (float(row.abs().double().sum()) + abs(bias) + 1e-12)


def test_every_feature_and_logit_row_sums_to_its_input(graph, transcoders, record, stock):
    worst = 0.0
    for i, node in enumerate(graph.nodes):
        if node.kind == "feature":
            tc = transcoders[node.layer]
            x = record[("x", node.layer)][0, node.position].float()
            expected = float(tc.W_enc[node.index] @ x + tc.b_enc[node.index])
            worst = max(worst, relative_gap(graph.adjacency[i], float(tc.b_enc[node.index]), expected))
        elif node.kind == "logit":
            with torch.no_grad():
                logits = stock.lm_head(stock.model.language_model.norm(record["merged"][:, -1:]))[0, 0].float()
            expected = float(logits[node.index] - logits.mean())
            worst = max(worst, relative_gap(graph.adjacency[i], 0.0, expected))
    assert sum(n.kind == "feature" for n in graph.nodes) > 50
    print(f"worst relative completeness gap: {worst:.2e}")
    assert worst < 2e-5, worst   # fp32


def test_logit_nodes_are_the_most_likely_tokens(graph, record):
    probs = torch.softmax(record["logits"][0, -1].float(), -1)
    logits = [graph.nodes[i] for i in graph.logit_indices()]
    top = probs.topk(len(logits))
    assert [n.index for n in logits] == top.indices.tolist()
    assert [n.activation for n in logits] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert len(logits) == 10 or float(top.values.sum()) >= 0.95


def _index(graph, kind, layer=None, position=None, index=None):
    for i, n in enumerate(graph.nodes):
        if n.kind == kind and (layer is None or n.layer == layer) and (position is None or n.position == position) \
                and (index is None or n.index == index):
            return i
    raise LookupError((kind, layer, position, index))


def _target_input(stock, record, got, graph, target, transcoders):
    node = graph.nodes[target]
    if node.kind == "logit":
        return graph_logit_input(stock, record, got["last"], node.index)
    tc = transcoders[node.layer]
    return float(tc.W_enc[node.index] @ got[("x", node.layer)][0, node.position].float())


def _replayed_edge(stock, record, graph, transcoders, source, target, skips):
    """The change of the target's input when the source is removed from the frozen replay."""
    node = graph.nodes[source]
    d = record["stack"].shape[-1]
    tokens = PROMPT.shape[1]
    delta = torch.zeros(tokens, d)
    kwargs: dict = {}
    if node.kind == "feature":
        x = record[("x", node.layer)][0, node.position].float()
        assert float(transcoders[node.layer].encode(x)[node.index]) == pytest.approx(node.activation, rel=1e-5)
        delta[node.position] = -node.activation * transcoders[node.layer].W_dec[node.index]
        kwargs["mlp_delta"] = {node.layer: delta}
    elif node.kind == "error":
        tc = transcoders[node.layer]
        x = record[("x", node.layer)][0, node.position].float()
        acts = tc.encode(x)   # dense features of the real input: the formula, not the graph's own numbers
        decoded = acts @ tc.W_dec + (x @ tc.W_skip.T if tc.W_skip is not None else 0)
        delta[node.position] = -(record[("mlp_out", node.layer)][0, node.position].float() - decoded)
        kwargs["mlp_delta"] = {node.layer: delta}
    elif node.kind == "ple":
        delta[node.position] = -record[("ple", node.layer)][0, node.position].float()
        kwargs["ple_delta"] = {node.layer: delta}
    else:
        stack_delta = torch.zeros(record["stack"].shape[0], tokens, d)
        stack_delta[:, node.position] = -record["stack"][:, 0, node.position].float()
        kwargs["stack_delta"] = stack_delta
    clean = graph_replay(stock, PROMPT, record, skips=skips)
    removed = graph_replay(stock, PROMPT, record, skips=skips, **kwargs)
    return (_target_input(stock, record, clean, graph, target, transcoders)
            - _target_input(stock, record, removed, graph, target, transcoders))


def _strongest_source(graph, target, kind, before_position=None):
    row = graph.adjacency[target].abs().clone()
    for i, n in enumerate(graph.nodes):
        if n.kind != kind or (before_position is not None and n.position >= before_position):
            row[i] = 0
    assert float(row.max()) > 0, (kind, graph.nodes[target])
    return int(row.argmax())


@pytest.mark.parametrize("kind,target_kind", [("feature", "feature"), ("feature", "logit"), ("embed", "feature"),
                                              ("ple", "feature"), ("error", "feature"), ("error", "logit")])
def test_single_edges_equal_the_frozen_replay(kind, target_kind, graph, transcoders, record, stock):
    skips = {layer: tc.W_skip for layer, tc in transcoders.items() if tc.W_skip is not None}
    if target_kind == "logit":
        target = graph.logit_indices()[0]
        source = _strongest_source(graph, target, kind)
    else:   # a feature at the last layer (KV-reuse) reading an earlier position
        layer = graph.layers - 1
        target = max((i for i, n in enumerate(graph.nodes) if n.kind == "feature" and n.layer == layer),
                     key=lambda i: graph.nodes[i].position)
        source = _strongest_source(graph, target, kind, before_position=graph.nodes[target].position)
    expected = _replayed_edge(stock, record, graph, transcoders, source, target, skips)
    edge = float(graph.adjacency[target, source])
    assert edge == pytest.approx(expected, rel=1e-4, abs=1e-6 * float(graph.adjacency[target].abs().sum()))


def test_zero_width_transcoders_put_all_mass_in_error_nodes(probe, stock, record):
    d = probe.text_config.hidden_size
    empty = {layer: Transcoder(torch.zeros(0, d), torch.zeros(0, d), torch.zeros(0), torch.zeros(d), layer=layer)
             for layer in range(probe.text_config.num_hidden_layers)}
    graph = attribute(probe, PROMPT, empty)
    assert not graph.of_kind("feature")
    with torch.no_grad():
        logits = stock.lm_head(stock.model.language_model.norm(record["merged"][:, -1:]))[0, 0].float()
    for i in graph.logit_indices():
        node = graph.nodes[i]
        assert relative_gap(graph.adjacency[i], 0.0, float(logits[node.index] - logits.mean())) < 2e-5


def test_max_feature_nodes_keeps_that_many_with_the_full_graphs_rows(probe, transcoders, graph):
    small = attribute(probe, PROMPT, transcoders, max_feature_nodes=20, batch_size=8)
    features = small.of_kind("feature")
    assert len(features) == 20
    where = {(n.kind, n.layer, n.position, n.index): i for i, n in enumerate(graph.nodes)}
    index = torch.tensor([where[(n.kind, n.layer, n.position, n.index)] for n in small.nodes])
    assert [small.nodes[i].position for i in features] == sorted(small.nodes[i].position for i in features) or \
        [(small.nodes[i].layer, small.nodes[i].position) for i in features] == \
        sorted((small.nodes[i].layer, small.nodes[i].position) for i in features)
    expected = graph.adjacency[index][:, index]          # the same rows, the columns of the features kept
    assert torch.allclose(small.adjacency, expected, rtol=1e-5, atol=1e-6)


def test_attribute_leaves_the_model_as_it_was(probe, transcoders):
    hf = probe.hf_model
    before = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in hf.named_modules()}
    for p in hf.parameters():
        p.grad = torch.ones_like(p) if p.dim() == 1 else None
    grads = {name: p.grad for name, p in hf.named_parameters()}
    hf.model.language_model.norm.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in hf.named_parameters()}
    attribute(probe, PROMPT[:, :6], transcoders)
    assert flags == {name: p.requires_grad for name, p in hf.named_parameters()}
    hf.model.language_model.norm.weight.requires_grad_(True)
    after = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in hf.named_modules()}
    assert {k: (list(a), list(b)) for k, (a, b) in before.items()} == {k: (list(a), list(b)) for k, (a, b) in after.items()}
    assert all(p.grad is grads[name] for name, p in hf.named_parameters())
    assert torch.is_grad_enabled()
    for p in hf.parameters():
        p.grad = None


def test_prune_keeps_embeddings_and_logits_and_sets_influence(graph):
    pruned = graph.prune(0.8, 0.98)
    assert len(pruned.of_kind("embed")) == PROMPT.shape[1]
    assert len(pruned.of_kind("logit")) == len(graph.logit_indices())
    assert 0 < len(pruned.of_kind("feature")) < len(graph.of_kind("feature"))
    assert all(n.influence is not None for n in pruned.nodes)
    paths = pruned.top_paths(3)
    assert paths and all(pruned.nodes[p[-1]].kind == "logit" for _, p in paths)
    assert [s for s, _ in paths] == sorted((s for s, _ in paths), reverse=True)


def test_saved_graph_has_circuit_tracers_schema_and_loads_back(graph, tmp_path):
    pruned = graph.prune()
    path = pruned.save(tmp_path, "capital")
    data = json.loads(path.read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert {"slug", "scan", "prompt_tokens", "prompt"} <= set(data["metadata"])
    node_keys = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp", "influence",
                 "activation", "token_prob", "is_target_logit", "run_idx", "reverse_ctx_idx"}
    assert all(node_keys <= set(n) for n in data["nodes"])
    errors = [n for n in data["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert all(n["node_id"] == f"{n['layer']}_-1_{n['ctx_idx']}" for n in errors)
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert all("(p=" in n["clerp"] for n in logits) and logits[0]["is_target_logit"]
    ids = {n["node_id"] for n in data["nodes"]}
    assert len(ids) == len(data["nodes"]) and all(l["source"] in ids and l["target"] in ids for l in data["links"])
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["capital"]
    assert data["metadata"]["node_threshold"] == 0.8      # circuit-tracer's page shows its slider for a number
    loaded = Graph.load(path)
    assert loaded.thresholds == (0.8, 0.98)
    assert torch.equal(loaded.adjacency, pruned.adjacency)
    assert [(n.kind, n.layer, n.position, n.index) for n in loaded.nodes] == \
        [(n.kind, n.layer, n.position, n.index) for n in pruned.nodes]


def test_transcoders_from_a_directory(probe, transcoders, tmp_path):
    with pytest.warns(UserWarning, match="circuit-tracer"):   # layer 2 (a skip transcoder) left out: a gap
        save_transcoders(tmp_path / "tc", {layer: t for layer, t in transcoders.items() if t.W_skip is None})
    graph = attribute(probe, PROMPT[:, :5], tmp_path / "tc")
    assert graph.of_kind("feature")


@pytest.mark.parametrize("kwargs,message", [
    ({"max_feature_nodes": 0}, "max_feature_nodes"), ({"logit_probability": 0}, "logit_probability"),
    ({"logit_probability": 1.5}, "logit_probability"), ({"max_logits": 0}, "max_logits"),
    ({"batch_size": -1}, "batch_size")])
def test_bad_arguments_are_named(probe, transcoders, kwargs, message):
    with pytest.raises(ValueError, match=message):
        attribute(probe, PROMPT, transcoders, **kwargs)


def test_bad_inputs_fail_before_any_forward(probe, transcoders):
    d = probe.text_config.hidden_size
    with pytest.raises(ValueError, match="one prompt"):
        attribute(probe, PROMPT.expand(2, -1), transcoders)
    with pytest.raises(ValueError, match="hidden size"):
        attribute(probe, PROMPT, {0: Transcoder(torch.zeros(4, d + 1), torch.zeros(4, d + 1), torch.zeros(4),
                                                torch.zeros(d + 1))})
    with pytest.raises(ValueError, match="layers 0"):
        attribute(probe, PROMPT, {99: Transcoder(*(getattr(transcoders[0], k) for k in ("W_enc", "W_dec", "b_enc",
                                                                                       "b_dec")))})
    with pytest.raises(ValueError, match="made for layer 2"):
        attribute(probe, PROMPT, {3: transcoders[2]})
    with pytest.raises(ValueError, match="node_threshold"):
        attribute(probe, PROMPT[:, :4], transcoders).prune(node_threshold=0)
    assert g3n.circuits.attribute is attribute


def test_a_frozen_intervention_moves_every_target_by_the_graphs_prediction(probe, graph, transcoders):
    features = graph.of_kind("feature")
    source = max(features[:len(features) // 2], key=lambda i: abs(float(graph.adjacency[:, i].sum())))
    node = graph.nodes[source]
    edit = {(node.layer, node.position, node.index): 0.0}
    predicted = graph.predict(edit)
    tokens = [graph.nodes[i].index for i in graph.logit_indices()]
    check = intervene(probe, PROMPT, transcoders, edit, frozen=True, tokens=tokens)
    measured = check.logit_change
    expected = torch.stack([predicted[i] for i in graph.logit_indices()])
    scale = float(expected.abs().max()) + 1e-6
    assert torch.allclose(measured, expected, atol=1e-4 * scale), (measured, expected)
    worst = 0.0
    for i in features:
        n = graph.nodes[i]
        if n.layer > node.layer:
            worst = max(worst, abs(float(check.feature_change(n.layer)[n.position, n.index]) - float(predicted[i])))
    assert worst < 1e-4 * (float(predicted.abs().max()) + 1e-6)
    free = intervene(probe, PROMPT, transcoders, edit, frozen=False, tokens=tokens)
    assert not torch.equal(free.logit_change, torch.zeros_like(free.logit_change))


def test_a_tokenizers_output_is_the_prompt_it_holds(probe, transcoders):
    ids = PROMPT[:, :6]
    by_ids = attribute(probe, ids, transcoders)
    by_dict = attribute(probe, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, transcoders)
    assert torch.equal(by_ids.adjacency, by_dict.adjacency)
    with pytest.raises(ValueError, match="unpadded"):
        attribute(probe, {"input_ids": ids, "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1]])}, transcoders)


def test_a_graph_too_large_to_hold_is_refused_with_what_it_needs(probe, transcoders, monkeypatch):
    import psutil

    class Tiny:
        available = 1024

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    with pytest.raises(MemoryError, match="GiB"):
        attribute(probe, PROMPT, transcoders)


def test_what_a_graph_and_an_intervention_hand_out_carries_no_autograd_graph(probe, graph, transcoders):
    assert not graph.adjacency.requires_grad
    node = graph.nodes[graph.of_kind("feature")[0]]
    check = intervene(probe, PROMPT, transcoders, {(node.layer, node.position, node.index): 0.0})
    assert not check.logit_change.requires_grad and not check.feature_change(node.layer).requires_grad


@pytest.mark.parametrize("site,activation", [("mlp.hook_out", "relu"), ("hook_mlp_out", "jumprelu"),
                                             ("hook_mlp_out", "topk")])
def test_other_sites_and_activations_are_complete(probe, record, site, activation):
    base = random_transcoders(probe.text_config, seed=1)
    gen = torch.Generator().manual_seed(2)
    made = {}
    for layer, tc in base.items():
        extra = {"threshold": torch.rand(tc.width, generator=gen) * 0.2} if activation == "jumprelu" else \
            {"k": 5, "topk_relu": False} if activation == "topk" else {}
        shift = 4.0 if activation == "topk" else 0.0   # fewer than k positive: the negative top-k show
        made[layer] = Transcoder(tc.W_enc, tc.W_dec, tc.b_enc - shift, tc.b_dec, layer=layer, **extra)
    graph = attribute(probe, PROMPT, TranscoderSet(made, output_hook=site))
    features = graph.of_kind("feature")
    assert features
    if activation == "topk":
        assert any(graph.nodes[i].activation < 0 for i in features)   # circuit-tracer's TopK keeps negatives
    worst = 0.0
    for i in features:
        node = graph.nodes[i]
        tc = made[node.layer]
        x = record[("x", node.layer)][0, node.position].float()
        assert float(tc.encode(x)[node.index]) == pytest.approx(node.activation, rel=1e-4, abs=1e-5)  # batch 1 vs B
        expected = float(tc.W_enc[node.index] @ x + tc.b_enc[node.index])
        worst = max(worst, relative_gap(graph.adjacency[i], float(tc.b_enc[node.index]), expected))
    assert worst < 2e-5, worst


def test_features_at_bos_follow_the_transcoders_rule(probe, graph, transcoders):
    assert PROMPT[0, 0] == probe.tokenizer.bos_token_id
    assert all(graph.nodes[i].position != 0 for i in graph.of_kind("feature"))      # excluded by default
    with_bos = attribute(probe, PROMPT[:, :5], transcoders, include_bos=True)
    assert any(with_bos.nodes[i].position == 0 for i in with_bos.of_kind("feature"))
