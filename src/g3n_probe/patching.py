"""Activation patching sweeps with many patches per forward pass.

A sweep asks, for every (point, layer, position): if this one value came from the other prompt, how
much of the metric's difference does it restore? Answering it one patch per forward costs one
forward per cell. `sweep` puts the patched variants on the batch axis instead: a chunk of N
variants is one forward over N copies of the target prompt, row r carrying patch r. Stream stacks
are patched on their own batch axis (dimension 1), attention patterns on their query position.

    result = g3n.patching.sweep(model, clean_ids, corrupted_ids, metric=lambda logits: logits[:, -1, a] - logits[:, -1, b],
                                points=["resid_mid", "ple_out"], layers=range(6))
    result.plot()                       # a heatmap per point: layer × position

``direction="denoise"`` (default) runs the corrupted prompt and writes clean values into it;
``"noise"`` runs the clean prompt and writes corrupted values. Every row is the unpatched target until
its patched layer, so the layers before a chunk's first patch are skipped and give the target's own
output (see `patched_metric`). Exactness: each entry equals what plain torch hooks on a stock model give
for the same batch with the same layers replaced (tested with ``torch.equal``); against one patch per
forward it differs only by how the batch size changes kernel rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from . import arch
from .activations import encode_inputs
from .points import LAYER, POINTS, Point, execution_rank

Metric = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PatchingResult:
    """Metric values of a sweep: ``values[point][layer, position]`` (NaN where nothing was patched).

    ``baseline`` is the metric of the unpatched run, ``source`` the metric of the prompt the values came
    from; `normalized` maps baseline to 0 and source to 1.
    """

    points: list[str]
    layers: list[int]
    positions: list[int | tuple[int, ...]]  # a column is a position or a group patched together
    values: dict[str, torch.Tensor]
    baseline: float
    source: float
    direction: str
    forwards: int = 0
    tokens: list[str] = field(default_factory=list)

    def normalized(self) -> dict[str, torch.Tensor]:
        span = self.source - self.baseline
        return {name: (v - self.baseline) / span if span else v * math.nan for name, v in self.values.items()}

    def plot(self, normalized: bool = True, ax: Any = None) -> Any:
        """One heatmap per point (layers × positions); returns the matplotlib figure."""
        import matplotlib.pyplot as plt   # lazy: a heavy import only the plot needs

        data = self.normalized() if normalized else self.values
        if ax is None:
            fig, axes = plt.subplots(1, len(self.points), figsize=(3 + 3 * len(self.points), 3 + 0.25 * len(self.layers)),
                                     squeeze=False)
            axes = axes[0]
        else:
            fig, axes = ax.figure, [ax]
        for axis, name in zip(axes, self.points):
            image = axis.imshow(data[name].float().numpy(), aspect="auto", cmap="RdBu_r",
                                vmin=-1 if normalized else None, vmax=1 if normalized else None)
            axis.set_title(name)
            axis.set_ylabel("layer")
            axis.set_yticks(range(len(self.layers)), [str(layer) for layer in self.layers])
            labels = self.tokens or [str(p) for p in self.positions]
            axis.set_xticks(range(len(self.positions)), labels, rotation=90)
            fig.colorbar(image, ax=axis)
        fig.suptitle(f"activation patching ({self.direction}); "
                     + ("0 = unpatched, 1 = source prompt" if normalized else "metric"))
        fig.tight_layout()
        return fig


def _encode(model: Any, prompt: Any) -> torch.Tensor:
    ids, mask = encode_inputs(model, prompt)
    if ids.shape[0] != 1:
        raise ValueError(f"a sweep compares two single prompts; got a batch of {ids.shape[0]}")
    return ids


def _prepare(model: Any, clean: Any, corrupted: Any, points: Sequence[str], layers: Iterable[int] | None,
             direction: str) -> tuple[list[str], dict[str, Point], list[int], torch.Tensor, torch.Tensor]:
    """Checked arguments shared by `sweep` and `attribution`: the point names in execution order, the
    table rows by name, the layers, and the (source, target) token ids for ``direction``."""
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction={direction!r}: choose 'denoise' or 'noise'")
    by_name = {p.name: p for p in POINTS}
    for name in points:
        if name not in by_name or by_name[name].scope != LAYER:
            per_layer = [p.name for p in POINTS if p.scope == LAYER]
            raise ValueError(f"{name!r} is not a per-layer point; choose from {', '.join(per_layer)}")
        reason = model.injection.unavailable(by_name[name])
        if reason:
            raise ValueError(reason)
    clean_ids, corrupted_ids = _encode(model, clean), _encode(model, corrupted)
    if clean_ids.shape != corrupted_ids.shape:
        raise ValueError(f"clean and corrupted prompts must have the same number of tokens; got "
                         f"{clean_ids.shape[1]} and {corrupted_ids.shape[1]}")
    count = model.text_config.num_hidden_layers
    layers = list(range(count)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer < count]
    if bad:
        raise ValueError(f"layers {bad} out of range: this model has {count} layers")
    names = sorted(points, key=lambda name: execution_rank(by_name[name], 0))
    source_ids, target_ids = (clean_ids, corrupted_ids) if direction == "denoise" else (corrupted_ids, clean_ids)
    return names, by_name, layers, source_ids, target_ids


def sweep(model: Any, clean: Any, corrupted: Any, metric: Metric, points: Sequence[str] = ("resid_mid",),
          layers: Iterable[int] | None = None, positions: Sequence[int | Sequence[int]] | None = None,
          direction: str = "denoise", chunk: int = 32, logits_to_keep: int = 0) -> PatchingResult:
    """Activation patching of ``points`` at every layer and position, ``chunk`` patched variants per forward.

    Args:
        clean, corrupted: two prompts (text or [1, T] token ids) of the same length in tokens.
        metric: logits [N, T, V] -> [N], e.g. a logit difference at the last position.
        points: per-layer point names (see `g3n_probe.points.POINTS`).
        layers: layers to patch (default all).
        positions: token positions (default all; negative from the end); an entry that is a list of
            positions is a group, patched together as one column (e.g. every token of a name).
        direction: "denoise" writes clean values into the corrupted run, "noise" the reverse.
        chunk: variants per forward: the memory budget (activations scale with it). Layers before a
            chunk's first patch are not recomputed: they give the target's own output (`patched_metric`).
        logits_to_keep: compute logits for the last n positions only (0: all), as in a trace; a metric
            that reads only the last position (logits[:, -1]) can pass 1 and skip most of the lm_head.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer; got {chunk!r}")
    names, by_name, layers, source_ids, target_ids = _prepare(model, clean, corrupted, points, layers, direction)
    tokens = target_ids.shape[1]
    positions = list(range(tokens)) if positions is None else [_column(p, tokens) for p in positions]
    source = model.cache(source_ids, names, layers=layers, verbose=False)
    variants = [(layer, name, position) for layer in sorted(layers) for name in names for position in positions]
    chunks = [variants[start:start + chunk] for start in range(0, len(variants), chunk)]
    # The target's own layer outputs that a skipped prefix hands on (`prefix_needs`), saved once.
    needed = sorted(set().union(*(prefix_needs(model, group) for group in chunks)))
    prefix: dict[int, torch.Tensor] = {}
    with torch.no_grad(), model.trace(target_ids, logits_to_keep=logits_to_keep):
        for layer in needed:
            prefix[layer] = model.layers[layer].output.save()
        target_logits = model.logits.output.save()
    with torch.no_grad(), model.trace(source_ids, logits_to_keep=logits_to_keep):
        source_logits = model.logits.output.save()
    baseline, reference = float(metric(target_logits)[0]), float(metric(source_logits)[0])

    values = {name: torch.full((len(layers), len(positions)), math.nan) for name in names}
    row_of_layer = {layer: i for i, layer in enumerate(layers)}
    column_of = {position: j for j, position in enumerate(positions)}
    forwards = 0
    for group in chunks:
        scores = patched_metric(model, target_ids, group, source, by_name, metric, logits_to_keep, prefix)
        forwards += 1
        for (layer, name, position), score in zip(group, scores.tolist()):
            values[name][row_of_layer[layer], column_of[position]] = score
    labels = []
    if model.tokenizer is not None:
        labels = [model.tokenizer.decode([int(t) for t in target_ids[0, list(p) if isinstance(p, tuple) else [p]]])
                  for p in positions]
    return PatchingResult(points=names, layers=layers, positions=positions, values=values, baseline=baseline,
                          source=reference, direction=direction, forwards=forwards, tokens=labels)


