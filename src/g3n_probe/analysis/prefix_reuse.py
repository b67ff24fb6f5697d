"""The target's own forward, reused by a sweep's chunks along both axes the patches leave untouched.

A row of a sweep is the target prompt with one value replaced at layer l, positions ≥ p. Everything a
layer computes at a position is per token (embeddings, per-layer inputs, AltUp predict/correct and their
routers, LAuReL, the norms, the MLP and its top-k sparsity, the PLE gate), except attention, which reads
earlier positions only (causal). So before layer l, and at every layer before position p, the row is the
target itself. `TargetRun` keeps what one forward of the K target prompts produced for that reuse:

- the outputs of the layers a chunk skips (`patching.prefix_needs`): the layers before its first patch;
- every layer's keys and values at all T positions (full and sliding attention, KV 'store' layers; the
  KV-reuse layers have none of their own), so a chunk runs positions ≥ p only, with the keys and values
  of positions < p given as a KV cache, as a decoding step of `generate` sees its past. A store layer
  that runs puts the cache's keys followed by its new ones into the forward's ``shared_kv_states``, which
  is where the KV-reuse layers read theirs, so they see all T positions too; a store layer before the
  chunk's first patch is skipped like any other, and puts the target's keys and values there instead;
- the logits, whose positions < p are the target's own in every row.

The cache keeps every key of a sliding-window layer (`_compat.kv_cache`) and the sliding-window mask,
built at the absolute positions, does the windowing: attention patterns keep their T keys.

When only the last n logits are kept (``logits_to_keep`` = n), one more fact saves work: the trailing
KV-reuse layers (Gemma 3n's last ``num_kv_shared_layers``) make no keys or values, so there a position
reaches no other. A chunk from an earlier layer runs them at its last n positions only (`tail`),
and a patch there before position T − n changes no kept logit: its entry is the target's own metric,
with no forward run for it (`beyond_reach`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .._compat import (
    CACHE_KEYWORD,
    attention_implementation,
    cached_kv,
    keep_last_positions,
    kv_cache,
    module_of,
    share_kv_before,
)
from ..checkpoint import module_tree
from ..points import BY_NAME

#: Attention implementations whose cached (queries < keys) path is tested against the full forward.
REUSE_ATTENTION = ("sdpa", "eager")
REUSE_MODES = ("tokens", "layers")
#: A chunk runs at least this many positions (the last ones when its first patch is later), and a product
#: has at least this many rows: MKL multiplies fewer than 4 rows with another kernel, which rounds
#: differently (measured on torch 2.13, MKL 2024.2: an [1, t, 512] linear differs from the rows of the full
#: one by ~1e-6 relative for t < 4 and equals them for t ≥ 4); the extra positions are the target's own.
MIN_SUFFIX = 4


def chunk_start(first: int, tokens: int) -> int:
    """The first position a chunk runs, its first patched position ``first`` (at most T − `MIN_SUFFIX`)."""
    return max(0, min(first, tokens - MIN_SUFFIX))


@dataclass
class TargetRun:
    """One forward of the K target prompts ([K, T] ids): layer outputs, logits and (``kv``) keys and values."""

    outputs: dict[int, torch.Tensor]      # layer -> its output stack [S, K, T, D]
    logits: torch.Tensor                  # [K, T, V], or [K, n, V]: the last n positions (``keep`` = n)
    keep: int                             # the run's logits_to_keep: 0 (all) or n
    tokens: int                           # T
    kv: list[tuple[Any, Any]] | None      # per cache layer (keys, values) [K, Hkv, T, Dh]; None: not kept

    def suffix(self, target_ids: torch.Tensor, pair_index: torch.Tensor, start: int) -> tuple[torch.Tensor, dict]:
        """Token ids ``[rows, T − start]`` of the rows' pairs and the trace's keywords: a KV cache of each
        row's pair at positions < start, the mask over all T positions, positions start … T − 1."""
        assert self.kv is not None, "a suffix needs the target's keys and values"
        rows = len(pair_index)
        kv = []
        for keys, values in self.kv:
            if keys is None:
                kv.append((None, None))
                continue
            index = pair_index.to(keys.device)
            kv.append((keys[:, :, :start].index_select(0, index), values[:, :, :start].index_select(0, index)))
        kwargs = {CACHE_KEYWORD: kv_cache(kv), "attention_mask": torch.ones(rows, self.tokens, dtype=torch.long),
                  "position_ids": torch.arange(start, self.tokens).expand(rows, -1)}
        return target_ids[pair_index, start:], kwargs

    def share_skipped_stores(self, model: Any, skipped: list[int], pair_index: torch.Tensor) -> list[Any]:
        """For each skipped KV 'store' layer, a hook that hands the KV-reuse layers the target's keys and
        values at all T positions for each row's pair (what the layer would have computed: no row differs from
        the target before its first patched layer). Remove the returned handles after the forward."""
        assert self.kv is not None, "sharing a store layer needs the target's keys and values"
        config = model.text_config
        handles = []
        for layer in skipped:
            if not module_tree.is_kv_store(config, layer):
                continue
            keys, values = self.kv[layer]
            index = pair_index.to(keys.device)
            handles.append(share_kv_before(module_of(model.layers[layer]), config.layer_types[layer],
                                           keys.index_select(0, index), values.index_select(0, index)))
        return handles

    def keep_tail(self, model: Any, cut: tuple[int, int] | None) -> list[Any]:
        """Hooks making layers R … L − 1 run their last m positions (``cut`` = (R, m), from `tail`)."""
        if cut is None:
            return []
        first, keep = cut
        return [keep_last_positions(module_of(model.layers[layer]), keep, self.tokens, first=layer == first)
                for layer in range(first, model.text_config.num_hidden_layers)]

    def suffix_keep(self, start: int) -> int:
        """logits_to_keep for a chunk starting at ``start``: all its positions, or the last n it has."""
        return 0 if self.keep == 0 else min(self.keep, self.tokens - start)

    def full_logits(self, suffix: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
        """The logits the metric is given: the target's own at the positions before the chunk's, then the
        chunk's (``suffix``, [rows, t, V]); as many positions as a forward of the whole prompt would keep."""
        shown = self.tokens if self.keep == 0 else self.keep
        missing = shown - suffix.shape[1]
        if missing <= 0:
            return suffix
        before = self.logits[:, :missing].index_select(0, pair_index.to(self.logits.device))
        return torch.cat([before.to(suffix.device, suffix.dtype), suffix], dim=1)


def token_reuse_unavailable(model: Any, logits_to_keep: Any) -> str | None:
    """Why a sweep cannot reuse the target's keys and values (it then recomputes every position), or None."""
    implementation = attention_implementation(model.text_config)
    if implementation not in REUSE_ATTENTION:
        return (f"attn_implementation={implementation!r}: the cached path (fewer queries than keys) is tested for "
                f"{' and '.join(REUSE_ATTENTION)} only")
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int):
        return "logits_to_keep is a list of positions: a chunk's positions would need remapping"
    return None


