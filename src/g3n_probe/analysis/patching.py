"""Activation patching sweeps with many patches per forward pass.

A sweep asks, for every (point, layer, position): if this one value came from the other prompt, how
much of the metric's difference does it restore? Answering it one patch per forward costs one
forward per cell. `sweep` puts the patched variants on the batch axis instead: a chunk of N
rows is one forward over N copies of the target prompt, row r carrying patch r. Stream stacks
are patched on their own batch axis (dimension 1), attention patterns on their query position.

    result = g3n.patching.sweep(model, clean_ids, corrupted_ids, metric=lambda logits: logits[:, -1, a] - logits[:, -1, b],
                                points=["resid_mid", "ple_out"], layers=range(6))
    result.plot()                       # a heatmap per point: layer × position

Finer columns: ``heads=`` splits ``attn_z`` per head (a column per (position, head)); ``streams=`` patches
some streams of the stream stacks (the layer's own ``input``/``output``, ``altup_predict``,
``altup_correct``). Many pairs: ``clean`` and ``corrupted`` as [K, T] token ids (or K texts of one
length); an entry is the metric's mean over the K pairs, each pair patched with its own source values,
and a forward's rows are variants × pairs (`patching_plan`).

``direction="denoise"`` (default) runs the corrupted prompt and writes clean values into it;
``"noise"`` runs the clean prompt and writes corrupted values. Every row is the unpatched target before
its patched layer and before its first patched position (everything but attention is per token, and
attention is causal), so a chunk reuses one forward of the target along both axes (`patching_cache`):
the layers before the chunk's first patch are skipped and give the target's own output, and the chunk
runs only the positions from its first patched one on, the target's keys and values before it given as
a KV cache (``reuse="tokens"``, the default; ``reuse="layers"`` reuses layers only). Rows are ordered
so that chunks are tiles of the layer × position grid (`patching_plan.reuse_order`).

Exactness: with ``reuse="layers"`` each entry equals what plain torch hooks on a stock model give for
the same batch with the same layers replaced (``torch.equal``); with ``reuse="tokens"`` each entry agrees
with one stock forward of the whole prompt per patch, with plain hooks, to within 1e-5 of the metric's
span (the cached attention has other kernel shapes, so it rounds differently; tested for every point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, cast

import torch

from .._compat import base_skip
from ..checkpoint import module_tree
from ..points import BY_NAME, Point, execution_rank
from .patching_plan import (
    Plan,
    Variant,
    cells,
    chunk_work,
    columns,
    first_token,
    label,
    normalized_variant,
    part_columns,
    prepare,
    reuse_order,
    variants,
)
from .prefix_reuse import (
    TargetRun,
    beyond_reach,
    checked_reuse,
    chunk_start,
    run_source,
    run_target,
    tail,
    token_reuse_unavailable,
)

if TYPE_CHECKING:
    from ..probe import Gemma3nProbe

Metric = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PatchingResult:
    """Metric values of a sweep (NaN where nothing was patched).

    ``values[point]`` is ``[layers, positions]``, or ``[layers, positions, parts]`` for a point split into a
    list of columns by ``heads=`` (``attn_z``: ``[layers, positions, heads]``) or ``streams=`` (the stream
    stacks: ``[layers, positions, streams]``); ``parts[point]`` lists that axis's heads or streams (an int,
    or a tuple patched together). An int ``heads``/``streams`` patches only that head or stream and keeps
    ``[layers, positions]``. Over K prompt pairs every entry is the mean over the pairs, and
    ``per_pair[point]`` holds the same with a last axis K.

    ``baseline`` is the metric of the unpatched run, ``source`` the metric of the prompt the values came
    from (means over the pairs; ``baselines``/``sources`` per pair, [K]); `normalized` maps baseline to 0
    and source to 1. ``reuse`` says what the chunks reused of the target's forward ("tokens" or "layers", see
    `sweep`) and ``work`` the layer × position cells they computed, as a fraction of one whole forward per
    patch (1 for one forward per patch).
    """

    points: list[str]
    layers: list[int]
    positions: list[int | tuple[int, ...]]  # a column is a position or a group patched together
    values: dict[str, torch.Tensor]
    baseline: float
    source: float
    direction: str
    forwards: int = 0
    tokens: list[str] = field(default_factory=list)   # labels of the positions, from the first pair
    parts: dict[str, list] = field(default_factory=dict)
    heads: Any = None       # the heads= and streams= arguments as given
    streams: Any = None
    per_pair: dict[str, torch.Tensor] = field(default_factory=dict)
    baselines: torch.Tensor | None = None
    sources: torch.Tensor | None = None
    reuse: str = "layers"   # what the chunks reused of the target's forward: "tokens" or "layers"
    work: float = math.nan  # layer-positions computed, as a fraction of one whole forward per patch

    @property
    def pairs(self) -> int:
        """K, the number of prompt pairs each entry averages."""
        return 1 if self.baselines is None else len(self.baselines)

    def normalized(self) -> dict[str, torch.Tensor]:
        span = self.source - self.baseline
        return {name: (v - self.baseline) / span if span else v * math.nan for name, v in self.values.items()}

    def column_labels(self, name: str) -> list[str]:
        """The labels of ``name``'s heatmap columns: its positions, or (position, part) flattened position by
        position (``"tok h1"``) where the point has a third axis."""
        positions = self.tokens or [str(p) for p in self.positions]
        if name not in self.parts:
            return positions
        prefix = "s" if name in _STACK_NAMES else "h"
        return [f"{p} {label(part, prefix)}" for p in positions for part in self.parts[name]]

    def plot(self, normalized: bool = True, ax: Any = None) -> Any:
        """One heatmap per point, layers × positions (× heads or streams where a point has that axis, its
        columns flattened position by position: every head of position 0, then of position 1, …); returns the
        matplotlib figure."""
        import matplotlib.pyplot as plt  # lazy: a heavy import only the plot needs

        data = self.normalized() if normalized else self.values
        widest = max([len(self.column_labels(name)) for name in self.points] or [1])
        axes: Any
        if ax is None:
            fig, axes = plt.subplots(1, len(self.points), squeeze=False,
                                     figsize=(3 + len(self.points) * max(3, 0.25 * widest), 3 + 0.25 * len(self.layers)))
            axes = axes[0]
        else:
            fig, axes = ax.figure, [ax]
        for axis, name in zip(axes, self.points):
            labels = self.column_labels(name)
            image = axis.imshow(data[name].float().reshape(len(self.layers), len(labels)).numpy(), aspect="auto",
                                cmap="RdBu_r", vmin=-1 if normalized else None, vmax=1 if normalized else None)
            axis.set_title(name)
            axis.set_ylabel("layer")
            axis.set_yticks(range(len(self.layers)), [str(layer) for layer in self.layers])
            axis.set_xticks(range(len(labels)), labels, rotation=90)
            fig.colorbar(image, ax=axis)
        pairs = f", mean over {self.pairs} pairs" if self.pairs > 1 else ""
        fig.suptitle(f"activation patching ({self.direction}{pairs}); "
                     + ("0 = unpatched, 1 = source prompt" if normalized else "metric"))
        fig.tight_layout()
        return fig


_STACK_NAMES = frozenset(p.name for p in BY_NAME.values() if p.stack)


_METRIC_CONTRACT = "the metric must return a tensor of shape [N], one value per row of the logits [N, T, V]"


def _metric_rows(result: Any, logits: torch.Tensor) -> Any:   # a tensor, or inside a trace its proxy
    """``result`` if it is one value per row of ``logits``; else an error saying what the metric must return."""
    rows, shape = logits.shape[0], list(logits.shape)
    if not isinstance(result, torch.Tensor):
        raise TypeError(f"{_METRIC_CONTRACT}; on logits of shape {shape} it returned a {type(result).__name__}, not a "
                        "tensor (keep the batch axis, e.g. logits[:, -1, a] - logits[:, -1, b])")
    if tuple(result.shape) != (rows,):
        hint = ""
        if result.dim() == 0:
            hint = " (a scalar: it reduced over the rows)"
        elif result.numel() == rows * logits.shape[1] != rows:
            hint = " (one value per position: choose a position, e.g. logits[:, -1])"
        elif tuple(result.shape) == (1,):
            hint = " (one value whatever the number of rows)"
        elif result.dim() > 1 and result.shape[0] == rows:
            hint = " (more than one value per row: combine them into one)"
        raise ValueError(f"{_METRIC_CONTRACT}: on logits of shape {shape} that is [{rows}], and it returned shape "
                         f"{list(result.shape)}{hint}")
    return result


def _baseline_metric(metric: Metric, target_logits: torch.Tensor,
                     source_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The metric of the unpatched target and of the source, one value per pair ([K] each, float32 on the
    host), after checking, on the baseline forwards and before any chunk runs, that it gives one value per
    row: on each side alone and on the two as one batch (which a metric returning [1] whatever N is fails), and
    that a row's value depends on that row alone (the two sides together, and their rows permuted, give the
    same values)."""
    baselines = _metric_rows(metric(target_logits), target_logits).detach().float().cpu()
    sources = _metric_rows(metric(source_logits), source_logits).detach().float().cpu()
    both = torch.cat([target_logits, source_logits])
    together = _metric_rows(metric(both), both).detach().float().cpu()
    order = torch.roll(torch.arange(both.shape[0]), 1)   # every row moves
    permuted = _metric_rows(metric(both[order]), both).detach().float().cpu()
    alone = torch.cat([baselines, sources])
    scale = float(alone.abs().max()) if alone.numel() else 0.0
    for got, expected in ((together, alone), (permuted, together[order])):
        if not torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * max(scale, 1.0), equal_nan=True):
            raise ValueError("the metric mixes rows: a row's value must depend on that row's logits alone (the sweep "
                             "puts many patched variants in one batch), but it changed with the rows beside it (the "
                             "two sides together, or their rows permuted, gave other values). Reduce over the "
                             "rows outside the metric")
    return baselines, sources


