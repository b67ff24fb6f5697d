"""How good an SAE is on a point: reconstruction (FVU, L0, dead latents) and what splicing it costs the model
(next-token loss clean, spliced without its error term, and with the point mean-ablated); and which inputs
make a feature fire most (from an `ActivationDataset`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .._compat import module_of
from ..reader import ActivationDataset
from .splice import Dense, spliced


@dataclass
class Evaluation:
    """An SAE on one point over some texts. Losses are mean next-token cross-entropy (nats) over real tokens.

    ``loss_recovered`` = (mean-ablated − spliced) / (mean-ablated − clean): 1 when splicing costs nothing,
    0 when the SAE is no better than the point's mean."""

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

    @property
    def loss_recovered(self) -> float:
        gap = self.loss_mean_ablated - self.loss_clean
        return (self.loss_mean_ablated - self.loss_spliced) / gap if gap else float("nan")

    def __str__(self) -> str:
        where = self.point + ("" if self.stream is None else f" stream {self.stream}")
        return (f"{where} over {self.tokens:,} tokens: FVU {self.fvu:.3f}, L0 {self.l0:.1f}, dead latents "
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


class _Stats:
    """Running sums over the real tokens a splice sees: the target, its square, the error, the latents."""

    def __init__(self, every_stream: bool) -> None:
        self.every_stream = every_stream
        self.n, self.total, self.square, self.error, self.l0 = 0, None, 0.0, 0.0, 0.0
        self.fired: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.target: torch.Tensor | None = None

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


def _capture_target(stats: _Stats, splice: nn.Module, module: nn.Module, args: tuple) -> None:
    target = args[1]
    stats.target = target if splice.stream is None else target[splice.stream]


def _capture_features(stats: _Stats, splice: nn.Module, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    with torch.no_grad():
        stats.add(splice.reconstruct(output, stats.target), output)


def evaluate(model: Any, texts: Sequence[str], point: str, sae: Any, *, stream: int | None = None,
             batch_size: int = 8) -> Evaluation:
    """FVU, L0 and dead latents of ``sae`` on ``point`` over ``texts``, and the next-token loss clean, with the
    SAE spliced in without its error term, and with the point mean-ablated (its mean over these texts).

    ``point`` as for `spliced` (``"layers.<i>.mlp"`` for a transcoder); ``stream=k`` for one stream of a stack."""
    coder = Dense(sae)
    batches = _batches(model, texts, batch_size)
    with spliced(model, point, coder, error=True, stream=stream) as envoy:
        splice = module_of(envoy)
        if splice.stack and stream is None:
            # one mean over all four streams would mean-ablate each stream with the others' average
            raise ValueError(f"{point} is a stream stack: evaluate one stream at a time (stream=0..S-1), so the "
                             "mean ablation uses that stream's own mean")
        stats = _Stats(every_stream=False)
        handles = [splice.register_forward_pre_hook(functools.partial(_capture_target, stats, splice)),
                   splice.features.register_forward_hook(functools.partial(_capture_features, stats, splice))]
        try:
            clean = _loss(model, batches, stats)
        finally:
            for handle in handles:
                handle.remove()
    with spliced(model, point, coder, error=False, stream=stream):
        with_sae = _loss(model, batches)
    with spliced(model, point, MeanAblation(stats.mean.float()), error=False, stream=stream):
        ablated = _loss(model, batches)
    latents = int(stats.fired.numel())
    tokens = sum(int(mask.sum()) for _, mask in batches)
    return Evaluation(point, stream, tokens, stats.fvu, stats.l0 / stats.n, latents - int(stats.fired.sum()), latents,
                      clean, with_sae, ablated)


def _batches(model: Any, texts: Sequence[str], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if model.tokenizer is None:
        raise ValueError("evaluate tokenizes its texts, and this model has no tokenizer")
    out = []
    for start in range(0, len(texts), batch_size):
        encoded = model.tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True)
        out.append((encoded["input_ids"], encoded["attention_mask"]))
    return out


def _loss(model: Any, batches: list, stats: _Stats | None = None) -> float:
    """Mean next-token cross-entropy over real tokens, positions counted from each text's first token."""
    hf = model.hf_model
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in batches:
            if stats is not None:
                stats.mask = mask
            device = hf.device
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = hf(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                        use_cache=False).logits.float()
            keep = (mask[:, :-1] * mask[:, 1:]).bool().to(device)
            losses = torch.nn.functional.cross_entropy(logits[:, :-1][keep], ids[:, 1:].to(device)[keep], reduction="sum")
            total, count = total + float(losses), count + int(keep.sum())
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
                    batch_size: int = 1024) -> TopActivations:
    """The ``k`` rows of ``dataset`` (rows ``[N, D]``: pick a stream of a stack) where each feature fires most."""
    coder = Dense(sae)
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
            rows = torch.arange(seen, seen + len(f)).expand(chosen.shape[1], -1)
            values = chosen.T
            if best_values is not None:
                values, rows = torch.cat([best_values, values], 1), torch.cat([best_rows, rows], 1)
            top = values.topk(min(k, values.shape[1]), dim=1)
            best_values, best_rows = top.values, rows.gather(1, top.indices)
            seen += len(f)
    listed = list(range(best_values.shape[0])) if features is None else list(features)
    return TopActivations(listed, best_values, best_rows, dataset)
