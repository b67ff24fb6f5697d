"""How good an SAE is on a point: reconstruction (FVU, L0, dead latents) and what splicing it costs the model
(next-token loss clean, spliced without its error term, and with the point mean-ablated); and which inputs
make a feature fire most (from an `ActivationDataset`).

``<bos>`` follows the package's one rule (`g3n_probe.sae.tokens`): with ``include_bos=False`` (the default,
as training does) its positions are neither spliced (the value passes through unchanged there) nor counted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .._compat import module_of
from ..activations.activation_dataset import ActivationDataset
from .splice import Dense, spliced
from .tokens import bos_id, token_mask


@dataclass
class Evaluation:
    """An SAE on one point over some texts. Losses are mean next-token cross-entropy (nats) over real tokens.

    ``loss_recovered`` = (mean-ablated − spliced) / (mean-ablated − clean): 1 when splicing costs nothing,
    0 when the SAE is no better than the point's mean. ``include_bos``: whether ``<bos>`` positions were
    spliced and counted (see `g3n_probe.sae.tokens`)."""

    point: str
    stream: int | None
    tokens: int
    fvu: float
    l0: float
    dead: int
    latents: int
    loss_clean: float
    loss_spliced: float
    loss_mean_ablated: float
    include_bos: bool = False

    @property
    def loss_recovered(self) -> float:
        gap = self.loss_mean_ablated - self.loss_clean
        return (self.loss_mean_ablated - self.loss_spliced) / gap if gap else float("nan")

    def __str__(self) -> str:
        where = self.point + ("" if self.stream is None else f" stream {self.stream}")
        bos = "<bos> included" if self.include_bos else "<bos> excluded"
        return (f"{where} over {self.tokens:,} tokens ({bos}): FVU {self.fvu:.3f}, L0 {self.l0:.1f}, dead latents "
                f"{self.dead}/{self.latents}; next-token loss clean {self.loss_clean:.3f}, spliced "
                f"{self.loss_spliced:.3f}, mean-ablated {self.loss_mean_ablated:.3f} "
                f"(loss recovered {self.loss_recovered:.1%})")


class MeanAblation:
    """An 'SAE' with one dead latent whose reconstruction is always ``mean``: splicing it (``error=False``)
    mean-ablates the point."""

    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], 1)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.mean.to(f.dtype).expand(f.shape[0], -1)


class SpliceStats:
    """Running sums over the real tokens a splice sees: the target, its square, the error, the latents."""

    def __init__(self, every_stream: bool) -> None:
        self.every_stream = every_stream
        self.n, self.total, self.square, self.error, self.l0 = 0, None, 0.0, 0.0, 0.0
        self.fired: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.target: torch.Tensor | None = None
        self.source: torch.Tensor | None = None

    def add(self, reconstruction: torch.Tensor, features: torch.Tensor) -> None:
        rows = self.rows(self.target).double()
        self.n += rows.shape[0]
        self.total = rows.sum(0) if self.total is None else self.total + rows.sum(0)
        self.square += float(rows.pow(2).sum())
        self.error += float((rows - self.rows(reconstruction).double()).pow(2).sum())
        active = self.rows(features) != 0
        self.l0 += float(active.sum())
        fired = active.any(0)
        self.fired = fired if self.fired is None else self.fired | fired

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.n

    @property
    def fvu(self) -> float:
        variance = self.square - float(self.total.pow(2).sum()) / self.n
        return self.error / variance


    def rows(self, value: torch.Tensor) -> torch.Tensor:
        """[B,T,…,X] (or [S,B,T,X] for every stream of a stack) → the real tokens' rows [n, X]."""
        if self.every_stream:
            value = value.movedim(0, 2)
        return value[self.mask.bool().to(value.device)].reshape(-1, value.shape[-1])


def capture_target(stats: SpliceStats, splice: nn.Module, module: nn.Module, args: tuple) -> None:
    source, target = args
    stats.source = source if splice.stream is None else source[splice.stream]
    stats.target = target if splice.stream is None else target[splice.stream]


