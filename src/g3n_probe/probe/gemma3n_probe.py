"""``Gemma3nProbe``: nnsight's ``TransformersModel`` for a text-only, point-injected Gemma 3n.

A thin subclass in the manner of nnterp's ``StandardizedTransformer``: it adds accessors
(``model.layers``, the model-level points, ``model.points``), input validation, a batcher that
knows stream stacks carry their batch on dimension 1, and clear errors for the two things Gemma 3n
makes easy to get wrong (an ``attn_pattern`` under sdpa, skipping a KV 'store' layer). Tracing,
invokes, generation, sessions, caching and gradients are nnsight's own.
"""

from __future__ import annotations

import operator
import threading
import weakref
from typing import Any, Iterator

import torch
from nnsight.intervention.envoy import Envoy, traceable
from nnsight.intervention.eproperty import eproperty
from nnsight.intervention.interleaver import OutOfOrderError
from nnsight.intervention.tracer import InterleavingTracer
from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextDecoderLayer

from .._compat import (
    ModelOnlyPipeline,
    ProbeModelBase,
    add_envoy,
    base_envoy_value,
    interleaving,
    is_fake,
    module_of,
    set_base_envoy_value,
    unwrap_module,
)
from ..activations.batch import ActivationCache, collect, encode_inputs
from ..checkpoint import module_tree
from ..checkpoint.towers import TOWERS, TowerStub, materialize
from ..points import POINTS, HookPoint, Injection, StreamBatcher, inject, rekeep_arguments
from . import tl
from .lens import LogitLensTable, mask_non_text, readout, text_vocabulary_mask


class PointEnvoy(Envoy):
    """The envoy of a `HookPoint`: refuses points that never fire in this model, with the reason."""

    def _require(self) -> None:
        point = module_of(self)
        if not point.attached:
            raise ValueError(f"point {point.qualified_name} was removed from this model (Injection.remove()); "
                             "wrap the model again with g3n.Gemma3nProbe(model) to get points back")
        reason = point.unavailable()
        if reason is not None:
            raise ValueError(reason)

    @property
    def output(self) -> Any:
        self._require()
        return base_envoy_value(self, "output")

    @output.setter
    def output(self, value: Any) -> None:
        self._require()
        set_base_envoy_value(self, "output", value)

    @property
    def input(self) -> Any:
        self._require()
        return base_envoy_value(self, "input")

    @input.setter
    def input(self, value: Any) -> None:
        self._require()
        set_base_envoy_value(self, "input", value)


class LayerEnvoy(Envoy):
    """The envoy of a decoder layer: skipping a KV 'store' layer is refused before it breaks, and a
    write of the whole ``.inputs`` keeps its per-layer input served by ``ple_input``."""

    @eproperty(key="input")
    def inputs(self, value: Any) -> Any:
        return value

    @inputs.postprocess  # type: ignore[no-redef]  # nnsight's eproperty: a second def of the name
    def inputs(self, value: Any) -> Any:
        return rekeep_arguments(module_of(self), value)

    def skip(self, replacement: Any) -> None:
        layer = module_of(self)
        config = layer.config
        if module_tree.is_kv_store(config, layer.layer_idx):
            kind = config.layer_types[layer.layer_idx]
            raise ValueError(
                f"layer {layer.layer_idx} is the KV 'store' layer for {kind}: layers "
                f"{module_tree.kv_readers(config, layer.layer_idx)} reuse its keys and values, so skipping it would leave "
                "them nothing to attend to (transformers fails with a KeyError). Skip another layer, or edit this "
                "layer's points instead."
            )
        super().skip(replacement)


