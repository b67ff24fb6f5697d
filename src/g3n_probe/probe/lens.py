"""The exact Gemma 3n readout, usable on any layer's stream stack (a logit lens through AltUp).

Gemma 3n does not read logits off one residual stream. After the last layer, streams 1..S-1 pass
through ``altup_unembed_projections``, each is rescaled to stream 0's RMS, the S streams are
averaged, and only then come the final norm, ``lm_head`` and the soft cap. A lens that reads
stream 0 alone (what a generic logit lens does) skips the merge and is silently wrong; `readout`
applies the model's own modules in the model's own order, and on the last layer's output it
reproduces the model's logits bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..checkpoint.module_tree import text_model


def stream_magnitudes(language_model: Any, stack: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The readout's rescale, as ``Gemma3nTextModel.forward`` computes it after its last layer: stream 0's
    RMS, and for each stream 1..S-1 its unembed projection and that projection's RMS (clamped)."""
    target_magnitude = torch.mean(stack[0] ** 2, dim=-1, keepdim=True) ** 0.5
    projections = []
    for i in range(1, stack.shape[0]):
        projected = language_model.altup_unembed_projections[i - 1](stack[i]).to(dtype=stack.dtype)
        magnitude = torch.sqrt(torch.mean(projected**2, dim=-1, keepdim=True).clamp(min=1e-5))
        projections.append((projected, magnitude))
    return target_magnitude, projections


def norm_scale(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """A Gemma 3n RMS norm's per-token factor on ``x`` in float32 — ``pow(mean(x²) + eps, -0.5)``, times its
    weight when it has one — so that ``norm(x) == x · norm_scale(norm, x)``: the scale an exact linear replay
    freezes."""
    scale = torch.pow(x.float().pow(2).mean(-1, keepdim=True) + norm.eps, -0.5)
    return scale * norm.weight.float() if getattr(norm, "with_scale", True) else scale


def stream_covectors(language_model: Any, stack: torch.Tensor, merged: torch.Tensor, u: torch.Tensor
                     ) -> list[torch.Tensor]:
    """The readout, frozen, read backwards: for a covector ``u`` on the final norm's output (``direction @
    W_U``), one float32 covector per stream of ``stack`` (``[S, ..., D]``, the last layer's output), with the
    final norm's scale frozen at ``merged`` (its input) and each stream's magnitude rescale frozen at ``stack``.
    ``u`` broadcasts against ``merged`` (``[..., D]``)."""
    g = u * norm_scale(language_model.norm, merged)                                      # on the merged hidden
    streams = stack.shape[0]
    target_magnitude, projections = stream_magnitudes(language_model, stack)
    covectors = [g / streams]
    for k, (_, magnitude) in enumerate(projections, start=1):
        weight = language_model.altup_unembed_projections[k - 1].weight.float()
        covectors.append((target_magnitude / magnitude).float() / streams * (g @ weight))
    return covectors


def _merge_streams(language_model: Any, stack: torch.Tensor) -> torch.Tensor:
    """[S,B,T,D] -> [B,T,D] exactly as ``Gemma3nTextModel.forward`` merges after its last layer."""
    target_magnitude, projections = stream_magnitudes(language_model, stack)
    streams = [stack[0]] + [projected * target_magnitude / magnitude for projected, magnitude in projections]
    return torch.mean(torch.stack(streams), dim=0)


def readout(model: Any, x: torch.Tensor, text_only: bool = False, tokenizer: Any = None) -> torch.Tensor:
    """Logits for a stream stack [S,B,T,D] (merged as the model merges) or one stream [B,T,D]
    (read alone: final norm, lm_head, soft cap — no merge).

    ``model`` is the transformers ``Gemma3nForConditionalGeneration``. With ``text_only`` the ids
    that are not text — vision and audio soft tokens, and the tokenizer's reserved ``<unused…>``
    ids — are set to -inf, so top-k readouts only name text tokens.
    """
    language_model = text_model(model)
    text = model.config.get_text_config()
    if x.dim() == 4:
        if x.shape[0] != text.altup_num_inputs:
            raise ValueError(f"a stream stack is [S={text.altup_num_inputs},B,T,D]; got {tuple(x.shape)}")
        hidden = _merge_streams(language_model, x)
    elif x.dim() == 3:
        hidden = x
    else:
        raise ValueError(f"lens takes a stack [S,B,T,D] or one stream [B,T,D]; got shape {tuple(x.shape)}")
    if hidden.shape[-1] != text.hidden_size:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the model's {text.hidden_size}")
    logits = model.lm_head(language_model.norm(hidden))
    cap = text.final_logit_softcapping
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return mask_non_text(model, logits, tokenizer) if text_only else logits


def mask_non_text(model: Any, logits: torch.Tensor, tokenizer: Any = None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """``logits`` with every non-text id (see `text_vocabulary_mask`) set to -inf; pass ``mask``
    to reuse one already built (building it walks the tokenizer's whole vocabulary)."""
    if mask is None:
        mask = text_vocabulary_mask(model, tokenizer, logits.device)
    return logits.masked_fill(~mask.to(logits.device), float("-inf"))


def text_vocabulary_mask(model: Any, tokenizer: Any = None, device: torch.device | None = None) -> torch.Tensor:
    """True for ids that are text tokens: below the vision soft-token range and, when a tokenizer
    is given, not one of its reserved ``<unused…>`` tokens."""
    text = model.config.get_text_config()
    mask = torch.zeros(text.vocab_size, dtype=torch.bool)
    mask[: text.vocab_size_per_layer_input] = True
    if tokenizer is not None:
        for token, index in tokenizer.get_vocab().items():
            if token.startswith("<unused") and index < text.vocab_size:
                mask[index] = False
    return mask.to(device) if device is not None else mask


@dataclass
class LogitLensTable:
    """Top-k next-token readouts per layer and position: renders in a notebook and a terminal.

    ``tokens[p]`` is the input token at position p; ``top[l][p]`` the k (token, probability)
    pairs read out after layer l (the last row, ``"model"``, is the model's own output).
    """

    tokens: list[str]
    rows: list[str]
    top: list[list[list[tuple[str, float]]]]
    probabilities: torch.Tensor = field(repr=False)  # [rows, positions, k]
    ids: torch.Tensor = field(repr=False)  # [rows, positions, k]

    def _cells(self, row: int, position: int, k: int | None = None) -> str:
        return " ".join(f"{token!r}:{p:.2f}" for token, p in self.top[row][position][:k])

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title="logit lens through the AltUp merge (top next tokens after each layer)")
        table.add_column("layer")
        for token in self.tokens:
            table.add_column(repr(token)[1:-1][:14])
        for r, label in enumerate(self.rows):
            table.add_row(label, *[self._cells(r, p, 2) for p in range(len(self.tokens))])
        return table

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=200, record=True, file=__import__("io").StringIO())
        console.print(self)
        return console.export_text()

    def _repr_html_(self) -> str:
        import html

        head = "".join(f"<th>{html.escape(repr(t))}</th>" for t in self.tokens)
        body = []
        for r, label in enumerate(self.rows):
            cells = []
            for p in range(len(self.tokens)):
                token, prob = self.top[r][p][0]
                rest = html.escape(self._cells(r, p))
                cells.append(f'<td title="{rest}" style="background: rgba(66,133,244,{prob:.2f})">'
                             f"{html.escape(repr(token))}<br><small>{prob:.2f}</small></td>")
            body.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
        return (f"<table><caption>logit lens through the AltUp merge</caption><tr><th>layer</th>{head}</tr>"
                f"{''.join(body)}</table>")
