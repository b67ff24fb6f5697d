"""Transcoders for every MLP of a Gemma 3n, trained in one sparsify run (the ``sae`` extra).

sparsify trains one coder per hookpoint in a single pass over the texts (``TrainConfig(hookpoints=[...])``),
reading each hooked module's first input and its output (``transcode=True``). `train_transcoders` hands it, per
layer, the module whose input is the MLP's input (``pre_feedforward_layernorm``'s output) and whose output is
the site the transcoder stands in for:

- ``output="mlp_out"`` (default, circuit-tracer's Gemma 3 convention): the target is
  ``post_feedforward_layernorm``'s output. No module sees both, so a `TranscoderTap` (an identity module,
  ``tap(source, target) -> target``) hangs under the layer for the run; a forward pre-hook on the MLP keeps
  its input, a forward hook on the post-feedforward norm calls the tap with it and the norm's output.
- ``output="mlp"``: the MLP module itself (its input → its own output, before that norm).

Everything attached comes off when the run ends. The result is a `TranscoderSet` (``from_sparsify`` per layer)
whose ``output_hook`` says the site (``"hook_mlp_out"`` or ``"mlp.hook_out"``), saved in circuit-tracer's layout
with ``save_dir``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .._compat import module_of, remove_child
from .._util import rank_world
from .train import _module_name, checked_width, run_sparsify, sparsify_module, training_chunks
from .transcoders import INPUT_HOOK, TranscoderSet, from_sparsify, save_transcoders

OUTPUT_SITES = {"mlp_out": "hook_mlp_out", "mlp": "mlp.hook_out"}
TAP = "transcoder_tap"


class TranscoderTap(nn.Module):
    """An identity module hooked by sparsify: ``forward(source, target) -> target``, so its first input is the
    MLP's input and its output the value the transcoder learns to predict."""

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return target


@dataclass
class TranscoderTraining:
    """How `train_transcoders` went: per layer, sparsify's hookpoint and FVU at every step; the tokens of
    the one pass (this rank's), its seconds, and where the set was saved (None without ``save_dir``)."""

    layers: list[int]
    output: str
    hookpoints: dict[int, str]
    fvu: dict[int, list[float]] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    path: Path | None = None

    @property
    def tokens_per_s(self) -> float:
        """Training throughput: tokens (each trains every layer; the model's forward included) per second."""
        return self.tokens / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        last = ", ".join(f"{layer}: {values[-1]:.3f}" for layer, values in self.fvu.items() if values)
        return (f"transcoders for layers {self.layers} (→ {self.output}) over {self.tokens:,} tokens in "
                f"{self.seconds:.1f} s ({self.tokens_per_s:,.0f} tokens/s); last-step FVU {{{last}}}")