def sweep(model: Gemma3nProbe, clean: Any, corrupted: Any, metric: Metric, points: Sequence[str] = ("resid_mid",),
          layers: Iterable[int] | None = None, positions: Sequence[int | Sequence[int]] | None = None,
          direction: str = "denoise", chunk: int = 32, logits_to_keep: int = 0, heads: Any = None,
          streams: Any = None, reuse: str = "tokens") -> PatchingResult:
    """Activation patching of ``points`` at every layer and position, ``chunk`` patched rows per forward.

    Args:
        clean, corrupted: K prompt pairs of one length in tokens: a text or [T] / [1, T] token ids (K = 1),
            [K, T] token ids, or lists of K texts. Pair k patches corrupted[k] with clean[k]'s values (or the
            reverse); an entry is the metric's mean over the pairs (`PatchingResult.per_pair` keeps each).
        metric: logits [N, T, V] -> [N], e.g. a logit difference at the last position; any other shape
            is an error, found on the baseline forwards before any chunk runs.
        points: per-layer point names (see `g3n_probe.points.TABLE`), the layer stacks ``input`` and
            ``output`` included.
        layers: layers to patch (default all).
        positions: token positions in [-T, T) (default all; negative from the end), each listed once; an
            entry that is a list of positions is a group, patched together as one column (e.g. every
            token of a name).
        direction: "denoise" writes clean values into the corrupted run, "noise" the reverse.
        chunk: rows per forward, a row being one variant on one pair (variants × pairs): the memory budget
            (activations scale with it).
        logits_to_keep: compute logits for the last n positions only (0: all), as in a trace; a metric
            that reads only the last position (logits[:, -1]) can pass 1 and skip most of the lm_head.
        heads: how ``attn_z`` is patched: None or "all" the whole [H, Dh] vector at a position; "each" one
            column per (position, head), values [layers, positions, H]; a list of heads (an entry may be a
            list, heads patched together) one column each; an int only that head, values [layers, positions].
        streams: how the stream stacks (``input``, ``output``, ``altup_predict``, ``altup_correct``) are
            patched: None or "all" every stream; an int only that stream, values [layers, positions]; "each"
            or a list (entries streams or groups of streams) one column each, values [layers, positions, n].
        reuse: what a chunk takes from one forward of the target instead of recomputing it (exact: a row is
            the target before its patched layer and before its first patched position). "tokens" (default):
            the layers before the chunk's first patch (KV 'store' layers among them hand on the target's keys
            and values) and, at every later layer, the positions before the chunk's first patched position
            (their keys and values as a KV cache; the metric gets the target's logits there); rows are
            ordered into chunks that tile the layer × position grid (``result.work``: the fraction of one
            forward per patch computed); with logits_to_keep=n the trailing KV-reuse layers run the last
            positions only, and a patch there that no kept logit sees costs nothing. "layers": the layers
            only (store layers run), rows in execution order: each chunk is then the same batch as stock
            hooks with those layers replaced, bit for bit.
            "tokens" falls back to "layers" (``result.reuse`` says which ran) under an attention
            implementation other than sdpa or eager, or with logits_to_keep a list of positions.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer; got {chunk!r}")
    reuse = "layers" if checked_reuse(reuse) == "tokens" and token_reuse_unavailable(model, logits_to_keep) else reuse
    plan = prepare(model, clean, corrupted, points, layers, direction)
    positions = columns(positions, plan.target_ids.shape[1])
    part_of = part_columns(model, plan.names, heads, streams)
    found = variants(plan.layers, plan.names, positions, part_of)
    chunks, free, work = _chunks(model, found, plan.pairs, chunk, reuse, plan.target_ids.shape[1], logits_to_keep)
    scores, baselines, sources = _run(model, plan, found, chunks, metric, logits_to_keep, reuse)
    scores[free] = baselines
    per_pair = _by_point(plan, positions, part_of, found, scores)
    return PatchingResult(points=plan.names, layers=plan.layers, positions=positions,
                          values={name: v.mean(-1) for name, v in per_pair.items()}, baseline=float(baselines.mean()),
                          source=float(sources.mean()), direction=direction, forwards=len(chunks),
                          tokens=_labels(model, plan, positions), heads=heads, streams=streams, per_pair=per_pair,
                          parts={n: spec for n, spec in part_of.items() if isinstance(spec, list)},
                          baselines=baselines, sources=sources, reuse=reuse, work=work)


def _run(model: Any, plan: Plan, found: list[Variant], chunks: list[list[tuple[int, int]]], metric: Metric,
         logits_to_keep: int, reuse: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The metric of every (variant, pair) row [variants, K], and of the unpatched target and the source [K],
    each side's from one forward of its K prompts (`patching_cache.run_source`, `run_target`)."""
    # The target's own layer outputs that a skipped prefix hands on (`prefix_needs`), saved once.
    needed = sorted(set().union(*(prefix_needs(model, [found[v] for v, _ in group], reuse != "tokens")
                                  for group in chunks)))
    source, source_logits = run_source(model, plan.source_ids, plan.names, plan.layers, logits_to_keep)
    target = run_target(model, plan.target_ids, needed, logits_to_keep, keep_kv=reuse == "tokens")
    baselines, sources = _baseline_metric(metric, target.logits, source_logits)
    scores = torch.full((len(found), plan.pairs), math.nan)
    for group in chunks:
        got = patched_metric(model, plan.target_ids, [found[v] for v, _ in group], source, BY_NAME, metric,
                             logits_to_keep, pairs=[k for _, k in group], target=target)
        scores[torch.tensor([v for v, _ in group]), torch.tensor([k for _, k in group])] = got
    return scores, baselines, sources


