"""An attribution graph: nodes, the adjacency of direct effects, pruning by influence on the logits, paths.

Influence and pruning follow circuit-tracer (``circuit_tracer/graph.py``): rows of ``|adjacency|`` normalised to
sum to 1, a node's influence is the logit-probability-weighted sum over every path to the logits
(``w·A + w·A² + …``), nodes are kept until ``node_threshold`` of the total influence is covered, then edges until
``edge_threshold`` of the edge influence is; embeddings and logits are always kept, and a feature, error or PLE
node left without an outgoing edge (a feature also without an incoming one) is dropped, repeatedly.
"""

from __future__ import annotations

import heapq
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import files, viewer
from .nodes import KINDS, Node


def normalize(matrix: torch.Tensor) -> torch.Tensor:
    """``|matrix|`` with each row summing to 1 (rows of zeros stay zero)."""
    absolute = matrix.abs()
    return absolute / absolute.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(matrix: torch.Tensor, weights: torch.Tensor, max_iter: int = 10_000) -> torch.Tensor:
    """``w·A + w·A² + …`` for a nilpotent ``A`` (a graph's edges run forwards in the model)."""
    current = weights @ matrix
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ matrix
        total += current
    raise RuntimeError("influence did not converge: the adjacency has a cycle")


def partial_influence(rows: torch.Tensor, weights: torch.Tensor, row_nodes: torch.Tensor,
                      max_iter: int = 128) -> torch.Tensor:
    """Influence over the rows computed so far (``rows[i]`` is node ``row_nodes[i]``'s row): circuit-tracer's
    ``compute_partial_influences``, used to choose which features get rows next."""
    normalized = normalize(rows)
    product = weights.clone()
    total = torch.zeros_like(weights)
    for _ in range(max_iter):
        product = product[row_nodes] @ normalized
        if not product.any():
            return total
        total += product
    raise RuntimeError("partial influence did not converge: the rows computed so far have a cycle")