def train_transcoders(model: Any, texts: Sequence[str] | torch.Tensor, layers: Any = "all", *, skip: bool = False,
                      output: str = "mlp_out", k: int = 16, expansion_factor: int = 4, num_latents: int = 0,
                      ctx_len: int = 128, batch_size: int = 8, lr: float | None = None, seed: int = 0,
                      save_dir: str | os.PathLike | None = None, progress: bool = True, include_bos: bool = False,
                      **config: Any) -> tuple[TranscoderSet, TranscoderTraining]:
    """Train a transcoder for each of ``layers``' MLPs of ``model`` (a `g3n_probe.Gemma3nProbe`) in one sparsify
    run: one pass over the tokens of ``texts`` (`token_chunks`; or a long tensor ``[n, ctx_len]`` of chunks).

    ``layers``: ``"all"``, a layer index or a list of them. ``output``: ``"mlp_out"`` (the post-feedforward
    norm's output, default) or ``"mlp"`` (the MLP module's output); see the module doc. ``skip=True`` trains
    skip transcoders (sparsify's ``skip_connection``: an affine ``W_skip`` beside the features). ``k``,
    ``expansion_factor``/``num_latents`` shape each coder (TopK, sparsify's rule); ``ctx_len`` and
    ``batch_size`` (chunks per step) the batches; other keywords go to sparsify's ``TrainConfig``. Under
    ``torchrun`` each rank trains on its share (one GPU per rank), and rank 0 writes ``save_dir``.
    ``include_bos=False`` (default): ``<bos>`` positions are not trained on (nor padding); True trains on them.

    Returns the `TranscoderSet` (circuit-tracer's layout when saved) and a `TranscoderTraining`. Everything
    attached to the model for the run is removed after, and the model's ``requires_grad`` flags restored.
    """
    sparsify_module()
    chosen = _layers(model, layers)
    if output not in OUTPUT_SITES:
        raise ValueError(f"output={output!r}: a transcoder stands in for 'mlp_out' (post_feedforward_layernorm's "
                         "output, default) or 'mlp' (the MLP module's own output)")
    width = checked_width(k, expansion_factor, num_latents, model.text_config.hidden_size)
    if config.get("loss_fn", "fvu") == "ce":
        raise ValueError("loss_fn='ce' makes sparsify swap each hooked module for nn.Identity; train with 'fvu' or 'kl'")
    chunks = training_chunks(model, texts, ctx_len, seed)
    coder = dict(expansion_factor=expansion_factor, num_latents=num_latents, k=k, transcode=True,
                 skip_connection=bool(skip))
    with _hookpoints(model, chosen, output) as hookpoints:
        run = run_sparsify(model, chunks, list(hookpoints.values()), coder, batch_size=batch_size, lr=lr, seed=seed,
                           save_dir=None, progress=progress, include_bos=include_bos, config=config)
    import sparsify
    transcoders = TranscoderSet(
        {layer: from_sparsify(run.coders[hookpoints[layer]], layer=layer) for layer in chosen}, INPUT_HOOK,
        OUTPUT_SITES[output],
        {"trained_with": f"g3n_probe.sae.train_transcoders (eai-sparsify {sparsify.__version__})",
         "output_site": "post_feedforward_layernorm output" if output == "mlp_out" else "MLP module output",
         "include_bos": bool(include_bos), "tokens": int(run.tokens), "num_latents": width})
    stats = TranscoderTraining(chosen, output, dict(hookpoints), {layer: run.fvu[hookpoints[layer]] for layer in chosen},
                               run.tokens, run.seconds)
    if save_dir is not None and rank_world(from_environment=False)[0] == 0:
        stats.path = save_transcoders(save_dir, transcoders)
    return transcoders, stats


def _layers(model: Any, layers: Any) -> list[int]:
    count = model.text_config.num_hidden_layers
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers={layers!r}: give 'all', a layer index or a list of them")
        return list(range(count))
    listed = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else list(layers)
    if not listed:
        raise ValueError("layers is empty: give 'all', a layer index or a list of them")
    seen: set[int] = set()
    for layer in listed:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < count:
            raise ValueError(f"layer {layer!r} does not exist: this model has layers 0..{count - 1}")
        if layer in seen:
            raise ValueError(f"layer {layer} is given twice")
        seen.add(layer)
    return sorted(listed)


def _hold_source(tap: TranscoderTap, module: nn.Module, args: tuple) -> None:
    tap.__dict__["pending_source"] = args[0]


def _through_tap(tap: TranscoderTap, module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
    source = tap.__dict__.pop("pending_source", None)
    if source is None:
        return None  # the norm ran without its MLP: nothing to pair
    got = tap(source, output)
    return None if got is output else got


@contextlib.contextmanager
def _hookpoints(model: Any, layers: list[int], output: str) -> Iterator[dict[int, str]]:
    """Per layer, the module name sparsify hooks (under ``hf_model.base_model``), while it exists."""
    base = model.hf_model.base_model
    attached: list[tuple[nn.Module, list[Any]]] = []
    try:
        names = {}
        for layer in layers:
            decoder = module_of(model.layers[layer])
            if output == "mlp":
                names[layer] = _module_name(base, decoder.mlp)
                continue
            if TAP in dict(decoder.named_children()):
                raise ValueError(f"layers.{layer} already has a {TAP}: another train_transcoders run is attached")
            tap = TranscoderTap()
            decoder.add_module(TAP, tap)
            handles: list[Any] = []
            attached.append((decoder, handles))
            handles.append(decoder.mlp.register_forward_pre_hook(functools.partial(_hold_source, tap)))
            handles.append(decoder.post_feedforward_layernorm.register_forward_hook(
                functools.partial(_through_tap, tap), prepend=True))
            names[layer] = _module_name(base, tap)
        yield names
    finally:
        for decoder, handles in reversed(attached):
            for handle in handles:
                handle.remove()
            remove_child(decoder, TAP)
