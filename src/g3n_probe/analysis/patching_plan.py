"""Planning a patching sweep: the checked arguments, the prompt pairs and the columns.

A sweep's entry is one *variant*, ``(layer, point, position, part)``: ``position`` a token or a group of
tokens (a tuple) patched together, ``part`` None (the whole value at those tokens), a head or stream
index, or a group of them (a tuple). Heads split ``attn_z`` ([B,T,H,Dh], on H); streams split the stream
stacks ([S,B,T,D], on S). A row of a forward is one variant on one prompt pair.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from ..activations.batch import encode_inputs
from ..points import BY_NAME, LAYER, TABLE, execution_rank

#: ``heads=`` splits these points on their H axis; ``streams=`` splits the stream stacks on S.
HEAD_POINTS = ("attn_z",)
STREAM_POINTS = tuple(p.name for p in TABLE if p.stack and p.scope == LAYER)

Column = Any          # an int, or a tuple of ints patched together
Variant = tuple       # (layer, point name, position column, part column or None)


@dataclass(frozen=True)
class Plan:
    """The checked arguments shared by `sweep` and `attribution`: point names in execution order, the
    layers (rows of the result, as given) and the token ids of the K pairs ([K, T] each) for the direction."""

    names: list[str]
    layers: list[int]
    source_ids: torch.Tensor
    target_ids: torch.Tensor

    @property
    def pairs(self) -> int:
        return self.target_ids.shape[0]


def prepare(model: Any, clean: Any, corrupted: Any, points: Sequence[str], layers: Iterable[int] | None,
            direction: str) -> Plan:
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction={direction!r}: choose 'denoise' or 'noise'")
    layers = checked_layers(layers, model.text_config.num_hidden_layers)
    names = checked_points(model, points, layers)
    clean_ids, corrupted_ids = encode_pairs(model, clean, corrupted)
    source_ids, target_ids = (clean_ids, corrupted_ids) if direction == "denoise" else (corrupted_ids, clean_ids)
    return Plan(names, layers, source_ids, target_ids)


def checked_points(model: Any, points: Sequence[str], layers: list[int]) -> list[str]:
    """Per-layer row names (the layer stacks ``input``/``output`` included), each once and present at every
    layer swept, in execution order."""
    if isinstance(points, (str, bytes)) or not isinstance(points, Iterable):
        raise TypeError(f"points must be a list of per-layer point names, e.g. ['resid_mid']; got {points!r}")
    points = list(points)
    for name in points:
        if name not in BY_NAME or BY_NAME[name].scope != LAYER:
            per_layer = [p.name for p in TABLE if p.scope == LAYER]
            raise ValueError(f"{name!r} is not a per-layer point; choose from {', '.join(per_layer)}")
        for layer in [None, *layers]:
            reason = model.injection.unavailable(BY_NAME[name], layer)
            if reason:
                raise ValueError(reason)
    if repeated := _repeated(points):
        raise ValueError(f"points {repeated} are listed more than once: each point is one result; list each once")
    return sorted(points, key=lambda name: execution_rank(BY_NAME[name], 0))


def _encode_side(model: Any, prompts: Any, side: str) -> torch.Tensor:
    """[K, T] token ids of one side: a text, a list of K texts of one length in tokens, or ids [T] / [K, T]."""
    if isinstance(prompts, torch.Tensor) and prompts.dim() not in (1, 2):
        raise ValueError(f"{side} token ids must be [T] or [K, T] (K prompt pairs); got shape {tuple(prompts.shape)}")
    if isinstance(prompts, (list, tuple)) and not prompts:
        raise ValueError(f"{side} is an empty list of prompts: give at least one")
    ids, mask = encode_inputs(model, prompts)   # texts, ids, or a tokenizer's output (its mask honoured)
    if mask is not None and not bool(mask.all()):
        lengths = mask.sum(1).tolist()
        raise ValueError(f"the {side} texts have unequal lengths in tokens ({lengths}): every prompt of a sweep must "
                         "have the same number of tokens, so that a position means the same token in each")
    return ids


def encode_pairs(model: Any, clean: Any, corrupted: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean and corrupted token ids, [K, T] each: K pairs of prompts, all of one length."""
    clean_ids, corrupted_ids = _encode_side(model, clean, "clean"), _encode_side(model, corrupted, "corrupted")
    if clean_ids.shape[0] != corrupted_ids.shape[0]:
        raise ValueError(f"clean has {clean_ids.shape[0]} prompt(s) and corrupted {corrupted_ids.shape[0]}: give one "
                         "corrupted prompt per clean prompt (K pairs, [K, T] token ids or K texts each)")
    if clean_ids.shape != corrupted_ids.shape:
        raise ValueError(f"clean and corrupted prompts must have the same number of tokens; got "
                         f"{clean_ids.shape[1]} and {corrupted_ids.shape[1]}")
    return clean_ids, corrupted_ids