def capture_features(stats: SpliceStats, splice: nn.Module, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    with torch.no_grad():
        stats.add(splice.reconstruct(output, stats.target, stats.source), output)


def evaluate(model: Any, texts: Sequence[str], point: str, sae: Any, *, stream: int | None = None,
             batch_size: int = 8, include_bos: bool = False) -> Evaluation:
    """FVU, L0 and dead latents of ``sae`` on ``point`` over ``texts``, and the next-token loss clean, with the
    SAE spliced in without its error term, and with the point mean-ablated (its mean over these texts).

    ``point`` as for `spliced` (``"layers.<i>.mlp"`` for a transcoder); ``stream=k`` for one stream of a stack.
    ``include_bos=False`` (default, as `train` trains): ``<bos>`` positions are neither spliced nor
    mean-ablated (the value passes through unchanged there) and not counted in FVU, L0, dead latents, the mean
    or the losses (no prediction made at ``<bos>``); True splices and counts them like any token."""
    coder = Dense(sae)
    batches = text_batches(model, texts, batch_size, include_bos)
    with spliced(model, point, coder, error=True, stream=stream) as envoy:
        splice = module_of(envoy)
        if splice.stack and stream is None:
            # one mean over all four streams would mean-ablate each stream with the others' average
            raise ValueError(f"{point} is a stream stack: evaluate one stream at a time (stream=0..S-1), so the "
                             "mean ablation uses that stream's own mean")
        stats = SpliceStats(every_stream=False)
        handles = [splice.register_forward_pre_hook(functools.partial(capture_target, stats, splice)),
                   splice.features.register_forward_hook(functools.partial(capture_features, stats, splice))]
        try:
            clean = next_token_loss(model, batches, [splice], [stats])
        finally:
            for handle in handles:
                handle.remove()
    with spliced(model, point, coder, error=False, stream=stream) as envoy:
        with_sae = next_token_loss(model, batches, [module_of(envoy)])
    with spliced(model, point, MeanAblation(stats.mean.float()), error=False, stream=stream) as envoy:
        ablated = next_token_loss(model, batches, [module_of(envoy)])
    latents = int(stats.fired.numel())
    return Evaluation(point, stream, stats.n, stats.fvu, stats.l0 / stats.n, latents - int(stats.fired.sum()), latents,
                      clean, with_sae, ablated, include_bos)


@dataclass
class Batch:
    """Token ids, the attention mask, and ``counted``: the positions spliced and counted (real tokens, and
    ``<bos>`` only with ``include_bos``)."""

    ids: torch.Tensor
    attention: torch.Tensor
    counted: torch.Tensor


def text_batches(model: Any, texts: Sequence[str], batch_size: int, include_bos: bool = False) -> list[Batch]:
    if model.tokenizer is None:
        raise ValueError("evaluate tokenizes its texts, and this model has no tokenizer")
    if isinstance(texts, str) or not len(texts):
        raise ValueError("texts must be a non-empty list of strings")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    out = []
    bos = bos_id(model.tokenizer)
    for start in range(0, len(texts), batch_size):
        encoded = model.tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True)
        ids, attention = encoded["input_ids"], encoded["attention_mask"]
        out.append(Batch(ids, attention, token_mask(ids, bos, include_bos, attention)))
    if not any(bool(b.counted[:, :-1].any()) for b in out):
        raise ValueError("these texts have no token to count (each is at most its <bos>)")
    return out


def next_token_loss(model: Any, batches: list[Batch], splices: Sequence[Any] = (), stats: Sequence[Any] = ()) -> float:
    """Mean next-token cross-entropy over the predictions made at counted positions (`Batch.counted`) of
    real next tokens, positions counted from each text's first token. Each of ``splices`` is told the
    positions to splice (``Splice.keep``) for the batch, and each of ``stats`` which rows count."""
    hf = model.hf_model
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                ids, mask = batch.ids, batch.attention
                for running in stats:
                    running.mask = batch.counted
                for splice in splices:
                    splice.keep = batch.counted
                device = hf.device
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = hf(input_ids=ids.to(device), attention_mask=mask.to(device),
                            position_ids=positions.to(device), use_cache=False).logits.float()
                keep = (batch.counted[:, :-1] & mask[:, 1:].bool()).to(device)
                losses = torch.nn.functional.cross_entropy(logits[:, :-1][keep], ids[:, 1:].to(device)[keep],
                                                           reduction="sum")
                total, count = total + float(losses), count + int(keep.sum())
    finally:
        for splice in splices:
            splice.keep = None
    return total / count


