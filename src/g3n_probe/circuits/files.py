"""Graph files in the schema circuit-tracer's server and Neuronpedia read (``circuit_tracer/frontend/
graph_models.py``, ``utils/create_graph_files.py``): ``{slug}.json`` with ``metadata``, ``qParams``, ``nodes`` and
``links``, and ``graph-metadata.json`` listing every graph of a directory (a graph with the same slug replaced).

Node ids: a feature ``{layer}_{feature}_{pos}`` (``feature`` the Cantor pairing of layer and feature id,
``feature_type`` ``"cross layer transcoder"``, as circuit-tracer labels per-layer transcoders too), an error
``{layer}_-1_{pos}`` (``"mlp reconstruction error"``: the form the project's contract names as upstream's; the
circuit-tracer snapshot read here, 4bb8c0e, still writes ``0_{layer}_{pos}``, and `load` reads both — its viewer
keys nodes by ``node_id`` and ``feature_type``, so either draws), an embedding ``E_{token}_{pos}``, a logit
``{L+1}_{token}_{pos}`` whose ``clerp`` carries ``(p=…)``. Gemma 3n's PLE nodes have no upstream kind:
``{layer}_-2_{pos}`` with ``feature_type`` ``"per-layer embedding"`` (the viewers draw an unknown kind as a plain
node). Links are ``{source, target, weight}`` for every nonzero edge.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from .nodes import Node

FEATURE_TYPES = {"feature": "cross layer transcoder", "error": "mlp reconstruction error", "embed": "embedding",
                 "logit": "logit", "ple": "per-layer embedding"}
KIND_OF = {value: key for key, value in FEATURE_TYPES.items()}


def cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def node_id(node: Node, layers: int) -> str:
    if node.kind == "feature":
        return f"{node.layer}_{node.index}_{node.position}"
    if node.kind == "error":
        return f"{node.layer}_-1_{node.position}"
    if node.kind == "ple":
        return f"{node.layer}_-2_{node.position}"
    if node.kind == "embed":
        return f"E_{node.index}_{node.position}"
    return f"{layers + 1}_{node.index}_{node.position}"


def _node_json(node: Node, layers: int, first_logit: bool) -> dict[str, Any]:
    ident = node_id(node, layers)
    out: dict[str, Any] = {
        "node_id": ident, "feature": None, "layer": None, "ctx_idx": node.position,
        "feature_type": FEATURE_TYPES[node.kind], "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
        "reverse_ctx_idx": 0, "jsNodeId": ident, "clerp": node.label, "influence": node.influence,
        "activation": node.activation if node.kind == "feature" else None,
    }
    if node.kind == "feature":
        assert node.layer is not None and node.index is not None, "a feature node has a layer and an index"
        out.update(feature=cantor(node.layer, node.index), layer=str(node.layer),
                   jsNodeId=f"{node.layer}_{node.index}-0")
    elif node.kind in ("error", "ple"):
        out.update(feature=-1 if node.kind == "error" else -2, layer=str(node.layer))
    elif node.kind == "embed":
        out.update(feature=node.position, layer="E", jsNodeId=f"E_{node.index}-{node.position}")
    else:
        out.update(feature=node.index, layer=str(layers + 1), token_prob=node.activation,
                   is_target_logit=first_logit, jsNodeId=f"L_{node.index}-{node.position}")
    out["g3n"] = {"kind": node.kind, "layer": node.layer, "index": node.index, "activation": node.activation,
                  "target_input": node.target_input}
    return out


def to_json(graph: Any, slug: str = "graph", scan: str = "g3n_probe") -> dict[str, Any]:
    """The graph as circuit-tracer's ``Model`` (metadata, qParams, nodes, links)."""
    logits = graph.logit_indices()
    nodes = [_node_json(n, graph.layers, i == (logits[0] if logits else -1)) for i, n in enumerate(graph.nodes)]
    targets, sources = graph.adjacency.nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources].tolist()
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": w}
             for t, s, w in zip(targets.tolist(), sources.tolist(), weights)]
    metadata = {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": list(graph.token_text),
                "prompt": graph.prompt, "schema_version": 1,
                # circuit-tracer's page offers its pruning slider only when this is a number
                "node_threshold": graph.thresholds[0] if graph.thresholds else None,
                "g3n": {"tokens": list(graph.tokens), "logit_text": list(graph.logit_text), "layers": graph.layers,
                        "pruned": graph.pruned, "thresholds": list(graph.thresholds) if graph.thresholds else None}}
    return {"metadata": metadata, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both",
                                              "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}


def save(graph: Any, directory: str | Path, slug: str, scan: str = "g3n_probe") -> Path:
    """Write ``{slug}.json`` and add it to ``graph-metadata.json`` (under a lock: ranks may share a directory)."""
    if not isinstance(slug, str) or not slug or os.sep in slug or slug.startswith("."):
        raise ValueError(f"slug must be a plain file name; got {slug!r}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    data = to_json(graph, slug, scan)
    path = root / f"{slug}.json"
    path.write_text(json.dumps(data))
    with FileLock(str(root / ".graph-metadata.lock")):
        index_path = root / "graph-metadata.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else {"graphs": []}
        index["graphs"] = [g for g in index["graphs"] if g.get("slug") != slug] + [data["metadata"]]
        index_path.write_text(json.dumps(index, indent=2))
    return path


def _node_from_json(entry: dict, layers: int) -> Node:
    own = entry.get("g3n")
    if own is not None:
        return Node(own["kind"], own["layer"], entry["ctx_idx"], own["index"], own["activation"],
                    entry.get("influence"), own.get("target_input"), entry.get("clerp", ""))
    kind = KIND_OF.get(entry["feature_type"], "feature")
    parts = entry["node_id"].split("_")
    layer = None if kind in ("embed", "logit") else int(entry["layer"])
    index = int(parts[1]) if kind in ("feature", "embed", "logit") else None
    activation = entry.get("token_prob") if kind == "logit" else entry.get("activation")
    return Node(kind, layer, entry["ctx_idx"], index, activation, entry.get("influence"), None, entry.get("clerp", ""))


def load(path: str | Path) -> dict[str, Any]:
    """A ``{slug}.json`` (ours or circuit-tracer's) as the arguments of ``Graph``."""
    data = json.loads(Path(path).read_text())
    for key in ("metadata", "nodes", "links"):
        if key not in data:
            raise ValueError(f"{path}: key {key!r} is missing: not an attribution graph file")
    meta = data["metadata"]
    own = meta.get("g3n", {})
    layers = own.get("layers") or max((int(n["layer"]) for n in data["nodes"] if n["layer"] != "E"), default=1) - 1
    nodes = [_node_from_json(entry, layers) for entry in data["nodes"]]
    index = {entry["node_id"]: i for i, entry in enumerate(data["nodes"])}
    adjacency = torch.zeros(len(nodes), len(nodes))
    for link in data["links"]:
        adjacency[index[link["target"]], index[link["source"]]] = float(link["weight"])
    tokens = own.get("tokens") or [n.index for n in nodes if n.kind == "embed"]
    logit_text = own.get("logit_text") or [n.label for n in nodes if n.kind == "logit"]
    return {"nodes": nodes, "adjacency": adjacency, "tokens": tokens, "token_text": meta["prompt_tokens"],
            "logit_text": logit_text, "layers": layers, "prompt": meta.get("prompt"), "pruned": own.get("pruned", True),
            "thresholds": tuple(own["thresholds"]) if own.get("thresholds") else
            ((meta["node_threshold"], None) if meta.get("node_threshold") is not None else None)}
