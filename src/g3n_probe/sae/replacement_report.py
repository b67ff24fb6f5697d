"""What a replacement model keeps: `evaluate_replacement` measures transcoders across a model's MLPs.

Per layer (that layer's MLP alone replaced) and all together: next-token loss clean, replaced by the
transcoders without their error terms, and with the MLPs mean-ablated (each output site set to its mean over
the texts), and the fraction kept, ``(ablated − replaced) / (ablated − clean)``; per layer also FVU, L0 and
dead latents of the transcoder on the clean model's activations. ``<bos>`` follows the package's one rule
(`g3n_probe.sae.tokens`): excluded by default, its positions neither replaced nor counted.
"""

from __future__ import annotations

import functools
import io
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from .evaluate import MeanAblation, SpliceStats, capture_features, capture_target, next_token_loss, text_batches
from .replaced import attached, check_placement
from .transcoders import as_transcoder_set


def _kept(clean: float, replaced: float, ablated: float) -> float:
    gap = ablated - clean
    return (ablated - replaced) / gap if gap else float("nan")


@dataclass
class LayerReplacement:
    """One layer's transcoder: reconstruction on the clean model, and the loss with that MLP alone replaced
    (no error term) or mean-ablated."""

    layer: int
    fvu: float
    l0: float
    dead: int
    latents: int
    loss_replaced: float
    loss_ablated: float
    loss_clean: float

    @property
    def loss_kept(self) -> float:
        """(ablated − replaced) / (ablated − clean): 1 when replacing costs nothing, 0 when no better than the mean."""
        return _kept(self.loss_clean, self.loss_replaced, self.loss_ablated)


@dataclass
class ReplacementReport:
    """`evaluate_replacement`'s result: ``layers[i]`` per layer, and every given MLP replaced together."""

    tokens: int
    include_bos: bool
    output_hook: str
    loss_clean: float
    loss_replaced: float
    loss_ablated: float
    layers: dict[int, LayerReplacement] = field(default_factory=dict)

    @property
    def loss_kept(self) -> float:
        """The fraction of the loss kept with every given MLP replaced at once."""
        return _kept(self.loss_clean, self.loss_replaced, self.loss_ablated)

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers (for JSON): the totals and one entry per layer, each with its ``loss_kept``."""
        out = {key: value for key, value in asdict(self).items() if key != "layers"}
        out["loss_kept"] = self.loss_kept
        out["layers"] = {str(layer): {**asdict(row), "loss_kept": row.loss_kept} for layer, row in self.layers.items()}
        return out

    def __rich__(self) -> Any:
        bos = "included" if self.include_bos else "excluded"
        table = Table(title=f"transcoders replacing MLPs ({self.output_hook}) over {self.tokens:,} tokens, <bos> {bos}; "
                            f"loss clean {self.loss_clean:.3f}")
        for column in ("layer", "FVU", "L0", "dead", "loss replaced", "loss mean-ablated", "loss kept"):
            table.add_column(column, justify="right")
        for layer, row in self.layers.items():
            table.add_row(str(layer), f"{row.fvu:.3f}", f"{row.l0:.1f}", f"{row.dead}/{row.latents}",
                          f"{row.loss_replaced:.3f}", f"{row.loss_ablated:.3f}", f"{row.loss_kept:.1%}")
        table.add_row("all", "", "", "", f"{self.loss_replaced:.3f}", f"{self.loss_ablated:.3f}", f"{self.loss_kept:.1%}")
        return table

    def __str__(self) -> str:
        console = Console(width=120, record=True, file=io.StringIO())
        console.print(self)
        return console.export_text()


def evaluate_replacement(model: Any, texts: Sequence[str], transcoders: Any, *, include_bos: bool = False,
                         batch_size: int = 8) -> ReplacementReport:
    """Measure ``transcoders`` (a directory, a `TranscoderSet` or a mapping ``layer -> Transcoder``) on ``model``
    over ``texts``: see the module doc. Checked against the model (layers, widths, device) and the texts before
    any forward. ``include_bos=False`` (default, as training does): ``<bos>`` positions are neither replaced
    nor mean-ablated (the MLP's output passes through unchanged there) and not counted in FVU, L0, dead latents,
    the means or the losses; True replaces and counts them like any token. Renders as a table (``print``)."""
    chosen = as_transcoder_set(transcoders, model)
    check_placement(model, chosen)
    batches = text_batches(model, texts, batch_size, include_bos)
    point = chosen.output_point
    layers = list(chosen)
    stats = {layer: SpliceStats(every_stream=False) for layer in layers}
    with attached(model, {layer: chosen[layer] for layer in layers}, point, error=True) as done:
        splices = {layer: a.splice for layer, a in done.items()}
        handles = []
        for layer, splice in splices.items():
            handles.append(splice.register_forward_pre_hook(functools.partial(capture_target, stats[layer], splice)))
            handles.append(splice.features.register_forward_hook(
                functools.partial(capture_features, stats[layer], splice)))
        try:
            clean = next_token_loss(model, batches, list(splices.values()), list(stats.values()))  # error terms on: the clean model
        finally:
            for handle in handles:
                handle.remove()
    means = {layer: MeanAblation(stats[layer].mean.float()) for layer in layers}

    def loss_with(coders: dict[int, Any]) -> float:
        with attached(model, coders, point, error=False) as done:
            return next_token_loss(model, batches, [a.splice for a in done.values()])

    rows = {}
    for layer in layers:
        s = stats[layer]
        latents = int(s.fired.numel())
        rows[layer] = LayerReplacement(layer, s.fvu, s.l0 / s.n, latents - int(s.fired.sum()), latents,
                                       loss_with({layer: chosen[layer]}), loss_with({layer: means[layer]}), clean)
    return ReplacementReport(stats[layers[0]].n, bool(include_bos), chosen.output_hook, clean,
                             loss_with({layer: chosen[layer] for layer in layers}), loss_with(means), rows)