class Layers:
    """``model.layers``: the decoder layers' envoys, indexed like a list (negative indices and slices
    too), with an `IndexError` that says how many layers there are."""

    def __init__(self, envoy: Envoy, count: int) -> None:
        self._envoy = envoy
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Envoy]:
        return (self._envoy[i] for i in range(self._count))

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._envoy[i] for i in range(*index.indices(self._count))]
        try:
            position = operator.index(index)
        except TypeError:
            raise TypeError(f"layer indices are integers or slices, not {type(index).__name__}") from None
        if not -self._count <= position < self._count:
            raise IndexError(f"layer {position} is out of range: this model has {self._count} layers "
                             f"(0..{self._count - 1}, or -{self._count}..-1 from the end)")
        return self._envoy[position % self._count]

    def __repr__(self) -> str:
        return f"<{self._count} Gemma 3n decoder layers>"


_ENVOY_CLASSES = {HookPoint: PointEnvoy, Gemma3nTextDecoderLayer: LayerEnvoy}


class ExclusiveTracer(InterleavingTracer):
    """nnsight's tracer, one at a time per model. nnsight keeps one interleaver per model, and a second
    trace registers its workers on it before running: a nested trace, or another thread's, would end
    up serving its requests from the first trace's forward. This refuses it instead."""

    def execute(self, code: Any) -> None:
        lock = _run_lock(module_of(self.envoy))
        if not lock.acquire(blocking=False):
            raise RuntimeError(
                "this model is already running a trace (a trace nested inside another, or another thread's): one "
                "trace runs on a model at a time. Put several inputs in one trace with tracer.invoke(...), or give "
                "each thread its own model (g3n.Gemma3nProbe(copy.deepcopy(model.hf_model), tokenizer=...))."
            )
        self.envoy.__dict__["_running_trace"] = getattr(self.fn, "__name__", None)
        try:
            super().execute(code)
        finally:
            self.envoy.__dict__["_running_trace"] = None
            lock.release()


_RUN_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RUN_LOCKS_GUARD = threading.Lock()


def _run_lock(module: torch.nn.Module) -> threading.Lock:
    """One lock per model: nnsight keeps per-module trace state, so two traces at once would mix."""
    with _RUN_LOCKS_GUARD:
        lock = _RUN_LOCKS.get(module)
        if lock is None:
            lock = _RUN_LOCKS[module] = threading.Lock()
        return lock


def _check_input(value: Any) -> None:
    if value is None or (isinstance(value, (list, tuple, str)) and len(value) == 0):
        raise ValueError(f"no input ({value!r}): a trace takes text, a list of texts, or token ids "
                         "(an integer tensor [batch, tokens])")


