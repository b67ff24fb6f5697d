"""Splicing a sparse autoencoder (or a transcoder) into a point, so the value passes through it.

A splice is a small module attached under the point for as long as it lasts, with two children that nnsight
serves like any point: ``features`` (the SAE's latent activations, ``[..., F]``) and, with ``error=True``,
``error`` (the value minus its reconstruction). A torch hook on the point's module runs it on the value:

    f  = encode(x)              (x detached when error=True: the encoder reads the value, off its gradient path)
    f' = features(f)            read it, write it (steering), take its .grad
    y  = decode(f')
    error=False:  out = y
    error=True:   e = x − decode(f),  e' = error(e),  out = x + (y − decode(f)) + (e' − e)

so with ``error=True`` and nothing written, ``out`` is ``x`` exactly (``torch.equal`` logits), gradients
upstream of the splice are the unspliced model's, ``.grad`` of the features is ∂/∂f' through the decoder,
and a write to the features moves the value by exactly the change it makes to the reconstruction. A
transcoder reads one value and stands in for another (the MLP's input → the MLP's output): the same
formula with ``x`` the source and the target in place of ``x`` where the value is replaced.

Any object with ``encode``/``decode`` works (SAELens, dictionary_learning); sparsify's ``SparseCoder``, whose
``encode`` returns its top-k (``top_acts``, ``top_indices``), is made dense. Inputs reach it flat, ``[N, D]``.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextDecoderLayer

from .._compat import add_envoy, interleaving, module_of, remove_envoy, tensor_version
from .._util import renamed_keyword
from ..points import BY_NAME, HookPoint, Injection, checked_stream, concrete_shape, mark_stack, split_qualified


class FeaturePoint(nn.Module):
    """An identity module: nnsight serves what passes through it at ``.output`` (read, write, ``.grad``)."""

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value


class Dense:
    """An SAE seen as ``encode(x [N, D]) -> f [N, F]`` and ``decode(f [N, F]) -> [N, D]``, dense features.

    sparsify's ``SparseCoder`` returns its top-k from ``encode``: they are scattered into ``num_latents``
    zeros, and decoding is ``f @ W_dec + b_dec`` (what its sparse decoder computes for those k)."""

    def __init__(self, sae: Any) -> None:
        for name in ("encode", "decode"):
            if not callable(getattr(sae, name, None)):
                raise TypeError(f"{type(sae).__name__} has no {name}(): an SAE needs encode(x) -> features and "
                                "decode(features) -> x")
        self.sae = sae
        self.sparse = False

    @property
    def parameter(self) -> torch.Tensor | None:
        if isinstance(self.sae, nn.Module):
            return next(iter(self.sae.parameters()), None)
        weight = getattr(self.sae, "W_dec", None)   # an SAE that is not a module: its decoder says where it lives
        return weight if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the SAE's device, in its dtype."""
        reference = self.parameter
        return x if reference is None else x.to(device=reference.device, dtype=reference.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.sae.encode(x)
        if isinstance(out, torch.Tensor):
            return out
        acts, indices = getattr(out, "top_acts", None), getattr(out, "top_indices", None)
        if acts is None or indices is None:
            raise TypeError(f"{type(self.sae).__name__}.encode returned a {type(out).__name__}: expected a tensor of "
                            "features, or sparsify's (top_acts, top_indices)")
        self.sparse = True
        width = getattr(self.sae, "num_latents", None) or self.sae.W_dec.shape[0]
        return acts.new_zeros(*acts.shape[:-1], width).scatter(-1, indices, acts)

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        """A skip coder's affine path on ``x [N, D]`` (``x · W_skipᵀ``: a `Transcoder`'s ``skip``, a sparsify
        coder's ``W_skip``), or None."""
        own = getattr(self.sae, "skip", None)
        if callable(own):
            return own(x)
        weight = getattr(self.sae, "W_skip", None)
        return None if weight is None else x.to(weight.dtype) @ weight.mT

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        if self.sparse:
            return f.to(self.sae.W_dec.dtype) @ self.sae.W_dec + self.sae.b_dec
        return self.sae.decode(f)


class Splice(nn.Module):
    """The module a splice attaches: ``features`` and (with ``error=True``) ``error`` are its points.

    Called as ``splice(source, target)``: ``source`` is what the SAE encodes, ``target`` what its
    reconstruction stands in for (the same tensor for an SAE). Returns the value the model goes on with.
    ``stream=k`` on a stream stack splices stream k alone; ``stream=None`` applies the SAE to every stream."""

    def __init__(self, sae: Any, error: bool = True, stream: int | None = None, stack: bool = False,
                 where: str = "") -> None:
        super().__init__()
        self.__dict__["coder"] = sae if isinstance(sae, Dense) else Dense(sae)  # not a child: no weights in the model's state_dict
        self.features = FeaturePoint()
        self.error = FeaturePoint() if error else None
        self.stream = stream
        self.stack = stack
        self.where = where
        self.keep: torch.Tensor | None = None

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.stream is None:
            return self._kept(self._through(source, target), target)
        k = self.stream
        spliced = self._kept(self._through(source[k], target[k]), target[k])
        return torch.cat([target[:k], spliced[None], target[k + 1:]])

    def _kept(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """With a position mask ``keep`` ``[B, T]`` set (what evaluation sets: the `<bos>` rule, see
        `g3n_probe.sae.tokens`), the value passes through unchanged where it is False."""
        keep = self.keep
        if keep is None:
            return out
        if tuple(keep.shape) != tuple(target.shape[-3:-1]):
            raise ValueError(f"{self.where}: the splice's position mask is {list(keep.shape)}; the value's batch and "
                             f"token axes are {list(target.shape[-3:-1])}")
        return torch.where(keep.to(target.device)[..., None], out, target)

    def _through(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        coder = self.coder
        flat = coder.prepare(source.reshape(-1, source.shape[-1]))
        f = coder.encode(flat.detach() if self.error is not None else flat)
        if torch.is_grad_enabled() and not f.requires_grad:
            f = f.detach().requires_grad_(True)  # so that .grad of the features exists
        handed = f.reshape(*source.shape[:-1], f.shape[-1]).clone()  # a write must not reach f itself
        if self.stack and self.stream is None:
            mark_stack(handed)
        version = tensor_version(handed)
        got = self.features(handed)
        skip = coder.skip(flat.detach() if self.error is not None else flat)
        y = self._decode(got, target, skip)
        if self.error is None:
            return y
        if got is handed and tensor_version(handed) == version:
            reconstruction = y.detach()  # nothing written: decode(f') is decode(f), bit for bit
        else:
            with torch.no_grad():
                reconstruction = self._decode(f, target, skip)
        error = target - reconstruction
        handed_error = error.clone()
        if self.stack and self.stream is None:
            mark_stack(handed_error)
        return target + (y - reconstruction) + (self.error(handed_error) - error)

    def reconstruct(self, f: torch.Tensor, target: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """``decode(f)`` shaped and typed as ``target`` (the value, or the stream of it, the SAE stands in for);
        a skip coder adds its affine path on ``source``."""
        skip = None if source is None else self.coder.skip(self.coder.prepare(source.reshape(-1, source.shape[-1])))
        return self._decode(f, target, skip)

    def _decode(self, f: torch.Tensor, target: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        y = self.coder.decode(f.reshape(-1, f.shape[-1]))
        if skip is not None:
            y = y + skip
        return y.reshape(target.shape).to(device=target.device, dtype=target.dtype)

    @property
    def keeps_value(self) -> bool:
        """With the error term on and nothing written, the value passes bit for bit (`decompose` relies on it)."""
        return self.error is not None

    def extra_repr(self) -> str:
        stream = "" if self.stream is None else f", stream {self.stream}"
        return f"{self.where}{stream}, error term {'on' if self.error is not None else 'off'}"


# ---- where a splice goes ------------------------------------------------------------------------------


@dataclass
class Site:
    """Where a value appears: the module whose output (``side="output"``), first input (``"input"``) or
    input → output (``"across"``, a transcoder) carries it, and the envoy the splice hangs under."""

    name: str
    module: nn.Module
    envoy: Any
    side: str
    stack: bool
    child: str = "sae"


def site_of(model: Any, name: str, transcoder: bool = False) -> Site:
    """The `Site` of a point name (``"layers.3.mlp_out"``, ``"layers.2.output"``, ``"embed"``) or, for a
    transcoder, of an MLP (``"layers.3.mlp"``: its input is read and its output replaced)."""
    layer_index, base = split_qualified(name)
    names_mlp = layer_index is not None and base == "mlp"
    if transcoder or names_mlp:
        if not names_mlp:
            raise ValueError(f"a transcoder splices across an MLP: name it 'layers.<i>.mlp', not {name!r}")
        layer = model.layers[layer_index]
        return Site(name, module_of(layer.mlp), layer.mlp, "across", False)
    if layer_index is not None and base in ("input", "output"):
        layer = model.layers[layer_index]
        return Site(name, module_of(layer), layer, base, True, child=f"sae_{base}")
    point = BY_NAME.get(base)
    hook_point = model.injection.points.get(name)
    if point is None or hook_point is None:
        raise ValueError(f"unknown point {name!r}: give a qualified point name ('layers.3.mlp_out', 'layers.2.output', "
                         "'embed', …; `g3n-probe points` lists them)")
    reason = hook_point.unavailable()
    if reason is not None:
        raise ValueError(reason)
    owner = model if point.scope == "model" else model.layers[hook_point.layer]
    return Site(name, hook_point, getattr(owner, base), "output", point.stack)


def site_of_envoy(envoy: Any) -> Site:
    """The `Site` of a point's envoy (``model.layers[3].mlp_out``) or of a layer's (its output stack)."""
    module = module_of(envoy)
    if isinstance(module, HookPoint):
        reason = module.unavailable()
        if reason is not None:
            raise ValueError(reason)
        return Site(module.qualified_name, module, envoy, "output", module.point.stack)
    if isinstance(module, Gemma3nTextDecoderLayer):
        return Site(f"layers.{module.layer_idx}.output", module, envoy, "output", True, child="sae_output")
    raise TypeError(f"splice takes a point's envoy (model.layers[3].mlp_out) or a layer's (its output stack), not "
                    f"{type(module).__name__}; for a transcoder use splice_transcoder(model.layers[i], transcoder)")


def _on_output(splice: Splice, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    result = splice(output, output)
    return mark_stack(result) if splice.stack else result


def _on_input(splice: Splice, module: nn.Module, args: tuple) -> tuple:
    result = splice(args[0], args[0])
    return (mark_stack(result) if splice.stack else result, *args[1:])


def _across(splice: Splice, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return splice(args[0], output)


def _register(site: Site, splice: Splice) -> Any:
    if site.side == "input":
        return site.module.register_forward_pre_hook(functools.partial(_on_input, splice))
    hook = _across if site.side == "across" else _on_output
    return site.module.register_forward_hook(functools.partial(hook, splice))


@dataclass
class Attached:
    """A splice in place: its envoy (``.features``, ``.error``), and what takes it off again."""

    site: Site
    splice: Splice
    envoy: Any
    handles: list

    pending: list | None = None   # the injection's list of one-forward attachments, while this is on it

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()
        remove_envoy(self.site.envoy, self.site.child)
        if self.pending is not None:
            self.pending[:] = [attached for attached in self.pending if attached is not self]
            self.pending = None


def attach(site: Site, sae: Any, error: bool = True, stream: int | None = None) -> Attached:
    """Attach a `Splice` at ``site`` (until `Attached.remove`); one splice per place at a time."""
    config = getattr(site.module, "text_config", None) or getattr(site.module, "config", None)
    stream = checked_stream(stream, site.stack, site.name, getattr(config, "altup_num_inputs", None) if site.stack else None)
    _check_width(site, sae, config)
    if site.child in dict(site.module.named_children()):
        raise ValueError(f"{site.name} already has an SAE spliced in: remove it first (leave its `spliced` block)")
    splice = Splice(sae, error=error, stream=stream, stack=site.stack, where=site.name)
    envoy = add_envoy(site.envoy, site.child, splice)
    return Attached(site, splice, envoy, [_register(site, splice)])


def _check_width(site: Site, sae: Any, config: Any) -> None:
    """Refuse an SAE whose decoder (``W_dec [F, D]``, as SAELens, sparsify and transcoders store it) writes vectors
    of another width than the value at ``site``, before anything is attached."""
    decoder = getattr(sae, "W_dec", None)
    if not isinstance(decoder, torch.Tensor) or decoder.dim() != 2:
        return
    if isinstance(site.module, HookPoint):
        width = concrete_shape(site.module.point, site.module.text_config)[-1]
    else:
        width = getattr(config, "hidden_size", None) or getattr(site.module, "hidden_size", None)
    if width is not None and decoder.shape[-1] != width:
        raise ValueError(f"{site.name}: the SAE's decoder writes vectors of width {decoder.shape[-1]} (W_dec "
                         f"{list(decoder.shape)}), but the value there has width {width}: an SAE for another point "
                         "or model?")


def _remove_after_forward(attached: Attached, module: nn.Module, args: tuple, output: Any) -> None:
    attached.remove()


def splice(point: Any, sae: Any, error: bool = True, stream: int | None = None) -> Any:
    """Inside a trace: pass ``point``'s value through ``sae`` for this forward. Returns the splice's envoy:
    ``.features.output`` (the latents: save, write, ``.grad``), ``.error.output`` (with ``error=True``),
    ``.output`` (the value the model goes on with).

    ``point`` is a point's envoy (``model.layers[3].mlp_out``) or a layer's (``model.layers[3]``: its output
    stack; ``stream=k`` for one stream). Call it before the trace reads the point: the splice acts from the
    point's next value on and comes off when the model's forward ends (for ``generate``, or several traces,
    use `spliced`)."""
    _inside_a_trace(point, "splice")
    attached = attach(site_of_envoy(point), sae, error=error, stream=stream)
    _for_one_forward(attached)
    return attached.envoy


def splice_transcoder(layer: Any, transcoder: Any, error: bool = True) -> Any:
    """Inside a trace: a transcoder across layer ``layer``'s MLP (``model.layers[i]`` or ``model.layers[i].mlp``)
    for this forward: it encodes the MLP's input and its reconstruction stands in for the MLP's output.
    Returns the splice's envoy, as `splice` does."""
    module = module_of(layer)
    if isinstance(module, Gemma3nTextDecoderLayer):
        mlp = layer.mlp
    else:
        owner = module_of(layer.parent) if getattr(layer, "parent", None) is not None else None
        if not isinstance(owner, Gemma3nTextDecoderLayer) or module is not owner.mlp:
            raise TypeError("splice_transcoder takes a layer's envoy (model.layers[i]) or its MLP's (model.layers[i].mlp), "
                            f"not {type(module).__name__}: a transcoder reads the MLP's input and stands in for its output")
        mlp, module = layer, owner
    _inside_a_trace(layer, "splice_transcoder")
    name = f"layers.{module.layer_idx}.mlp"
    attached = attach(Site(name, module_of(mlp), mlp, "across", False), transcoder, error=error)
    _for_one_forward(attached)
    return attached.envoy


@renamed_keyword("name", "point")
@contextmanager
def spliced(model: Any, point: str, sae: Any, error: bool = True, stream: int | None = None) -> Iterator[Any]:
    """``with spliced(model, "layers.3.mlp_out", sae) as s:`` — every forward inside (traces, ``generate``, plain
    calls of ``model.hf_model``) passes the point's value through ``sae``; ``s.features.output`` and
    ``s.error.output`` are points in any trace inside. ``point`` is a qualified point name, a layer stack
    (``"layers.2.output"``, ``stream=k`` for one stream) or ``"layers.<i>.mlp"`` for a transcoder, as for
    `evaluate` and `train` (``name=`` still works, with a DeprecationWarning)."""
    attached = attach(site_of(model, point), sae, error=error, stream=stream)
    try:
        yield attached.envoy
    finally:
        attached.remove()


@contextmanager
def spliced_transcoder(model: Any, layer: int, transcoder: Any, error: bool = True) -> Iterator[Any]:
    """`spliced` for a transcoder across layer ``layer``'s MLP."""
    with spliced(model, f"layers.{layer}.mlp", transcoder, error=error) as envoy:
        yield envoy


def _inside_a_trace(envoy: Any, what: str) -> None:
    """`splice` acts on the forward of the trace it is called in; outside one it would splice the next forward of
    whatever code runs the model. Refused (before anything is attached)."""
    if not interleaving(envoy):
        raise RuntimeError(f"{what} works inside a trace (with model.trace(...): ...), for that trace's forward; "
                           "outside one, use `with g3n.sae.spliced(model, name, sae):` for every forward inside the block")


def _for_one_forward(attached: Attached) -> None:
    """Take ``attached`` off when the model's forward ends, however it ends."""
    envoy = attached.site.envoy
    while envoy.parent is not None:
        envoy = envoy.parent
    hook = functools.partial(_remove_after_forward, attached)
    attached.handles.append(module_of(envoy).register_forward_hook(hook, always_call=True))
    injection = Injection.of(module_of(envoy))
    if injection is not None:   # released with the model (`Gemma3nProbe.release`) should that forward never come
        attached.pending = injection.pending
        injection.pending.append(attached)