def _column(position: int | Sequence[int], tokens: int) -> int | tuple[int, ...]:
    if isinstance(position, Sequence) and not isinstance(position, str):
        group = tuple(sorted({int(p) % tokens for p in position}))
        if not group:
            raise ValueError("an empty position group patches nothing")
        return group
    return int(position) % tokens


def _skipped(model: Any, variants: list[tuple[int, str, Any]]) -> list[int]:
    """The layers a chunk skips: those before its first patch, but not KV 'store' layers, which run
    because later layers read the keys and values they leave during the forward."""
    first = min(layer for layer, _, _ in variants)
    return [i for i in range(first) if not arch.is_kv_store(model.text_config, i)]


def prefix_needs(model: Any, variants: list[tuple[int, str, Any]]) -> set[int]:
    """The skipped layers whose output is read (by the layer after them, which runs); the other skipped
    layers hand their output to a skipped layer, so any value of the right shape does."""
    skipped = set(_skipped(model, variants))
    return {i for i in skipped if i + 1 not in skipped}


def patched_metric(model: Any, target_ids: torch.Tensor, variants: list[tuple[int, str, int]], source: dict,
                   by_name: dict[str, Point], metric: Metric, logits_to_keep: int = 0,
                   prefix: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """One forward over ``len(variants)`` copies of ``target_ids``; row r has variant r's value patched in.

    A variant is (layer, point name, position); ``source`` maps ``"layers.<i>.<name>"`` to that point's
    value on the source prompt. Writes are made in execution order (layer, then table order).

    ``prefix`` (layer -> the target's own output of that layer, from a forward of ``target_ids`` alone,
    for at least the layers `prefix_needs` names): every row is the unpatched target until the first
    patched layer, so the layers before it are skipped and give the target's output, except KV 'store'
    layers, which run. On a sweep over all layers this halves the work. Rows then differ from a plain
    batched forward of the same patches by batch-composition rounding only (the skipped layers ran at
    batch 1). ``None``: nothing is skipped.
    """
    batch = target_ids.expand(len(variants), -1).contiguous()
    skipped = _skipped(model, variants) if prefix is not None else []
    if prefix is not None and (missing := prefix_needs(model, variants) - set(prefix)):
        raise ValueError(f"prefix lacks the target's output of layer(s) {sorted(missing)}")
    template = next(iter(prefix.values())) if skipped else None
    plan: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for row, (layer, name, position) in enumerate(variants):
        plan.setdefault((layer, name), []).append((row, position))
    steps = sorted(plan, key=lambda key: (key[0], execution_rank(by_name[key[1]], key[0])))
    with torch.no_grad(), model.trace(batch, logits_to_keep=logits_to_keep):
        for layer in skipped:
            if layer in prefix:   # stream stacks [S, B, T, D]: the target's row, once per variant
                model.layers[layer].skip(prefix[layer].expand(-1, len(variants), -1, -1).contiguous())
            else:                 # handed to a skipped layer: never read, so no memory spent on it
                filler = torch.zeros((), dtype=template.dtype, device=template.device)
                model.layers[layer].skip(filler.expand(template.shape[0], len(variants), *template.shape[2:]))
        for layer, name in steps:
            point = by_name[name]
            value = getattr(model.layers[layer], name).output
            patch = source[f"layers.{layer}.{name}"]
            # Every (row, position) of this point in one indexed write: the rows are distinct variants,
            # so one write equals the writes one by one, and costs one operation instead of one per variant.
            pairs = [(row, p) for row, position in plan[(layer, name)]
                     for p in (position if isinstance(position, (tuple, list)) else (position,))]
            tokens = torch.tensor([p for _, p in pairs])
            index: list[Any] = [slice(None)] * patch.dim()
            index[point.batch_axis] = torch.zeros_like(tokens)
            index[point.axis("T")] = tokens
            rows = patch[tuple(index)].to(value.device)   # only the rows written cross to the device
            index[point.batch_axis] = torch.tensor([row for row, _ in pairs], device=value.device)
            index[point.axis("T")] = tokens.to(value.device)
            value[tuple(index)] = rows
        logits = model.logits.output.save()
    return metric(logits).detach().float().cpu()


def attribution(model: Any, clean: Any, corrupted: Any, metric: Metric, points: Sequence[str] = ("resid_mid",),
                layers: Iterable[int] | None = None, direction: str = "denoise") -> PatchingResult:
    """Attribution patching: (source − target) · ∂metric/∂value at the target, for every point, layer and
    position, from one forward and one backward on the target prompt (plus a forward on the source).

    A first-order estimate of `sweep`'s entries (as metric changes, not normalised); the gradients are
    stock autograd's, read at the points. ``values[point][layer, position]`` sums the product over all
    other axes (streams, heads, features).
    """
    names, by_name, layers, source_ids, target_ids = _prepare(model, clean, corrupted, points, layers, direction)
    source = model.cache(source_ids, names, layers=layers, verbose=False)
    order = [(layer, name) for layer in sorted(layers) for name in names]
    grads: dict[tuple[int, str], Any] = {}
    values: dict[tuple[int, str], Any] = {}
    with model.trace(target_ids):
        for layer, name in order:
            values[(layer, name)] = getattr(model.layers[layer], name).output.save()
        score = metric(model.logits.output).sum()
        with score.backward():
            for key in reversed(order):  # nnsight serves gradients in reverse execution order
                grads[key] = values[key].grad.save()
        baseline = score.detach().save()
    with torch.no_grad(), model.trace(source_ids):
        reference = metric(model.logits.output).sum().save()
    tokens = target_ids.shape[1]
    result = {name: torch.full((len(layers), tokens), math.nan) for name in names}
    for (layer, name), grad in grads.items():
        point = by_name[name]
        delta = source[f"layers.{layer}.{name}"].to(grad.device, torch.float32) - values[(layer, name)].detach().float()
        product = (delta * grad.float()).select(point.batch_axis, 0)
        token_axis = point.axis("T") - (1 if point.axis("T") > point.batch_axis else 0)
        result[name][layers.index(layer)] = product.movedim(token_axis, 0).reshape(tokens, -1).sum(-1).cpu()
    model.hf_model.zero_grad(set_to_none=True)
    labels = [model.tokenizer.decode([int(t)]) for t in target_ids[0]] if model.tokenizer is not None else []
    return PatchingResult(points=names, layers=layers, positions=list(range(tokens)), values=result,
                          baseline=float(baseline), source=float(reference), direction=direction, forwards=2,
                          tokens=labels)