class Gemma3nProbe(ProbeModelBase):
    """A text-only Gemma 3n under nnsight, with every intervention point of `g3n_probe.points.POINTS`.

    Build it with `g3n_probe.load`, or wrap a stock model you loaded yourself:
    ``Gemma3nProbe(model)`` injects the points first unless `g3n_probe.inject` already did. Per-layer
    points live under ``model.layers[i]``; model-level points are attributes of the model
    (``model.embed``, ``model.logits``, ...). Stock module paths
    (``model.model.language_model.layers[i].mlp``) and ``.source`` work as in nnsight.
    """

    batcher_class = StreamBatcher

    def __init__(self, module: torch.nn.Module, tokenizer: Any = None, load_report: Any = None, **kwargs: Any) -> None:
        ours = Injection.of(module) is None
        injection = Injection.of(module) or inject(module)
        kwargs.setdefault("envoys", _ENVOY_CLASSES)
        try:
            super().__init__(module, tokenizer=tokenizer, task="text-generation", **kwargs)
        except BaseException:
            if ours:   # a failed wrap leaves the model as it was given
                injection.remove()
                for submodule in module.modules():
                    unwrap_module(submodule)
            raise
        self.injection = injection
        self.load_report = load_report

    def _wrap_without_tokenizer(self, module: torch.nn.Module) -> torch.nn.Module | None:
        can_generate = getattr(module, "can_generate", None)
        if self.tokenizer is not None and callable(can_generate) and can_generate():
            return None
        # Without a tokenizer nnsight's transformers pipeline cannot be built (it insists on one, or
        # loads one from the config's path), nor for a model that does not generate (Gemma3nModel,
        # Gemma3nTextModel: the text-generation pipeline refuses them). A trace needs none of it: a stand-in
        # carries the model, and texts are tokenized with the tokenizer as ever.
        self.pipeline = ModelOnlyPipeline(module, self.task, self.tokenizer)
        return module

    @property
    def hf_model(self) -> Any:   # a stock Gemma 3n model; Any, as torch types every submodule attribute Tensor | Module
        """The stock transformers model this probe wraps (points injected)."""
        return module_of(self)

    def release(self) -> torch.nn.Module:
        """Hand the bare stock model back: the points come off (`Injection.remove`) and so does
        everything nnsight put on its modules when it wrapped them. The module tree, every module's
        ``__dict__`` and every hook dict are then those of a model never wrapped. The probe is unusable after."""
        module = module_of(self)
        self.injection.remove()
        for submodule in module.modules():
            unwrap_module(submodule)
        return module

    def __reduce_ex__(self, protocol: Any) -> Any:
        # nnsight's envoys hold weak references and its interleaver, which pickle cannot follow; say what to do
        raise TypeError("a Gemma3nProbe (an nnsight model) cannot be pickled: pickle its stock model instead "
                        "(probe.hf_model: it pickles and loads with its points) and wrap the loaded one again with "
                        "g3n.Gemma3nProbe(model, tokenizer=...)")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            injection = self.__dict__.get("injection")
            if injection is not None and name in injection.absent:
                raise AttributeError(f"this model has no {name!r} point: {injection.absent[name]}") from None
            raise

    # ---- accessors ----

    @property
    def text_model(self) -> Envoy:
        """The envoy of the ``Gemma3nTextModel`` (wherever the stock class keeps it)."""
        envoy: Any = self
        for part in filter(None, self.injection.text_path.split(".")):
            envoy = getattr(envoy, part)
        return envoy

    @property
    def layers(self) -> Layers:
        """The decoder layers' envoys; per-layer points are attributes of each."""
        layers = self.__dict__.get("_layers")
        if layers is None:  # built once: a trace reads it for every point it touches
            stock = self.__dict__.get("_layers_envoy") if not self.injection.text_path else self.text_model.layers
            layers = self.__dict__["_layers"] = Layers(stock, self.text_config.num_hidden_layers)
        return layers

    @layers.setter
    def layers(self, envoy: Envoy) -> None:
        # nnsight sets an envoy per child module: a Gemma3nTextModel root has its own `layers`.
        self.__dict__["_layers_envoy"] = envoy

    @property
    def text_config(self) -> Any:
        return module_of(self).config.get_text_config()

    @property
    def points(self) -> tuple:
        """The intervention-point table (`g3n_probe.points.POINTS`)."""
        return POINTS

    # ---- readout ----

    def lens(self, x: torch.Tensor, layer: int | None = None, text_only: bool = False) -> torch.Tensor:
        """Logits for a stream stack [S,B,T,D] or one stream [B,T,D], by the model's own readout.

        A stack is merged as the model merges after its last layer (unembed projections, magnitude
        rescale, mean), then final norm, lm_head and soft cap; a single stream is read out alone
        (no merge). On the last layer's output this reproduces the model's logits bit for bit.
        The readout does not depend on which layer the stack came from; ``layer``, when given, is
        checked to be a layer of this model and documents where ``x`` was read. Works inside a
        trace (on saved or live values) and outside.
        """
        if layer is not None and not 0 <= layer < self.text_config.num_hidden_layers:
            raise ValueError(f"layer {layer} is out of range: this model has {self.text_config.num_hidden_layers} layers")
        return readout(module_of(self), x, text_only=text_only, tokenizer=self.tokenizer)

    def logit_lens(self, prompt: Any, k: int = 5, text_only: bool = True, positions: Any = None):
        """Top-``k`` next tokens after every layer, read out through the AltUp merge.

        Returns a `g3n_probe.probe.lens.LogitLensTable` (layers × positions, tokens as strings, with
        probabilities) that renders as HTML in a notebook and as a table in a terminal.
        ``positions`` (a list of ints, negative from the end) limits the columns.
        """
        if self.tokenizer is None:
            raise ValueError("logit_lens names tokens, so it needs a tokenizer: pass tokenizer=... to g3n.load or "
                             "Gemma3nProbe (model.lens(stack) gives the logits without one)")
        layers = self.text_config.num_hidden_layers
        ids, mask = encode_inputs(self, prompt)
        stacks = []
        with torch.no_grad(), self.trace(ids if mask is None else {"input_ids": ids, "attention_mask": mask}):
            for i in range(layers):
                stacks.append(self.layers[i].output.save())
            logits = self.logits.output.save()
        length = ids.shape[-1]
        columns = list(range(length)) if positions is None else [p % length for p in positions]
        with torch.no_grad():
            readouts = [self.lens(stack) for stack in stacks] + [logits]
            if text_only:
                mask = text_vocabulary_mask(module_of(self), self.tokenizer, logits.device)  # built once for all rows
                readouts = [mask_non_text(module_of(self), r, mask=mask) for r in readouts]
            probs = torch.stack([r[0, columns].float().softmax(-1) for r in readouts])  # [rows, positions, V]
            top_p, top_i = probs.topk(k, dim=-1)
        decode = lambda t: self.tokenizer.decode([int(t)])
        top = [[[(decode(i), float(p)) for p, i in zip(top_p[r, c], top_i[r, c])] for c in range(len(columns))]
               for r in range(len(readouts))]
        return LogitLensTable(tokens=[decode(ids[0, c]) for c in columns], rows=[str(i) for i in range(layers)] + ["model"],
                              top=top, probabilities=top_p, ids=top_i)

    def cache(self, inputs: Any, points: Any, layers: Any = None, positions: Any = None, device: Any = "cpu",
              dtype: torch.dtype | None = None, max_bytes: int | None = None, verbose: bool = True) -> ActivationCache:
        """Activation cache keyed by point names (``"layers.3.altup_predict"``, ``"ple_tokens"``, …).

        See `g3n_probe.activations.batch.collect`: states its size before running and refuses above ``max_bytes``.
        """
        return collect(self, inputs, points, layers=layers, positions=positions, device=device, dtype=dtype,
                     max_bytes=max_bytes, verbose=verbose)

    # ---- TransformerLens conventions (g3n_probe.probe.tl) ----

    def to_tokens(self, input: Any, prepend_bos: bool | None = True, padding_side: str | None = None,
                  move_to_device: bool = True) -> torch.Tensor:
        """Token ids ``[batch, pos]`` (TransformerLens' ``to_tokens``)."""
        return tl.to_tokens(self, input, prepend_bos, padding_side, move_to_device)

    def to_str_tokens(self, input: Any, prepend_bos: bool | None = True) -> list:
        """Each token as a string (TransformerLens' ``to_str_tokens``)."""
        return tl.to_str_tokens(self, input, prepend_bos)

    def to_string(self, tokens: Any) -> Any:
        """Decoded token ids (TransformerLens' ``to_string``)."""
        return tl.to_string(self, tokens)

    def test_prompt(self, prompt: str, answer: str, prepend_space_to_answer: bool = True, print_details: bool = True,
                    prepend_bos: bool | None = True, top_k: int = 10) -> tl.PromptTest:
        """The answer tokens' ranks and probabilities after ``prompt``, printed as TransformerLens prints them."""
        return tl.test_prompt(self, prompt, answer, prepend_space_to_answer, print_details, prepend_bos, top_k)

    @property
    def W_E(self) -> torch.Tensor:  # TransformerLens' name
        """The token embedding ``[V, D]``: the stock weight itself (looked up ×√D: ``embed`` = ``W_E[ids]·√D``)."""
        return tl.embedding(self)

    @property
    def W_U(self) -> torch.Tensor:  # TransformerLens' name
        """The unembedding ``[D, V]``: a view of the stock ``lm_head`` weight (tied to ``W_E``)."""
        return tl.unembedding(self)

    @property
    def cfg(self) -> tl.Config:
        """TransformerLens' ``cfg`` names (``n_layers``, ``d_model``, ``n_heads``, ``d_head``, ``d_vocab``,
        ``n_ctx``, ``d_mlp`` …) from the stock text config (`g3n_probe.probe.tl.Config`)."""
        return tl.config(self)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is one token (TransformerLens' ``to_single_token``)."""
        return tl.to_single_token(self, string)

    def run_with_cache(self, input: Any, names_filter: Any = None, device: Any = None, remove_batch_dim: bool = False,
                       prepend_bos: bool | None = True, padding_side: str | None = None) -> tuple:
        """``(logits, cache)`` as TransformerLens returns them; the layers' ``input``/``output`` are AltUp stacks
        ``[S,B,T,D]`` (stream 0, ``[B,T,D]``, is TransformerLens' Gemma 3n ``hook_resid_pre``). See
        `g3n_probe.probe.tl.run_with_cache`."""
        return tl.run_with_cache(self, input, names_filter, device, remove_batch_dim, prepend_bos, padding_side)

    def __call__(self, *args: Any, hook: bool = False, **kwargs: Any) -> Any:
        """Outside a trace, ``model("text")`` (texts, or any input with TransformerLens' ``return_type=``) runs as
        TransformerLens' ``model(input)``: logits ``[B,T,V]`` (soft-capped), ``"loss"``, ``"both"`` or None
        (`g3n_probe.probe.tl.forward`). Token ids without those keywords, and every call inside a trace, are
        nnsight's module call (the stock forward's output)."""
        first = args[0] if args else None
        texts = isinstance(first, str) or (isinstance(first, (list, tuple)) and len(first) > 0
                                           and all(isinstance(text, str) for text in first))
        if len(args) == 1 and not hook and not interleaving(self) and (texts or "return_type" in kwargs):
            return tl.forward(self, first, **kwargs)
        return super().__call__(*args, hook=hook, **kwargs)

    # ---- input validation ----

    def _check_ids(self, ids: Any) -> None:
        if not isinstance(ids, torch.Tensor):
            return
        vocab = self.text_config.vocab_size
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be an integer tensor of dtype torch.long (or int32); got {ids.dtype}"
                            + (": convert with ids.long()" if not (ids.is_floating_point() or ids.is_complex()) else ""))
        if ids.dim() != 2:
            raise ValueError(f"token ids must be 2-D [batch, tokens]; got shape {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise ValueError(f"token ids are empty (shape {tuple(ids.shape)}); give at least one token")
        if is_fake(ids):
            return  # scan: shapes only, no values to check
        low, high = int(ids.min()), int(ids.max())
        if low < 0:
            raise ValueError(f"token ids must be non-negative; got {low}")
        if high >= vocab:
            raise ValueError(f"token id {high} is out of range: the vocabulary has {vocab} ids (0..{vocab - 1})")

    def _validate(self, inputs: tuple, kwargs: dict) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor):
            self._check_ids(inputs[0])
        self._check_ids(kwargs.get("input_ids"))

    def trace(self, *inputs: Any, **kwargs: Any) -> Any:
        if module_of(self).training:
            raise RuntimeError("the model is in training mode: call model.hf_model.eval() first (in training mode "
                               "AltUp clamps its own coefficients in place on every forward, and dropout runs)")
        kwargs.setdefault("tracer_cls", ExclusiveTracer)
        return super().trace(*inputs, **kwargs)

    def _check_inputs(self, inputs: tuple, kwargs: dict) -> None:
        if inputs:
            _check_input(inputs[0])
        first = inputs[0] if inputs else None
        texts = [first] if isinstance(first, str) else first if isinstance(first, list) else []
        if self.tokenizer is None and any(isinstance(text, str) for text in texts):
            raise ValueError("this model has no tokenizer, so it takes token ids (an integer tensor [batch, tokens]), "
                             "not text: pass tokenizer=... to g3n.load or Gemma3nProbe")

    def interleave(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().interleave(fn, *args, **kwargs)
        except OutOfOrderError as error:
            raise self.injection.explain_out_of_order(error) from None

    def _prepare_call(self, inputs: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._validate(inputs, kwargs)
        # A trace is one forward: a KV cache would only cost memory (pass use_cache=True to keep one).
        kwargs.setdefault("use_cache", False)
        if "logits_to_keep" in kwargs:
            ids = kwargs.get("input_ids", inputs[0] if inputs else None)
            kwargs["logits_to_keep"] = self._positions(kwargs["logits_to_keep"], ids)
        self.injection.served.clear()
        return inputs, kwargs

    def _run_call(self, call: Any) -> Any:
        try:
            return call()
        except BaseException:
            self.injection.reset()  # an interrupted forward leaves nothing behind
            raise

    def _positions(self, keep: Any, ids: Any) -> Any:
        """Validate the lean readout: ``logits_to_keep`` = n (the last n positions; 0 = all) or a
        list/tensor of positions (negative counts from the end)."""
        tokens = ids.shape[-1] if isinstance(ids, torch.Tensor) else None
        if isinstance(keep, bool):
            raise TypeError("logits_to_keep takes an int or a list of positions, not a bool")
        if isinstance(keep, int):
            if keep < 0 or (tokens is not None and keep > tokens):
                raise ValueError(f"logits_to_keep={keep}: keep between 0 (all) and {tokens} positions")
            return keep
        positions = torch.as_tensor(keep, dtype=torch.long)
        if positions.dim() != 1 or positions.numel() == 0:
            raise ValueError("logits_to_keep positions must be a non-empty 1-D list of token positions")
        if tokens is not None and (int(positions.max()) >= tokens or int(positions.min()) < -tokens):
            raise ValueError(f"logits_to_keep positions {positions.tolist()} fall outside the sequence of {tokens} tokens")
        device = ids.device if isinstance(ids, torch.Tensor) else None
        return positions.to(device)

    @traceable
    def generate(self, *inputs: Any, **kwargs: Any) -> Any:
        running = self.__dict__.get("_running_trace")
        if running is not None and running != "generate":
            raise RuntimeError(
                "generate was called inside a trace: it would run a second model call in the middle of this "
                "trace's forward. Trace the generation itself (with model.generate(prompt, max_new_tokens=...) "
                "as tracer:), or call generate outside the trace."
            )
        self._validate(inputs, kwargs)
        return self._stock_generate(*inputs, **kwargs)

    # ---- towers ----

    def load_tower(self, kind: str) -> torch.nn.Module:
        """Materialise the ``"vision"`` or ``"audio"`` tower from the checkpoint (stock module)."""
        if kind not in TOWERS:
            raise ValueError(f"unknown tower {kind!r}; choose 'vision' or 'audio'")
        if self.injection.text_path != module_tree.TEXT_MODEL_PATHS["Gemma3nForConditionalGeneration"]:
            raise ValueError(f"a {type(self.hf_model).__name__} has no towers: only Gemma3nForConditionalGeneration does")
        inner = self.hf_model.model
        current = getattr(inner, f"{kind}_tower")
        if not isinstance(current, TowerStub):
            return current
        reference = inner.language_model.embed_tokens.weight
        tower = materialize(current, dtype=reference.dtype, device=reference.device)
        add_envoy(self.model, f"{kind}_tower", tower)
        return tower
