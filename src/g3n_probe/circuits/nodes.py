"""The nodes of an attribution graph."""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("embed", "ple", "feature", "error", "logit")


@dataclass
class Node:
    """One node. ``layer`` is None for embeddings and logits; ``index`` the feature id, or the token id of an
    embedding or logit node (None for error and PLE nodes); ``activation`` a feature's activation or a logit's
    probability; ``influence`` circuit-tracer's cumulative influence score, set by pruning; ``target_input`` the
    node's input in the real forward (a feature's ``W_enc·x + b_enc``, a logit's demeaned pre-soft-cap logit)."""

    kind: str
    layer: int | None
    position: int
    index: int | None = None
    activation: float | None = None
    influence: float | None = None
    target_input: float | None = field(default=None, repr=False)
    label: str = field(default="", repr=False)