def _labels(model: Any, plan: Plan, positions: list) -> list[str]:
    """The columns' tokens as text (the first pair's), or none without a tokenizer."""
    if model.tokenizer is None:
        return []
    return [model.tokenizer.decode([int(t) for t in plan.target_ids[0, list(p) if isinstance(p, tuple) else [p]]])
            for p in positions]


def layers_run(model: Any, keep_stores: bool = True) -> list[int]:
    """``runs[l]``: the layers a forward whose first patch is at layer l runs: l … L − 1, and (``keep_stores``)
    the KV 'store' layers before l."""
    count = model.text_config.num_hidden_layers
    stores = [keep_stores and module_tree.is_kv_store(model.text_config, i) for i in range(count)]
    return [count - layer + sum(stores[:layer]) for layer in range(count)]


def _chunks(model: Any, found: list[Variant], pairs: int, chunk: int, reuse: str, tokens: int,
            logits_to_keep: Any) -> tuple[list[list[tuple[int, int]]], list[int], float]:
    """The sweep's forwards, each a list of (variant, pair) rows; the variants no forward needs (with token
    reuse: those no kept logit can see, `patching_cache.beyond_reach`, whose entry is the baseline); and the
    work done as a fraction of one whole forward per row (`patching_plan.chunk_work`). With token reuse a
    chunk starts at its first patched position and the rows are ordered into tiles (`reuse_order`); else
    they run in execution order."""
    runs = layers_run(model, keep_stores=reuse != "tokens")
    free = beyond_reach(model, found, tokens, logits_to_keep) if reuse == "tokens" else []
    needed = sorted(set(range(len(found))) - set(free))
    at = [(variant[0], chunk_start(first_token(variant), tokens) if reuse == "tokens" else 0) for variant in found]
    cut = tail(model, 0, 0, tokens, logits_to_keep, chunk) if reuse == "tokens" else None   # chunks before R
    order = [needed[i] for i in reuse_order([at[v] for v in needed], pairs, chunk, runs, tokens, cut)] \
        if reuse == "tokens" else needed
    rows = [(v, k) for v in order for k in range(pairs)]   # a variant's pairs together
    chunks = [rows[start:start + chunk] for start in range(0, len(rows), chunk)]
    done = float(chunk_work(order, at, pairs, chunk, runs, tokens, cut).sum())
    return chunks, free, done / (len(found) * pairs * len(runs) * tokens) if found else math.nan