def trailing_reuse(model: Any) -> int:
    """The first layer of the trailing run of KV-reuse layers (L when there is none): from there on no layer
    makes keys or values, so a position's values there reach no other position."""
    modes = model.text_config.kv_sharing_modes
    first = len(modes)
    while first > 0 and modes[first - 1] == "reuse":
        first -= 1
    return first


def kept_logits(logits_to_keep: Any) -> int:
    """n when only the last n positions' logits are kept (``logits_to_keep`` = n > 0), else 0."""
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep <= 0:
        return 0
    return logits_to_keep


def tail(model: Any, first_layer: int, start: int, tokens: int, logits_to_keep: Any,
         rows: int) -> tuple[int, int] | None:
    """(R, m): a chunk of ``rows`` rows whose first patch is at ``first_layer`` and which runs positions
    ``start`` … T − 1 needs layers R … L − 1 at its last m positions only, when only the last n logits are
    kept: R is the first of the trailing KV-reuse layers (`trailing_reuse`), m = n (at least `MIN_SUFFIX`
    when rows × n is less). None where that saves nothing (all logits kept, no such layers, a first patch
    at or after R, or no more than m positions run)."""
    kept, first_reuse = kept_logits(logits_to_keep), trailing_reuse(model)
    keep = kept if kept * rows >= MIN_SUFFIX else max(kept, MIN_SUFFIX)
    if not kept or first_reuse >= model.text_config.num_hidden_layers or first_layer >= first_reuse \
            or tokens - start <= keep:
        return None
    return first_reuse, keep


def beyond_reach(model: Any, variants: Sequence[Sequence[Any]], tokens: int, logits_to_keep: Any) -> list[int]:
    """The variants no kept logit can see (indices): with the logits of the last n positions only
    (``logits_to_keep`` = n > 0), a patch at a layer in the trailing run of KV-reuse layers, at positions
    before T − n. Those layers take their keys and values from the store layers before them, so a position
    there reaches no other position: the kept logits are the unpatched target's (a stock forward of the
    patched prompt computes them from the same values with the same kernels, so bit for bit), and the entry
    is the target's own metric."""
    kept, first = kept_logits(logits_to_keep), trailing_reuse(model)
    if not kept:
        return []
    found = []
    for index, variant in enumerate(variants):
        position = variant[2]
        last = max(position) if isinstance(position, (tuple, list)) else position
        if variant[0] >= first and last < tokens - kept:
            found.append(index)
    return found


def checked_reuse(reuse: Any) -> str:
    if not isinstance(reuse, str) or reuse not in REUSE_MODES:
        raise ValueError(f"reuse={reuse!r}: choose 'tokens' (the target's layers before a chunk's first patch and its "
                         "keys and values before the chunk's first position) or 'layers' (its layers only)")
    return reuse


def run_target(model: Any, target_ids: torch.Tensor, needed: list[int], logits_to_keep: Any,
               keep_kv: bool) -> TargetRun:
    """One forward of the target prompts, saving the ``needed`` layers' outputs, the logits and (``keep_kv``)
    every layer's keys and values. The cache changes nothing in this forward: its layers start empty, so
    each attention sees exactly the keys it computed (one concatenation onto an empty tensor)."""
    cache = kv_cache() if keep_kv else None
    kwargs = {CACHE_KEYWORD: cache} if keep_kv else {}
    outputs: dict[int, torch.Tensor] = {}
    with torch.no_grad(), model.trace(target_ids, logits_to_keep=logits_to_keep, **kwargs):
        for layer in needed:
            outputs[layer] = model.layers[layer].output.save()
        logits = model.logits.output.save()
    keep = logits_to_keep if isinstance(logits_to_keep, int) else 0
    return TargetRun(outputs, logits, keep, target_ids.shape[1], cached_kv(cache) if keep_kv else None)


def run_source(model: Any, source_ids: torch.Tensor, names: Sequence[str], layers: Sequence[int],
               logits_to_keep: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward of the K source prompts: the values of ``names`` (in execution order) at ``layers``, keyed
    ``"layers.<i>.<name>"`` and kept on the host (a chunk sends only the rows it writes), and its logits."""
    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad(), model.trace(source_ids, logits_to_keep=logits_to_keep):
        for layer in sorted(layers):
            for name in names:
                point = BY_NAME[name]
                saved[point.qualified(layer)] = point.read(model, layer).detach().cpu().save()
        logits = model.logits.output.save()
    return dict(saved), logits