@dataclass
class TopActivations:
    """For each feature asked for, its ``k`` largest activations over a dataset and the rows they are at."""

    features: list[int]
    values: torch.Tensor  # [len(features), k]
    rows: torch.Tensor  # [len(features), k] row indices of the dataset
    dataset: ActivationDataset

    def contexts(self, tokenizer: Any, feature: int, before: int = 10, after: int = 1) -> list[tuple[float, str]]:
        """(activation, text) for ``feature``'s top rows: the tokens around each, the firing one in ⟦ ⟧."""
        j = self.features.index(feature)
        out = []
        for value, row in zip(self.values[j].tolist(), self.rows[j].tolist()):
            ids = self.dataset.tokens(int(self.dataset.text_index[row]))
            p = int(self.dataset.positions[row])
            left = tokenizer.decode(ids[max(0, p - before):p])
            here = tokenizer.decode(ids[p:p + 1])
            right = tokenizer.decode(ids[p + 1:p + 1 + after])
            out.append((value, f"{left}⟦{here}⟧{right}"))
        return out


def top_activations(dataset: ActivationDataset, sae: Any, features: Sequence[int] | None = None, k: int = 5,
                    batch_size: int = 1024, include_bos: bool = False, bos: Any = 2) -> TopActivations:
    """The ``k`` rows of ``dataset`` (rows ``[N, D]``: pick a stream of a stack) where each feature fires most.

    ``include_bos=False`` (default, as `train` trains): rows at a ``<bos>`` token are never among them
    (``bos``: its id, or the model's tokenizer; 2 by default, ``<bos>`` in every Gemma 3n tokenizer)."""
    coder = Dense(sae)
    row_counts = _row_filter(dataset, include_bos, bos)
    best_values: torch.Tensor | None = None
    best_rows: torch.Tensor | None = None
    seen = 0
    with torch.no_grad():
        for batch in dataset.batches(batch_size):
            if batch.x.dim() != 2:
                raise ValueError(f"top_activations needs rows [N, D]; this dataset's are {list(batch.x.shape[1:])}: "
                                 "pick a stream (ActivationDataset(..., stream=k))")
            f = coder.encode(coder.prepare(batch.x)).float()
            chosen = f if features is None else f[:, list(features)]
            if row_counts is not None:
                chosen = chosen.masked_fill(~row_counts(batch)[:, None], float("-inf"))
            rows = torch.arange(seen, seen + len(f)).expand(chosen.shape[1], -1)
            values = chosen.T
            if best_values is not None:
                values, rows = torch.cat([best_values, values], 1), torch.cat([best_rows, rows], 1)
            top = values.topk(min(k, values.shape[1]), dim=1)
            best_values, best_rows = top.values, rows.gather(1, top.indices)
            seen += len(f)
    listed = list(range(best_values.shape[0])) if features is None else list(features)
    return TopActivations(listed, best_values, best_rows, dataset)


def _row_filter(dataset: ActivationDataset, include_bos: bool, bos: int | None) -> Any:
    """None (every row counts), or a function of a `Rows` batch giving which of its rows count: not at a
    ``<bos>`` token (the dataset's token ids at each row's text and position, through `token_mask`)."""
    if include_bos:
        return None
    bos = bos if isinstance(bos, int) or bos is None else bos_id(bos)
    cache: dict[int, torch.Tensor] = {}

    def counts(batch: Any) -> torch.Tensor:
        ids = torch.empty(len(batch.text), dtype=torch.long)
        for i, (text, position) in enumerate(zip(batch.text.tolist(), batch.position.tolist())):
            if text not in cache:
                cache[text] = dataset.tokens(text)
            ids[i] = cache[text][position]
        return token_mask(ids, bos, include_bos=False)
    return counts