def _integer(value: Any, what: str) -> int:
    """``value`` as an int, refusing what only looks like one (a bool, a float such as 2.5, a string)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer; got {value!r}") from None


def _repeated(values: Sequence[Any]) -> list[Any]:
    """The values listed more than once, each named once, in the order they repeat."""
    seen: set = set()
    repeated: list[Any] = []
    for value in values:
        if value in seen and value not in repeated:
            repeated.append(value)
        seen.add(value)
    return repeated


def checked_layers(layers: Iterable[int] | None, count: int) -> list[int]:
    """Each layer is one row of the result: an integer in [0, count), listed once."""
    if layers is None:
        return list(range(count))
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a list of layer indices (or None for all); got {layers!r}")
    layers = [_integer(layer, "a layer") for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer < count]
    if bad:
        raise ValueError(f"layers {bad} out of range: this model has {count} layers")
    if repeated := _repeated(layers):
        raise ValueError(f"layers {repeated} are listed more than once: each layer is one row of the result; list "
                         "each once")
    return layers


def columns(positions: Iterable[int | Sequence[int]] | None, tokens: int) -> list[Column]:
    """The sweep's columns, made non-negative: each a position or a non-empty group of positions, every
    position in [-T, T) (an error naming those outside, never wrapped), no position or group twice."""
    if positions is None:
        return list(range(tokens))
    if isinstance(positions, (str, bytes)) or not isinstance(positions, Iterable):
        raise TypeError(f"positions must be a list of positions or groups of positions; got {positions!r}")
    given = [_entry(entry, "a position") for entry in positions]
    flat = [p for entry in given for p in (entry if isinstance(entry, list) else [entry])]
    bad = [p for p in flat if not -tokens <= p < tokens]
    if bad:
        raise ValueError(f"positions {bad} out of range: the prompts have {tokens} tokens, so a position must lie in "
                         f"[-{tokens}, {tokens}) (negative counts from the end)")
    found: list[Column] = []
    for entry in given:
        if isinstance(entry, list):
            group = [p % tokens for p in entry]
            if _repeated(group):
                raise ValueError(f"the position group {entry} names a position more than once (on {tokens} tokens it "
                                 f"is {group}); list each position once")
            found.append(tuple(sorted(group)))
        else:
            found.append(entry % tokens)
    _refuse_repeated_columns(found, given, f"positions {{twice}} patch the same token(s) on {tokens} tokens: each "
                             "column is patched once; list each position or group once")
    return found


def _refuse_repeated_columns(found: list[Column], given: list[Any], message: str) -> None:
    patched = [frozenset(c) if isinstance(c, tuple) else frozenset([c]) for c in found]
    if repeated := _repeated(patched):
        twice = [given[i] for i, key in enumerate(patched) if key in repeated]
        raise ValueError(message.format(twice=twice))


def _entry(entry: Any, what: str) -> int | list[int]:
    """An index (an int) or a group (a non-empty list of ints) as given, not yet checked against its range."""
    if not isinstance(entry, (str, bytes, bool)):
        try:
            return operator.index(entry)
        except TypeError:
            pass
        if isinstance(entry, Iterable):
            group = [_integer(p, f"{what} in a group") for p in entry]
            if not group:
                raise ValueError(f"an empty {what.split()[-1]} group patches nothing: every group needs at least one "
                                 f"{what.split()[-1]}")
            return group
    raise TypeError(f"{what} must be an integer or a list of integers (a group); got {entry!r}")


def parts(spec: Any, count: int, argument: str, unit: str) -> None | int | list[Column]:
    """``heads=`` / ``streams=`` normalised: None (``None`` or ``"all"``: the whole value), an int (only that
    head or stream; no extra axis), or a list of columns (``"each"``: every index; a list: each entry an
    index or a group patched together; one column each, an extra axis of the result)."""
    if spec is None or (isinstance(spec, str) and spec == "all"):
        return None
    if isinstance(spec, str) and spec == "each":
        return list(range(count))
    usage = (f"{argument} must be None or 'all' (the whole value), 'each' (one column per {unit}), a {unit} index, "
             f"or a list of {unit} indices or groups (lists) of them")
    if isinstance(spec, (str, bytes, bool)):
        raise TypeError(f"{usage}; got {spec!r}")
    try:
        index = operator.index(spec)
    except TypeError:
        index = None
    if index is not None:
        _in_range([index], count, argument, unit)
        return index
    if not isinstance(spec, Iterable):
        raise TypeError(f"{usage}; got {spec!r}")
    given = [_entry(entry, f"a {unit}") for entry in spec]
    if not given:
        raise ValueError(f"{argument}=[] patches nothing: {usage}")
    _in_range([i for entry in given for i in (entry if isinstance(entry, list) else [entry])], count, argument, unit)
    found: list[Column] = []
    for entry in given:
        if isinstance(entry, list) and _repeated(entry):
            raise ValueError(f"the {unit} group {entry} in {argument} names a {unit} more than once; list each once")
        found.append(tuple(sorted(entry)) if isinstance(entry, list) else entry)
    _refuse_repeated_columns(found, given, f"{argument} {{twice}} patch the same {unit}(s): each column is patched "
                             f"once; list each {unit} or group once")
    return found


def _in_range(indices: list[int], count: int, argument: str, unit: str) -> None:
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise ValueError(f"{argument} {bad} out of range: this model has {count} {unit}s, so a {unit} must lie in "
                         f"[0, {count})")


def part_columns(model: Any, names: list[str], heads: Any, streams: Any) -> dict[str, None | int | list[Column]]:
    """Each point's part spec: ``heads`` for `HEAD_POINTS`, ``streams`` for `STREAM_POINTS`, None for the
    others; an error when an argument is given but no listed point takes it."""
    config = model.text_config
    head_spec = parts(heads, config.num_attention_heads, "heads", "head")
    stream_spec = parts(streams, config.altup_num_inputs, "streams", "stream")
    if head_spec is not None and not set(names) & set(HEAD_POINTS):
        raise ValueError(f"heads={heads!r} splits {', '.join(HEAD_POINTS)} only (the per-head attention output before "
                         f"o_proj), and points {names} has none: add 'attn_z' to points or drop heads")
    if stream_spec is not None and not set(names) & set(STREAM_POINTS):
        raise ValueError(f"streams={streams!r} splits the stream stacks only ({', '.join(STREAM_POINTS)}), and points "
                         f"{names} has none: add a stack such as 'input' or 'output' to points or drop streams")
    return {name: head_spec if name in HEAD_POINTS else stream_spec if name in STREAM_POINTS else None
            for name in names}


def variants(layers: list[int], names: list[str], positions: list[Column],
             part_of: dict[str, None | int | list[Column]]) -> list[Variant]:
    """Every (layer, point, position, part) in execution order: layer, point, position, then part."""
    found = []
    for layer in sorted(layers):
        for name in names:
            spec = part_of.get(name)
            for position in positions:
                found += [(layer, name, position, part) for part in (spec if isinstance(spec, list) else [spec])]
    return found


def normalized_variant(variant: Sequence[Any]) -> Variant:
    """(layer, name, position, part): a three-element variant patches the whole value (part None)."""
    if len(variant) == 3:
        return (*variant, None)
    return tuple(variant)


def cells(variant: Variant) -> list[tuple[int, int | None]]:
    """The (token, part) cells one variant writes: its positions × its parts (part None: all of them)."""
    _, _, position, part = variant
    tokens = position if isinstance(position, (tuple, list)) else (position,)
    split = part if isinstance(part, (tuple, list)) else (part,)
    return [(token, index) for token in tokens for index in split]


def label(column: Column, prefix: str) -> str:
    """A part column as a plot label: ``h1``, ``s0+2``."""
    return prefix + ("+".join(str(i) for i in column) if isinstance(column, tuple) else str(column))


# ---- the order of a sweep's rows: chunks that share their first layer and their first position ------------


def first_token(variant: Variant) -> int:
    """The earliest position a variant writes (a group's first): nothing before it differs from the target."""
    position = variant[2]
    return min(position) if isinstance(position, (tuple, list)) else position


def _band_widths(count: int) -> list[int]:
    """Band widths to try: 1, 2, 3, 4, 6, 8, 12, … up to ``count`` (and ``count`` itself)."""
    widths, width = {count}, 1
    while width < count:
        widths.update({width, width + width // 2} if width > 1 else {1})
        width *= 2
    return sorted(w for w in widths if 1 <= w <= count)


def chunk_work(order: Sequence[int], cells: Sequence[tuple[int, int]], pairs: int, chunk: int,
               runs: Sequence[int], tokens: int, cut: tuple[int, int] | None = None) -> torch.Tensor:
    """The work of each chunk when the variants run in ``order`` (each variant's ``pairs`` rows together, then
    ``chunk`` rows per forward): rows × layers run × positions run, with ``runs[l]`` the layers a chunk whose
    first patched layer is l runs and the positions from the chunk's first patched position on; with ``cut``
    = (R, m), a chunk whose first layer is before R runs layers R … L − 1 at m positions at most. [chunks]"""
    if not order:
        return torch.zeros(0)
    layer_of = torch.tensor([cells[v][0] for v in order]).repeat_interleave(pairs)
    token_of = torch.tensor([cells[v][1] for v in order]).repeat_interleave(pairs)
    count = -(-len(layer_of) // chunk)
    pad = count * chunk - len(layer_of)
    big = max(len(runs), tokens)
    first_layer = torch.cat([layer_of, torch.full((pad,), big)]).reshape(count, chunk).amin(1)
    first_token_ = torch.cat([token_of, torch.full((pad,), big)]).reshape(count, chunk).amin(1)
    rows = torch.full((count,), chunk)
    rows[-1] = chunk - pad
    positions = tokens - first_token_
    work = rows * torch.tensor(list(runs))[first_layer] * positions
    if cut is not None:
        layer, keep = cut
        saved = (len(runs) - layer) * (positions - keep).clamp(min=0) * (first_layer < layer)
        work = work - rows * saved
    return work


def reuse_order(cells: Sequence[tuple[int, int]], pairs: int, chunk: int, runs: Sequence[int],
                tokens: int, cut: tuple[int, int] | None = None) -> list[int]:
    """Variant indices in the order whose chunks cost least (`chunk_work`): ``cells[v]`` is variant v's (first
    patched layer, first patched position). A chunk runs from its earliest layer and its earliest position, so
    good chunks are tiles of the layer × position grid: the candidates are bands of a few layers (positions
    ascending inside a band) and bands of a few positions (layers ascending inside); the cheapest wins, the
    first of equals (layer by layer) on a tie. Every candidate has the same number of chunks. Within a cell
    variants keep their order (execution order)."""
    layer_rank = {layer: i for i, layer in enumerate(sorted({layer for layer, _ in cells}))}
    token_rank = {token: i for i, token in enumerate(sorted({token for _, token in cells}))}

    def banded(rank: dict[int, int], axis: int, width: int) -> list[int]:
        """Variants by bands of ``width`` along ``axis`` (0: layers, 1: positions), the other axis inside."""
        return sorted(range(len(cells)), key=lambda v: (rank[cells[v][axis]] // width, cells[v][1 - axis],
                                                        cells[v][axis], v))

    candidates = [banded(layer_rank, 0, width) for width in _band_widths(len(layer_rank))]
    candidates += [banded(token_rank, 1, width) for width in _band_widths(len(token_rank))]
    if not candidates:
        return []
    costs = [float(chunk_work(order, cells, pairs, chunk, runs, tokens, cut).sum()) for order in candidates]
    return candidates[min(range(len(costs)), key=costs.__getitem__)]


def work_floor(cells: Sequence[tuple[int, int]], layers: int, tokens: int) -> float:
    """The least work a patch needs, as a fraction of one forward (mean over the cells): a patch at (l, p)
    changes nothing before layer l or before position p, so (L − l)(T − p) / (L·T) of the forward is new."""
    if not cells:
        return 0.0
    return sum((layers - layer) * (tokens - token) for layer, token in cells) / (len(cells) * layers * tokens)