def _by_point(plan: Plan, positions: list, part_of: dict, found: list[Variant],
              scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each point's scores, [layers, positions(, parts), K]: rows in the order of ``plan.layers`` as given."""
    row_of_layer = {layer: i for i, layer in enumerate(plan.layers)}
    column_of = {position: j for j, position in enumerate(positions)}
    part_index = {name: {part: i for i, part in enumerate(spec)} for name, spec in part_of.items()
                  if isinstance(spec, list)}
    per_pair = {}
    for name in plan.names:
        split = (len(part_index[name]),) if name in part_index else ()
        per_pair[name] = torch.full((len(plan.layers), len(positions), *split, plan.pairs), math.nan)
    for (layer, name, position, part), score in zip(found, scores):
        split = (part_index[name][part],) if name in part_index else ()
        index = (row_of_layer[layer], column_of[position], *split)   # a tuple first: Python 3.10 has no a[x, *y]
        per_pair[name][index] = score
    return per_pair


def _skipped(model: Any, variants: Sequence[Sequence[Any]], keep_stores: bool = True) -> list[int]:
    """The layers a chunk skips: those before its first patch, but (``keep_stores``) not KV 'store' layers,
    which then run because later layers read the keys and values they leave during the forward. With the
    target's keys and values at hand (token reuse) a skipped store layer hands on the target's instead
    (`patching_cache.TargetRun.share_skipped_stores`). (A patch of a layer's ``input`` is a patch of that
    layer: the layers before it are skipped, the layer runs.)"""
    first = min(variant[0] for variant in variants)
    return [i for i in range(first) if not (keep_stores and module_tree.is_kv_store(model.text_config, i))]


def prefix_needs(model: Any, variants: Sequence[Sequence[Any]], keep_stores: bool = True) -> set[int]:
    """The skipped layers whose output is read (by the layer after them, which runs); the other skipped
    layers hand their output to a skipped layer, so any value of the right shape does."""
    skipped = set(_skipped(model, variants, keep_stores))
    return {i for i in skipped if i + 1 not in skipped}


def patched_metric(model: Any, target_ids: torch.Tensor, variants: Sequence[Variant], source: dict,
                   by_name: dict[str, Point], metric: Metric, logits_to_keep: int = 0,
                   prefix: dict[int, torch.Tensor] | None = None, pairs: Sequence[int] | None = None,
                   target: TargetRun | None = None) -> torch.Tensor:
    """One forward of ``len(variants)`` rows; row r is pair ``pairs[r]`` of ``target_ids`` ([K, T]; default
    pair 0 for every row) with variant r's value from the same pair of ``source`` patched in.

    A variant is (layer, point name, position) or (layer, point name, position, part): a position or a
    tuple of positions, a part None (the whole value there), a head or stream index, or a tuple of them
    (the point's H axis, else its S axis). ``source`` maps ``"layers.<i>.<name>"`` to that point's value on
    the K source prompts. Writes are made in execution order (layer, then table order).

    ``prefix`` (layer -> the target's own output of that layer, [S, K, T, D] from a forward of
    ``target_ids``, for at least the layers `prefix_needs` names): every row is the unpatched target until
    the first patched layer, so the layers before it are skipped and give the target's output, except KV
    'store' layers, which run. Rows then differ from a plain batched forward of the same patches by
    batch-composition rounding only (the skipped layers ran at batch K). ``None``: nothing is skipped.
    ``target`` (a `patching_cache.TargetRun` of ``target_ids``) gives the prefix instead; when it holds the
    target's keys and values (token reuse), store layers before the first patch are skipped too (they hand
    on the target's keys and values), the forward runs only the positions from the variants' first patched
    one (p; `patching_cache.chunk_start`) on, with the keys and values before p as a KV cache, and the metric
    is given the target's logits before p followed by the forward's (all T, or the last ``logits_to_keep``).
    """
    variants = [normalized_variant(variant) for variant in variants]
    pairs = [0] * len(variants) if pairs is None else [int(k) for k in pairs]
    if len(pairs) != len(variants):
        raise ValueError(f"pairs names {len(pairs)} rows and variants {len(variants)}: give one pair per variant")
    pair_index = torch.tensor(pairs, dtype=torch.long)
    tokens = target is not None and target.kv is not None
    run = cast(TargetRun, target)   # read only where tokens (and so start) say there is one
    prefix = target.outputs if target is not None else prefix
    skipped = _skipped(model, variants, keep_stores=not tokens) if prefix is not None else []
    if prefix is not None and (missing := prefix_needs(model, variants, keep_stores=not tokens) - set(prefix)):
        raise ValueError(f"prefix lacks the target's output of layer(s) {sorted(missing)}")
    start = chunk_start(min(first_token(v) for v in variants), run.tokens) if tokens else 0
    cut = tail(model, min(v[0] for v in variants), start, run.tokens, logits_to_keep, len(variants)) \
        if tokens else None
    plan, steps = _write_plan(variants, pairs, by_name, start, cut, target_ids.shape[1])
    ids, kwargs = run.suffix(target_ids, pair_index, start) if start else (target_ids[pair_index], {})
    keep = run.suffix_keep(start) if start else logits_to_keep
    handles: list = []   # registered inside the try, so a failure while registering removes what is on
    try:
        if tokens:
            handles += run.share_skipped_stores(model, skipped, pair_index)
            handles += run.keep_tail(model, cut)
        with torch.no_grad(), model.trace(ids, logits_to_keep=keep, **kwargs):
            _skip_prefix(model, skipped, prefix, pair_index, start)
            for layer, name in steps:
                point, (offset, entries) = by_name[name], plan[(layer, name)]
                _write(point, point.read(model, layer), source[point.qualified(layer)], entries, offset)
            logits = model.logits.output.save()
    finally:
        for handle in handles:
            handle.remove()
    if start:
        logits = run.full_logits(logits, pair_index)
    return _metric_rows(metric(logits), logits).detach().float().cpu()


def _write_plan(variants: list[Variant], pairs: list[int], by_name: dict[str, Point], start: int = 0,
                cut: tuple[int, int] | None = None, tokens: int = 0) -> tuple[dict, list[tuple[int, str]]]:
    """Per (layer, point): the first position its value holds (``start``, or T − m from layer R on where
    ``cut`` = (R, m), `patching_cache.tail`) and the cells to write there, (row, pair, token − that, part);
    and the (layer, point) steps in execution order. A cell before a cut layer's first position is dropped:
    no kept logit can see it (`patching_cache.beyond_reach`)."""
    plan: dict[tuple[int, str], tuple[int, list[tuple[int, int, int, int | None]]]] = {}
    for row, (variant, pair) in enumerate(zip(variants, pairs)):
        offset = start if cut is None or variant[0] < cut[0] else tokens - cut[1]
        entries = [(row, pair, token - offset, part) for token, part in cells(variant) if token >= offset]
        if entries:
            plan.setdefault(variant[:2], (offset, []))[1].extend(entries)
    return plan, sorted(plan, key=lambda key: (key[0], execution_rank(by_name[key[1]], key[0])))


def _skip_prefix(model: Any, skipped: list[int], prefix: dict[int, torch.Tensor] | None,
                 pair_index: torch.Tensor, start: int = 0) -> None:
    """Inside a trace: every skipped layer gives row r the target's output for pair ``pair_index[r]``, at the
    positions from ``start`` on."""
    if not skipped:
        return
    assert prefix is not None, "skipped layers take their output from the prefix"
    template = next(iter(prefix.values()))
    rows = len(pair_index)
    for layer in skipped:
        if layer in prefix:   # stream stacks [S, K, T, D]: the row's pair, once per row
            kept = prefix[layer][:, :, start:]
            replacement = kept.index_select(1, pair_index.to(kept.device))
        else:                 # handed to a skipped layer: never read, so no memory spent on it
            filler = torch.zeros((), dtype=template.dtype, device=template.device)
            replacement = filler.expand(template.shape[0], rows, template.shape[2] - start, *template.shape[3:])
        if module_tree.is_kv_store(model.text_config, layer):   # its keys and values come from the target's run
            base_skip(model.layers[layer], replacement)
        else:
            model.layers[layer].skip(replacement)


def _part_axis(point: Point) -> int:
    for letter in ("H", "S"):
        if letter in point.axes:
            return point.axis(letter)
    raise ValueError(f"{point.name} {point.shape} has no head (H) or stream (S) axis: patch it whole (part None)")


def _write(point: Point, value: Any, patch: torch.Tensor, entries: list[tuple[int, int, int, int | None]],
           start: int = 0) -> None:
    """Every (row, pair, token, part) cell of one point in indexed writes (one for the whole-value cells, one
    for the split ones): the rows are distinct, so one write equals the writes one by one, and costs one
    operation instead of one per variant. Only the source rows written cross to the device. ``token`` is the
    position in ``value``, which starts at ``start`` of the source's (a chunk run from its first patched
    position on; an attention pattern keeps all its keys)."""
    for split in (False, True):
        cells_ = [entry for entry in entries if (entry[3] is not None) == split]
        if not cells_:
            continue
        index: list[Any] = [slice(None)] * patch.dim()
        index[point.batch_axis] = torch.tensor([pair for _, pair, _, _ in cells_])
        index[point.axis("T")] = torch.tensor([token + start for _, _, token, _ in cells_])
        if split:
            index[_part_axis(point)] = torch.tensor([part for *_, part in cells_])
        rows = patch[tuple(index)].to(value.device)
        index = [i.to(value.device) if isinstance(i, torch.Tensor) else i for i in index]
        index[point.batch_axis] = torch.tensor([row for row, *_ in cells_], device=value.device)
        index[point.axis("T")] = torch.tensor([token for _, _, token, _ in cells_], device=value.device)
        value[tuple(index)] = rows


def attribution(model: Gemma3nProbe, clean: Any, corrupted: Any, metric: Metric, points: Sequence[str] = ("resid_mid",),
                layers: Iterable[int] | None = None, direction: str = "denoise") -> PatchingResult:
    """Attribution patching: (source − target) · ∂metric/∂value at the target, for every point, layer and
    position, from one forward and one backward on the target prompts (plus a forward on the source).

    A first-order estimate of `sweep`'s entries (as metric changes, not normalised); the gradients are
    stock autograd's, read at the points. ``values[point][layer, position]`` sums the product over all
    other axes (streams, heads, features); the parameters' ``.grad`` are left as they were. Over K pairs (as for `sweep`) an entry is the mean of the K
    per-pair estimates (``per_pair``: [layers, positions, K]), from one forward and backward of the K rows.
    """
    plan = prepare(model, clean, corrupted, points, layers, direction)
    source = model.cache(plan.source_ids, plan.names, layers=plan.layers, verbose=False)
    order = [(layer, name) for layer in sorted(plan.layers) for name in plan.names]
    grads: dict[tuple[int, str], Any] = {}
    values: dict[tuple[int, str], Any] = {}
    parameters = list(model.hf_model.parameters())
    kept = [parameter.grad for parameter in parameters]   # the user's gradients: put back as they were
    for parameter in parameters:
        parameter.grad = None
    try:
        with model.trace(plan.target_ids):
            for layer, name in order:
                values[(layer, name)] = BY_NAME[name].read(model, layer).save()
            logits = model.logits.output
            rows = _metric_rows(metric(logits), logits)
            with rows.sum().backward():
                for key in reversed(order):  # nnsight serves gradients in reverse execution order
                    grads[key] = values[key].grad.save()
            baselines = rows.detach().float().cpu().save()
    finally:
        for parameter, grad in zip(parameters, kept):
            parameter.grad = grad
    with torch.no_grad(), model.trace(plan.source_ids):
        logits = model.logits.output
        sources = _metric_rows(metric(logits), logits).detach().float().cpu().save()
    pairs, tokens = plan.pairs, plan.target_ids.shape[1]
    per_pair = {name: torch.full((len(plan.layers), tokens, pairs), math.nan) for name in plan.names}
    for (layer, name), grad in grads.items():
        point = BY_NAME[name]
        delta = source[point.qualified(layer)].to(grad.device, torch.float32) - values[(layer, name)].detach().float()
        product = (delta * grad.float()).movedim(point.batch_axis, 0)            # [K, ...]
        token_axis = point.axis("T") + (1 if point.axis("T") < point.batch_axis else 0)
        estimate = product.movedim(token_axis, 1).reshape(pairs, tokens, -1).sum(-1)  # [K, T]
        per_pair[name][plan.layers.index(layer)] = estimate.T.cpu()
    labels = [model.tokenizer.decode([int(t)]) for t in plan.target_ids[0]] if model.tokenizer is not None else []
    return PatchingResult(points=plan.names, layers=plan.layers, positions=list(range(tokens)),
                          values={name: v.mean(-1) for name, v in per_pair.items()}, baseline=float(baselines.mean()),
                          source=float(sources.mean()), direction=direction, forwards=2, tokens=labels,
                          per_pair=per_pair, baselines=baselines, sources=sources)