def find_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The score above which ``threshold`` of the total score lies."""
    ordered = torch.sort(scores, descending=True).values
    cumulative = torch.cumsum(ordered, 0) / ordered.sum().clamp(min=1e-30)
    index = min(int(torch.searchsorted(cumulative, torch.tensor(threshold, dtype=cumulative.dtype))), len(ordered) - 1)
    return ordered[index]


def _check_threshold(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1]; got {value!r}")


class Graph:
    """An attribution graph (see `g3n_probe.attribute`): ``nodes``, ``adjacency [N, N]`` float32 with
    ``adjacency[target, source]``, the prompt's ``tokens`` (ids) and ``token_text``, the logit tokens' text."""

    def __init__(self, nodes: list[Node], adjacency: torch.Tensor, tokens: list[int], token_text: list[str],
                 logit_text: list[str], layers: int, prompt: str | None = None, pruned: bool = False,
                 thresholds: tuple[float, float | None] | None = None) -> None:
        if adjacency.shape != (len(nodes), len(nodes)):
            raise ValueError(f"adjacency {tuple(adjacency.shape)} does not match {len(nodes)} nodes")
        self.nodes = nodes
        self.adjacency = adjacency.float()
        self.tokens = tokens
        self.token_text = token_text
        self.logit_text = logit_text
        self.layers = layers
        self.prompt = prompt if prompt is not None else "".join(token_text)
        self.pruned = pruned
        self.thresholds = thresholds   # (node, edge) thresholds of the pruning that made it, if any
        for node in self.nodes:
            if not node.label:
                node.label = self._label(node)

    def _label(self, node: Node) -> str:
        if node.kind == "embed":
            return f"Emb: {self.token_text[node.position]!r}"
        if node.kind == "logit":
            text = self.logit_text[self.logit_indices().index(self.nodes.index(node))]
            return f'Output "{text}" (p={node.activation:.3f})'
        if node.kind == "feature":
            return f"L{node.layer} #{node.index}"
        return f"{'Error' if node.kind == 'error' else 'PLE'} L{node.layer} @{node.position}"

    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        counts = {kind: sum(n.kind == kind for n in self.nodes) for kind in KINDS}
        edges = int((self.adjacency != 0).sum())
        return (f"Graph({len(self.tokens)} tokens, {counts['feature']} features, {counts['logit']} logits, "
                f"{len(self.nodes)} nodes, {edges} edges{', pruned' if self.pruned else ''})")

    def of_kind(self, kind: str) -> list[int]:
        """Indices of the nodes of one kind."""
        return [i for i, node in enumerate(self.nodes) if node.kind == kind]

    def logit_indices(self) -> list[int]:
        return self.of_kind("logit")

    def logit_weights(self) -> torch.Tensor:
        """Each logit node's probability at its index, zero elsewhere."""
        weights = torch.zeros(len(self.nodes))
        for i in self.logit_indices():
            weights[i] = self.nodes[i].activation or 0.0
        return weights

    def node_influence(self) -> torch.Tensor:
        """Each node's influence on the logits (circuit-tracer's ``compute_node_influence``)."""
        return influence(normalize(self.adjacency), self.logit_weights())

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Graph:
        """The graph kept by circuit-tracer's pruning (see the module doc), each node's ``influence`` set to its
        cumulative influence score. Returns a new graph; this one is unchanged."""
        _check_threshold("node_threshold", node_threshold)
        _check_threshold("edge_threshold", edge_threshold)
        weights = self.logit_weights()
        node_score = self.node_influence()
        always = torch.tensor([n.kind in ("embed", "logit") for n in self.nodes])
        node_mask = (node_score >= find_threshold(node_score, node_threshold)) | always
        pruned = self.adjacency.clone()
        pruned[~node_mask] = 0
        pruned[:, ~node_mask] = 0
        normalized = normalize(pruned)
        edge_score = normalized * (influence(normalized, weights) + weights)[:, None]
        edge_mask = edge_score >= find_threshold(edge_score.flatten(), edge_threshold)
        node_mask = self._drop_dangling(node_mask, edge_mask, always)
        order = torch.sort(node_score, descending=True)
        cumulative = torch.zeros_like(node_score)
        cumulative[order.indices] = torch.cumsum(order.values, 0) / order.values.sum().clamp(min=1e-30)
        keep = node_mask.nonzero().flatten()
        adjacency = (self.adjacency * edge_mask)[keep][:, keep]
        nodes = [replace(self.nodes[i], influence=float(cumulative[i])) for i in keep.tolist()]
        return Graph(nodes, adjacency, self.tokens, self.token_text, self.logit_text, self.layers, self.prompt,
                     pruned=True, thresholds=(node_threshold, edge_threshold))

    def _drop_dangling(self, node_mask: torch.Tensor, edge_mask: torch.Tensor, always: torch.Tensor) -> torch.Tensor:
        """Drop feature/error/PLE nodes with no outgoing kept edge, features also with no incoming one, until
        nothing changes."""
        features = torch.tensor([n.kind == "feature" for n in self.nodes])
        while True:
            edge_mask &= node_mask[:, None] & node_mask[None, :]
            new = node_mask & (always | edge_mask.any(0))
            new &= ~features | edge_mask.any(1)
            if torch.equal(new, node_mask):
                return node_mask
            node_mask = new

    def top_paths(self, k: int = 5, logit: int = 0) -> list[tuple[float, list[int]]]:
        """The ``k`` strongest paths from a source (embedding, error or PLE node) into logit node number
        ``logit`` (0: the most likely), each as ``(strength, [node indices from source to logit])``; a path's
        strength is the product of its edges' shares of their target's input (normalised ``|adjacency|``)."""
        logits = self.logit_indices()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer ≥ 1; got {k!r}")
        if not -len(logits) <= logit < len(logits):
            raise ValueError(f"logit {logit} is out of range: this graph has {len(logits)} logit nodes")
        shares = normalize(self.adjacency)
        sources = {i for i, n in enumerate(self.nodes) if n.kind in ("embed", "error", "ple")}
        found: list[tuple[float, list[int]]] = []
        frontier = [(-1.0, [logits[logit]])]
        while frontier and len(found) < k:
            negative, path = heapq.heappop(frontier)
            head = path[0]
            if head in sources:
                found.append((-negative, path))
                continue
            for source in shares[head].nonzero().flatten().tolist():
                heapq.heappush(frontier, (negative * float(shares[head, source]), [source] + path))
        return found

    def predict(self, edits: dict) -> torch.Tensor:
        """``[N]``: each node's predicted input change when features are set to new activations (``edits``:
        ``{(layer, position, feature): value}``, each a feature node of this graph), by direct effects alone —
        what `g3n_probe.circuits.intervene` measures exactly with ``frozen=True``."""
        where = {(n.layer, n.position, n.index): i for i, n in enumerate(self.nodes) if n.kind == "feature"}
        change = torch.zeros(len(self.nodes))
        for key, value in edits.items():
            if key not in where:
                raise KeyError(f"feature {key} (layer, position, feature) is not a node of this graph")
            source = where[key]
            activation = self.nodes[source].activation
            assert activation, "a feature node is an active feature"
            change += self.adjacency[:, source] * ((float(value) - activation) / activation)
        return change

    def save(self, directory: str | Path, slug: str, scan: str = "g3n_probe") -> Path:
        """``{slug}.json`` and ``graph-metadata.json`` in circuit-tracer's / Neuronpedia's schema (see `files`)."""
        return files.save(self, directory, slug, scan)

    @staticmethod
    def load(path: str | Path) -> Graph:
        """A graph saved by `save` (or by circuit-tracer) read back from its ``{slug}.json``."""
        return Graph(**files.load(path))

    def _repr_html_(self) -> str:
        return viewer.iframe(files.to_json(self))

    def show(self) -> Any:
        """Draw the graph in a notebook (an offline page: no network request)."""
        from IPython.display import HTML, display  # lazy: IPython is there in a notebook, not a dependency

        display(HTML(self._repr_html_()))
