"""Circuits: attribution graphs on transcoders, through AltUp's four streams.

    graph = g3n.attribute(model, "The capital of France is", "path/to/transcoders")
    pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)
    pruned.save("graphs", "capital")        # circuit-tracer's / Neuronpedia's JSON
    pruned.show()                            # drawn offline in a notebook

Map:
    freeze.py     the frozen replacement model: torch hooks that turn each freeze into a detach, leaves as sources
    attribute.py  the graph's rows: batched backward passes seeded with each target's direction
    nodes.py      the node record
    graph.py      Graph: influence, pruning (circuit-tracer's rules), top paths
    files.py      the JSON schema circuit-tracer and Neuronpedia read, in and out
    intervene.py  checking a circuit: feature edits in the frozen replacement model (exact) or as it runs
    viewer.py     the offline page (notebook, file, `g3n-probe graph serve`)
"""

from .attribute import attribute, prompt_ids
from .graph import Graph
from .intervene import Intervention, intervene
from .nodes import Node

__all__ = ["Graph", "Intervention", "Node", "attribute", "intervene", "prompt_ids"]
