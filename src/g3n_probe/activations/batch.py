"""An activation cache: the values of chosen points for one batch, in one trace.

Names are the table's (`g3n_probe.points.TABLE`, the layer stacks ``input`` and ``output`` included):
``"layers.3.altup_predict"`` for one layer, ``"altup_predict"`` for every selected layer, and the
model-level names as they are (``"ple_tokens"``, ``"logits"``). Values keep the point's layout
([S,B,T,D] stacks stay stacks); ``positions`` selects along the token axis (the query axis for
``attn_pattern``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ..points import BY_NAME, MODEL, TABLE, Point, concrete_shape, in_execution_order, split_qualified


class ActivationCache(dict):
    """``name -> tensor``, with the bytes it holds and the token ids it was computed on.

    TransformerLens' cache helpers work on it with our names and layouts: `stack_activation`,
    `accumulated_resid` (the layers' stream stacks ``[S,B,T,D]``, not one residual stream), `decompose_resid`
    (exact through AltUp, for a target); `apply_ln_to_stack` is refused, saying why."""

    #: ``g3n.decompose``, set by `g3n_probe.analysis.decompose` (the layer above this one) when it is imported.
    decomposer: Callable | None = None

    def __init__(self, values: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 model: Any = None) -> None:
        super().__init__(values)
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.model = model   # for decompose_resid; not pickled

    def __getstate__(self) -> dict:
        return {**self.__dict__, "model": None}

    def stack_activation(self, name: str) -> torch.Tensor:
        """``[L, ...]``: the per-layer point ``name`` (``"mlp_out"``) of every cached layer, in layer order
        (TransformerLens' ``stack_activation``)."""
        layers = sorted(layer for layer, base in (split_qualified(key) for key in self) if base == name and layer is not None)
        if not layers:
            raise KeyError(f"no layer's {name!r} is in this cache; it holds {', '.join(self)}")
        return torch.stack([self[f"layers.{layer}.{name}"] for layer in layers])

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          return_labels: bool = False) -> Any:
        """``[layer + 1, S, B, T, D]``: the stream stacks entering layers 0..``layer`` (``layer`` = L, the default:
        the last layer's output in place of the L-th), TransformerLens' ``accumulated_resid`` with Gemma 3n's
        AltUp stacks for its single residual stream (stream 0 is the active one; ``model.lens`` reads a stack
        out). Needs the layers' ``input``/``output`` cached (``run_with_cache`` caches every point by default)."""
        if incl_mid:
            raise ValueError("incl_mid: resid_mid is one stream [B,T,D] (the active one, inside the layer), not a "
                             "stack [S,B,T,D]: it cannot be stacked with the layers' inputs; read it from the cache")
        if apply_ln:
            self.apply_ln_to_stack(None)
        count = self.model.text_config.num_hidden_layers if self.model is not None else \
            1 + max(split_qualified(key)[0] or 0 for key in self)
        layer = count if layer is None else layer
        if not 0 <= layer <= count:
            raise ValueError(f"layer {layer} out of range: 0..{count} ({count} = after the last layer)")
        labels = [f"layers.{i}.input" for i in range(min(layer + 1, count))] + \
            ([f"layers.{count - 1}.output"] if layer == count else [])
        missing = [label for label in labels if label not in self]
        if missing:
            raise KeyError(f"accumulated_resid needs {missing} in the cache: cache the layers' 'input' and 'output'")
        stacked = torch.stack([self[label] for label in labels])
        return (stacked, labels) if return_labels else stacked

    def decompose_resid(self, target: Any, layer: int | None = None, positions: Any = None) -> Any:
        """The exact decomposition of the stack entering layer ``layer`` (None or L: the last layer's output)
        along ``target`` (a vector ``[D]`` on every stream, or ``[S, D]``) into the components written before
        it: ``g3n.decompose(model, inputs, target, at=...)`` on this cache's inputs (TransformerLens'
        ``decompose_resid``, which returns vectors: through AltUp a component's write is not one vector on one
        stream, so this returns each component's exact contribution to the target, a `Decomposition`)."""
        if self.model is None or ActivationCache.decomposer is None:
            raise ValueError("this cache does not know its model (it was unpickled or built by hand): use "
                             "g3n.decompose(model, cache.input_ids, target, at='layers.<i>.input')")
        count = self.model.text_config.num_hidden_layers
        layer = count if layer is None else layer
        if not 0 <= layer <= count:
            raise ValueError(f"layer {layer} out of range: 0..{count} ({count} = after the last layer)")
        at = f"layers.{layer}.input" if layer < count else f"layers.{count - 1}.output"
        inputs = self.input_ids if self.attention_mask is None else \
            {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        return ActivationCache.decomposer(self.model, inputs, target, positions=positions, at=at)

    def apply_ln_to_stack(self, residual_stack: Any, layer: int | None = None, **kwargs: Any) -> Any:
        """Refused: TransformerLens scales a stack of residual vectors by the final LayerNorm's scale, one vector
        per component. Gemma 3n's final norm reads neither a stack nor a component: after the last layer streams
        1..3 pass their unembed projections, are rescaled to stream 0's magnitude and averaged, and the norm
        reads that mean. `g3n.decompose` freezes exactly those scales (each component's exact share of a logit);
        ``model.lens(stack)`` applies the whole readout to a stack."""
        raise NotImplementedError(
            "apply_ln_to_stack has no Gemma 3n equivalent: the final norm reads the mean of the four AltUp streams "
            "after their unembed projections and rescale, not a residual stream. Use g3n.decompose(model, inputs, "
            "target) for each component's exact share of a logit (the scales frozen), or model.lens(stack) for "
            "logits from a stack")

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values())

    def __repr__(self) -> str:
        lines = [f"ActivationCache({len(self)} tensors, {self.nbytes / 1024**2:.2f} MiB)"]
        lines += [f"  {name}: {list(v.shape)} {v.dtype}" for name, v in self.items()]
        return "\n".join(lines)


def valid_names() -> list[str]:
    return [p.name for p in TABLE]


def _layer_list(name: str, n_layers: int, selected: list[int]) -> tuple[str, list[int]]:
    """(row name, layers) for ``"layers.<i>.<name>"`` (one layer) or ``"<name>"`` (every selected layer)."""
    layer, base = split_qualified(name)
    if layer is None:
        return name, selected
    if not 0 <= layer < n_layers:
        raise ValueError(f"{name}: layer {layer} out of range: this model has layers 0..{n_layers - 1}")
    return base, [layer]


def select(model: Any, points: Sequence[str] | Callable[[str], bool], layers: Iterable[int] | None = None
           ) -> list[tuple[str, Point, int | None]]:
    """(cache key, row, layer) in execution order; a clear error for unknown names or layers.

    ``points`` may be a name filter instead of names (TransformerLens' ``names_filter``): it is called with
    every qualified name this model has (``"embed"``, ``"layers.3.mlp_out"``, ``"layers.3.output"``; points
    that never fire here, such as ``attn_pattern`` under sdpa, are not offered) and keeps those it is true for."""
    n_layers = model.text_config.num_hidden_layers
    selected = list(range(n_layers)) if layers is None else sorted(set(layers))
    bad_layers = [i for i in selected if not 0 <= i < n_layers]
    if bad_layers:
        raise ValueError(f"layers {bad_layers} out of range: this model has layers 0..{n_layers - 1}")
    if callable(points):
        points = _filtered(model, points, selected)
    wanted: set[tuple[Point, int | None]] = set()
    for name in points:
        base, layer_list = _layer_list(name, n_layers, selected)
        point = BY_NAME.get(base)
        if point is None:
            raise ValueError(f"unknown point {name!r}; valid names: {', '.join(valid_names())} "
                             "(per layer as 'layers.<i>.<name>' or for every selected layer as '<name>')")
        wanted.update([(point, None)] if point.scope == MODEL else [(point, i) for i in layer_list])
    return [(point.qualified(layer), point, layer) for point, layer in in_execution_order(wanted)]


def _filtered(model: Any, names_filter: Callable[[str], bool], selected: list[int]) -> list[str]:
    """Every qualified name available in ``model`` (at the ``selected`` layers) that ``names_filter`` keeps."""
    offered = [(point, None) for point in TABLE if point.scope == MODEL]
    offered += [(point, i) for i in selected for point in TABLE if point.scope != MODEL]
    available = [point.qualified(layer) for point, layer in offered if model.injection.unavailable(point, layer) is None]
    kept = [name for name in available if names_filter(name)]
    if not kept:
        raise ValueError("the name filter kept no point: it is called with qualified names such as "
                         f"{', '.join(repr(n) for n in available[:3])}, …")
    return kept


_INPUT_FORMS = ("a text, a list of texts, token ids (an integer tensor [T] or [B, T], a list of ids or a list of "
                "id lists of one length), or a tokenizer's output (a dict or BatchEncoding with input_ids and, "
                "optionally, attention_mask)")
_IGNORED_KEYS = frozenset({"token_type_ids"})   # a tokenizer's output for text: all zeros, nothing to honour


def encode_inputs(model: Any, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one input resolver of every entry point (``cache``, `decompose`, ``patching.sweep``/``attribution``,
    ``logit_lens``): token ids ``[B, T]`` and the attention mask (None where every token is real and none was
    given).

    Accepted: a text or a list/tuple of texts (tokenized, padded on the tokenizer's side, mask kept); token
    ids as an integer tensor ``[T]``/``[B, T]``, a list of ints or a list of equally long id lists; a dict or
    ``BatchEncoding`` with ``input_ids`` (any of those id forms) and optionally ``attention_mask`` (honoured,
    same shape). Anything else is a `TypeError`; an empty input (``[]``, ``""``, no tokens) a `ValueError`.
    """
    if isinstance(inputs, Mapping):
        return _from_mapping(model, inputs)
    if isinstance(inputs, str):
        return _tokenize(model, [inputs])
    if isinstance(inputs, torch.Tensor):
        return _id_tensor(inputs), None
    if isinstance(inputs, (list, tuple)):
        if len(inputs) == 0:
            raise ValueError(f"the input is empty ({inputs!r}): give {_INPUT_FORMS}")
        if all(isinstance(item, str) for item in inputs):
            return _tokenize(model, list(inputs))
        return _id_lists(inputs), None
    raise TypeError(f"an input of type {type(inputs).__name__} is not understood: give {_INPUT_FORMS}")


def _tokenize(model: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    empty = [i for i, text in enumerate(texts) if not text]
    if empty:
        where = "" if len(texts) == 1 else f" (texts {empty})"
        raise ValueError(f"the input text is empty (''){where}: give at least one character of text, or token ids")
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer, so it takes token ids (an integer tensor [batch, tokens]), "
                         "not text: pass tokenizer=... to g3n.load or Gemma3nProbe")
    encoded = model.tokenizer(texts, return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"]


def _id_tensor(ids: torch.Tensor, what: str = "token ids") -> torch.Tensor:
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{what} as an input must be an integer tensor; got {ids.dtype}: give {_INPUT_FORMS}")
    if ids.dim() not in (1, 2):
        raise ValueError(f"{what} must be [T] or [B, T]; got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{what} are empty (shape {tuple(ids.shape)}): give at least one token")
    return (ids if ids.dim() == 2 else ids[None]).long()


def _is_id(item: Any) -> bool:
    return isinstance(item, int) and not isinstance(item, bool)


def _id_lists(items: Any, what: str = "token ids") -> torch.Tensor:
    """A list of ints (one sequence) or of equally long id lists/tensors (rows) as ``[B, T]``."""
    if len(items) == 0:
        raise ValueError(f"the input is empty ({items!r}): give {_INPUT_FORMS}")
    if all(_is_id(item) for item in items):
        return torch.tensor([list(items)], dtype=torch.long)
    rows = []
    for row in items:
        if isinstance(row, torch.Tensor) and row.dim() == 1 and not (row.is_floating_point() or row.dtype == torch.bool):
            row = row.tolist()
        if not isinstance(row, (list, tuple)) or not all(_is_id(t) for t in row):
            raise TypeError(f"a list input holds texts, ids or id lists, all of one kind; found "
                            f"{type(row).__name__} {row!r:.40} among them: give {_INPUT_FORMS}")
        rows.append(list(row))
    lengths = sorted({len(row) for row in rows})
    if lengths == [0]:
        raise ValueError(f"the id lists are empty ({items!r}): give at least one token")
    if len(lengths) > 1:
        raise ValueError(f"{what}: the id lists have different lengths ({[len(r) for r in rows]}); pad them and give "
                         "a dict with input_ids and attention_mask (or a tokenizer's output)")
    return torch.tensor(rows, dtype=torch.long)


def _from_mapping(model: Any, inputs: Mapping) -> tuple[torch.Tensor, torch.Tensor | None]:
    keys = list(inputs.keys())
    if "input_ids" not in inputs:
        raise TypeError(f"a dict input needs 'input_ids' (a tokenizer's output); it has {keys}")
    other = [k for k in keys if k not in ("input_ids", "attention_mask") and k not in _IGNORED_KEYS]
    if other:
        raise TypeError(f"a dict input may hold input_ids and attention_mask; {other} cannot be honoured here")
    raw = inputs["input_ids"]
    if isinstance(raw, torch.Tensor):
        ids = _id_tensor(raw, "input_ids")
    elif isinstance(raw, (list, tuple)):
        ids = _id_lists(raw, "input_ids")
    else:
        raise TypeError(f"input_ids must be token ids (a tensor or lists of ints); got {type(raw).__name__}")
    mask = inputs.get("attention_mask")
    if mask is None:
        return ids, None
    mask = torch.as_tensor(mask)
    if mask.dim() == 1:
        mask = mask[None]
    if mask.is_floating_point() or tuple(mask.shape) != tuple(ids.shape) or bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"attention_mask must be 0/1 of the shape of input_ids {tuple(ids.shape)}; got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if not bool(mask.any(1).all()):
        raise ValueError("attention_mask masks every token of a row: each row needs at least one real token")
    return ids, mask.long().to(ids.device)


def estimate_bytes(model: Any, resolved: list, batch: int, tokens: int, positions: Sequence[int] | None,
                   dtype: torch.dtype) -> dict[str, int]:
    sizes = {}
    for key, point, layer in resolved:
        shape = list(concrete_shape(point, model.text_config, batch, tokens, layer or 0))
        if positions is not None:
            shape[point.axis("T")] = len(positions)
        sizes[key] = math.prod(shape) * dtype.itemsize
    return sizes


def collect(model: Any, inputs: Any, points: Sequence[str] | Callable[[str], bool], layers: Iterable[int] | None = None,
          positions: Sequence[int] | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
          max_bytes: int | None = None, verbose: bool = True) -> ActivationCache:
    """Run ``inputs`` once and return the chosen points' values, moved to ``device``/``dtype``.

    States the bytes it will hold before running, and refuses (``MemoryError``) when that exceeds
    ``max_bytes``. See the module docstring for names and ``positions``.
    """
    resolved = select(model, points, layers)
    check_available(model, resolved)
    ids, mask = encode_inputs(model, inputs)
    batch, tokens = ids.shape
    if positions is not None:
        positions = [int(p) for p in positions]
        bad = [p for p in positions if not -tokens <= p < tokens]
        if bad:
            raise ValueError(f"positions {bad} fall outside the sequence of {tokens} tokens")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch dtype (values are cast to it, never quantised); "
                        f"got {dtype!r}")
    dtype = dtype or model.hf_model.dtype
    sizes = estimate_bytes(model, resolved, batch, tokens, positions, dtype)
    total = sum(sizes.values())
    if verbose:
        print(f"cache: {len(resolved)} tensors, {total / 1024**2:.2f} MiB ({batch}×{tokens} tokens, {dtype})")
    if max_bytes is not None and total > max_bytes:
        raise MemoryError(f"the cache would hold {total:,} bytes ({total / 1024**2:.1f} MiB), over max_bytes={max_bytes:,}; "
                          "choose fewer points, layers or positions")
    index = None if positions is None else torch.tensor([p % tokens for p in positions])
    if index is not None and mask is not None:
        padded = {int(p): (mask[:, p % tokens] == 0).nonzero().flatten().tolist() for p in positions}
        padded = {p: rows for p, rows in padded.items() if rows}
        if padded:
            warnings.warn(
                "positions " + "; ".join(f"{p} is padding in rows {rows}" for p, rows in padded.items())
                + ": texts are padded on the left, so count positions from the end (-1 is every row's last token)",
                stacklevel=2,
            )
    saved: dict[str, Any] = {}
    with torch.no_grad(), model.trace(ids if mask is None else {"input_ids": ids, "attention_mask": mask}):
        for key, point, layer in resolved:
            value = point.read(model, layer)
            if index is not None:
                value = value.index_select(point.axis("T"), index.to(value.device))
            saved[key] = value.detach().to(device=device, dtype=dtype).save()
    return ActivationCache(dict(saved), ids, mask, model)


def check_available(model: Any, resolved: list[tuple[str, Point, int | None]]) -> None:
    """Raise naming the first point that never fires in this model (``attn_pattern`` under sdpa)."""
    for _, point, layer in resolved:
        reason = model.injection.unavailable(point, layer)
        if reason:
            raise ValueError(reason)
