"""How a `decompose.Decomposition` shows itself: a table of the top components per position (rich in a
terminal, HTML in a notebook) and a bar plot of one position's components stacked by AltUp stream."""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table


@dataclass
class DecompositionTable:
    """The ``k`` components with the largest contributions (by magnitude) at each position."""

    names: list[str]
    values: torch.Tensor      # [N, P], one batch row
    total: torch.Tensor       # [P]
    positions: list[int]
    tokens: list[str] | None
    k: int

    def _label(self, column: int) -> str:
        token = repr(self.tokens[column])[1:-1][:12] if self.tokens else ""
        return f"{self.positions[column]} {token}".strip()

    def _top(self, column: int) -> list[tuple[str, float]]:
        values = self.values[:, column]
        order = values.abs().argsort(descending=True)[: self.k]
        return [(self.names[int(i)], float(values[i])) for i in order]

    def __rich__(self) -> Table:
        table = Table(title="exact decomposition through AltUp: top components per position (pre-soft-cap)")
        table.add_column("position")
        table.add_column("total", justify="right")
        table.add_column("sum of components", justify="right")
        table.add_column("top components")
        for column in range(len(self.positions)):
            top = ", ".join(f"{name} {value:+.3f}" for name, value in self._top(column))
            table.add_row(self._label(column), f"{float(self.total[column]):+.3f}",
                          f"{float(self.values[:, column].sum()):+.3f}", top)
        return table

    def __str__(self) -> str:
        console = Console(width=200, record=True, file=io.StringIO())
        console.print(self)
        return console.export_text()

    __repr__ = __str__

    def _repr_html_(self) -> str:
        rows = []
        for column in range(len(self.positions)):
            top = self._top(column)
            scale = max(abs(value) for _, value in top) or 1.0
            cells = "".join(
                f'<td style="background: rgba({"66,133,244" if value > 0 else "219,68,55"},{abs(value) / scale:.2f})">'
                f"{html.escape(name)}<br><small>{value:+.3f}</small></td>" for name, value in top)
            rows.append(f"<tr><th>{html.escape(self._label(column))}</th><td>{float(self.total[column]):+.3f}</td>{cells}</tr>")
        return ("<table><caption>exact decomposition through AltUp (top components per position)</caption>"
                f"<tr><th>position</th><th>total</th><th colspan={self.k}>top components</th></tr>{''.join(rows)}</table>")


def plotted_column(positions: list[int], position: int) -> int:
    """The column of token position ``position`` among a decomposition's ``positions``; a negative one counts from
    the end of them (-1: the last decomposed position)."""
    if isinstance(position, bool) or not isinstance(position, int):
        raise TypeError(f"position must be an integer token position; got {position!r}")
    if position in positions:
        return positions.index(position)
    if -len(positions) <= position < 0:
        return position % len(positions)
    raise ValueError(f"position {position} was not decomposed: this decomposition holds positions {positions} "
                     "(negative counts from the end of them)")


def plot_decomposition(decomposition: Any, position: int = -1, row: int = 0, ax: Any = None) -> Any:
    """Every component's contribution at one position, one bar each, stacked by the AltUp stream it
    reaches the readout through; the dashed line is the total."""
    import matplotlib.pyplot as plt  # lazy: a heavy import only the plot needs

    column = plotted_column(decomposition.positions, position)
    by_stream = decomposition.by_stream[:, :, row, column].float()           # [N, S]
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(decomposition.names)), 3.5))
    else:
        fig = ax.figure
    bottom_pos = torch.zeros(by_stream.shape[0])
    bottom_neg = torch.zeros(by_stream.shape[0])
    for stream in range(by_stream.shape[1]):
        part = by_stream[:, stream]
        base = torch.where(part >= 0, bottom_pos, bottom_neg)
        ax.bar(range(len(part)), part.numpy(), bottom=base.numpy(), label=f"via stream {stream}")
        bottom_pos += part.clamp(min=0)
        bottom_neg += part.clamp(max=0)
    ax.axhline(float(decomposition.total[row, column]), color="gray", linestyle="--", linewidth=0.8, label="total")
    ax.set_xticks(range(len(decomposition.names)), decomposition.names, rotation=90, fontsize=7)
    ax.set_ylabel("contribution")
    ax.set_title(f"position {decomposition.positions[column]}: which component wrote it, and through which stream")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
