"""A replacement model: every given MLP replaced by its transcoder at once, each layer's features and error
term served as points.

    with g3n.sae.replaced(model, "path/to/transcoders") as r:       # or a TranscoderSet / {layer: Transcoder}
        with model.trace(prompt):
            f = r.layers[3].features.output.save()                 # [B, T, F]: read, write, .grad
            r.layers[3].features.output[..., 7] = 0               # a feature edit
            e = r.layers[3].error.output.save()                    # the MLP's real output − the reconstruction

Each layer's transcoder reads the MLP's input (``pre_feedforward_layernorm``'s output) and its reconstruction
stands in for the site its set names: ``mlp_out`` (default, ``post_feedforward_layernorm``'s output) or the
MLP module's own output. The splice is `Splice`'s formula, so with ``error=True`` and nothing written the logits
are ``torch.equal`` to the model's; skip transcoders included. Everything comes off when the block ends
(traces, ``generate`` and plain forwards inside it are all replaced).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from .._compat import add_envoy, module_of
from .splice import Attached, Site, Splice, attach
from .transcoders import TranscoderError, TranscoderSet, as_transcoder_set


class Replacement:
    """What `replaced` yields: ``layers[i]`` is layer i's splice envoy (``.features``, ``.error``)."""

    def __init__(self, transcoders: TranscoderSet, attached: dict[int, Attached]) -> None:
        self.transcoders = transcoders
        self._attached = attached
        self.layers = _ByLayer({layer: a.envoy for layer, a in attached.items()})

    def splice(self, layer: int) -> Splice:
        """Layer ``layer``'s `Splice` module."""
        return self._attached[layer].splice


class _ByLayer(dict):
    def __missing__(self, layer: Any) -> Any:
        raise KeyError(f"layer {layer!r} has no transcoder in this replacement (layers {sorted(self)})")


def _hold_source(splice: Splice, module: nn.Module, args: tuple) -> None:
    splice.__dict__["pending_source"] = args[0]


def _replace_norm_output(splice: Splice, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    source = splice.__dict__.pop("pending_source", None)
    if source is None:
        return output  # the norm ran without its MLP (not a decoder layer's forward): leave it alone
    return splice(source, output)


def attach_transcoder(model: Any, layer: int, transcoder: Any, output_point: str = "mlp_out",
                      error: bool = True) -> Attached:
    """Attach ``transcoder`` across layer ``layer``'s MLP until `Attached.remove`: it reads the MLP's input
    and stands in for ``output_point`` (``"mlp_out"``: the post-feedforward norm's output; ``"mlp"``: the
    MLP module's output). The splice hangs under ``model.layers[layer].mlp`` as ``transcoder``."""
    envoy = model.layers[layer].mlp
    mlp = module_of(envoy)
    name = f"layers.{layer}.mlp"
    if output_point == "mlp":
        return attach(Site(name, mlp, envoy, "across", False, child="transcoder"), transcoder, error=error)
    if "transcoder" in dict(mlp.named_children()):
        raise ValueError(f"{name} already has a transcoder spliced in: remove it first")
    norm = module_of(model.layers[layer]).post_feedforward_layernorm
    splice = Splice(transcoder, error=error, where=f"{name} → layers.{layer}.mlp_out")
    child = add_envoy(envoy, "transcoder", splice)
    attached = Attached(Site(name, mlp, envoy, "across", False, child="transcoder"), splice, child, [])
    attached.handles.append(mlp.register_forward_pre_hook(functools.partial(_hold_source, splice)))
    # prepend: the point mlp_out (routed by the injection's own hook on this norm) then shows the replaced value
    attached.handles.append(norm.register_forward_hook(functools.partial(_replace_norm_output, splice), prepend=True))
    return attached


def check_placement(model: Any, transcoders: TranscoderSet) -> None:
    """Refuse transcoders on another device than their layer, naming the layer (a dtype may differ: the MLP's
    input is cast to the transcoder's dtype and the reconstruction back to the model's)."""
    for layer, transcoder in transcoders.transcoders.items():
        weight = module_of(model.layers[layer]).pre_feedforward_layernorm.weight
        if transcoder.W_enc.device != weight.device:
            raise TranscoderError(f"layer {layer}'s transcoder is on {transcoder.W_enc.device}, its layer on "
                                  f"{weight.device}: move it (transcoders.to(device))")


@contextmanager
def attached(model: Any, coders: dict[int, Any], output_point: str = "mlp_out", error: bool = True
             ) -> Iterator[dict[int, Attached]]:
    """Each of ``coders`` (layer → anything `Splice` takes: a transcoder, a mean ablation) across its layer's MLP
    while the block lasts; yields what was attached, by layer, and takes it all off again in reverse."""
    done: dict[int, Attached] = {}
    try:
        for layer, coder in coders.items():
            done[layer] = attach_transcoder(model, layer, coder, output_point, error=error)
        yield done
    finally:
        for layer in reversed(list(done)):
            done[layer].remove()


@contextmanager
def replaced(model: Any, transcoders: Any, error: bool = True) -> Iterator[Replacement]:
    """``with replaced(model, transcoders) as r:`` — every layer in ``transcoders`` (a directory, a
    `TranscoderSet` or a mapping ``layer -> Transcoder``) has its MLP replaced while the block lasts (see the
    module doc). Checked against the model (layers, widths, device) before anything is attached."""
    chosen = as_transcoder_set(transcoders, model)
    check_placement(model, chosen)
    with attached(model, {layer: chosen[layer] for layer in chosen}, chosen.output_point, error) as done:
        yield Replacement(chosen, done)
