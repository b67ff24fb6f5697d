"""The one rule for ``<bos>`` in `g3n_probe.sae`: which token positions train, get spliced and are counted.

Every function of the package that trains, splices for a measurement, or counts (`train`,
`train_transcoders`, `evaluate`, `evaluate_replacement`, `top_activations`) takes ``include_bos: bool =
False``. Excluded (the default, as training always did): ``<bos>`` positions are not trained on, not spliced or
replaced when measuring (the value passes through unchanged there), and not counted in FVU, L0, dead latents,
losses or top activations. ``<bos>`` is an attention sink whose activations are unlike any other token's: a
coder trained without it reconstructs it badly, and counting it mostly measures that mismatch. Padding is never
counted. The mask is built here, from the token ids and the tokenizer's ``bos_token_id``, and nowhere else.
"""

from __future__ import annotations

from typing import Any

import torch


def bos_id(tokenizer: Any) -> int | None:
    """The tokenizer's ``bos_token_id`` (None without a tokenizer or a BOS token)."""
    return None if tokenizer is None else getattr(tokenizer, "bos_token_id", None)


def token_mask(ids: torch.Tensor, bos: int | None, include_bos: bool = False,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A bool mask shaped as ``ids``: True where a token counts (real, and not ``<bos>`` unless
    ``include_bos``). ``bos`` is the BOS token id (`bos_id`), or None for none."""
    keep = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool().clone()
    if not include_bos and bos is not None:
        keep &= ids != bos
    return keep


def excluded_ids(tokenizer: Any, include_bos: bool = False) -> list[int]:
    """Token ids sparsify leaves out of training (its ``exclude_tokens``): padding always, ``<bos>`` unless
    ``include_bos``."""
    ids = {getattr(tokenizer, "pad_token_id", None)}
    if not include_bos:
        ids.add(bos_id(tokenizer))
    return sorted(i for i in ids if i is not None)
