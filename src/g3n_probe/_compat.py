"""The seam: every private name of nnsight, torch and transformers that g3n_probe touches, behind a function.

Nothing else in the package uses an underscore name of those libraries. When a pinned version moves
(pyproject pins transformers 5.24.x and nnsight 0.8.x), this file is the one to re-check; each entry
names the version it was checked on.

| library | touchpoint | checked on | used by |
|---|---|---|---|
| nnsight | ``nnsight.intervention.source.STATE``: a module's ``__dict__`` entry whose ``active()`` says whether a trace runs | 0.8.1 | `is_traced` |
| nnsight | ``Batcher._narrow_tensor`` / ``_widen_tensor`` / ``assemble_skip``, ``SkipParts``, a view's ``_nnsight_batch`` mark | 0.8.1 | `AxisBatcher` (stream stacks batched on dim 1) |
| nnsight | ``TransformersModel._call`` / ``_batch_size`` / ``_wrap``, ``_batcher_class``, ``generate.__wrapped__`` | 0.8.1 | `ProbeModelBase` |
| nnsight / transformers | what nnsight reads off its pipeline: ``.model``, ``.task`` and the Pipeline API's ``_sanitize_parameters`` | 0.8.1 / 5.24.0 | `ModelOnlyPipeline` (a probe without a tokenizer) |
| nnsight | ``Envoy._module``, ``Envoy._add_envoy``, the ``Envoy.input`` / ``.output`` descriptors | 0.8.1 | `module_of`, `add_envoy`, `base_envoy_value` |
| nnsight | ``Envoy._child_map`` / ``_children``, ``Interleaver.envoys`` (an envoy's entries in its parent and the tree) | 0.8.1 | `remove_envoy` (`sae` splices) |
| nnsight | ``Envoy.trace(tracer_cls=...)``, ``InterleavingTracer.execute`` | 0.8.1 | `probe.ExclusiveTracer` |
| nnsight | ``OutOfOrderError`` names a ``.grad`` location ``f"{id(tensor)}.grad"`` | 0.8.1 | `points.Injection.explain_out_of_order` |
| nnsight | a module's ``__dict__`` entries it adds on wrapping (``forward``, ``__nnsight__`` state) | 0.8.1 | `unwrap_module` (probe release) |
| torch | ``torch._subclasses.fake_tensor.FakeTensor`` (nnsight's scan runs on fake tensors) | 2.13 | `is_fake` |
| torch | ``Module._forward_hooks`` / ``_forward_pre_hooks`` / ``_modules``, ``Tensor._version`` | 2.13 | `has_hooks`, `hook_functions`, `child_modules`, `tensor_version` |
| transformers | ``modeling_gemma3n.AutoModel`` is the name ``Gemma3nModel.__init__`` builds towers with | 5.24.0 | `gemma3n_builds_submodels_with` |
| transformers | ``modeling_gemma3n.eager_attention_forward`` forms P = softmax(QKᵀ) and returns ``matmul(P, V)`` | 5.24.0 | `points.attention` |
| transformers | a config's ``_attn_implementation`` (read; set only on configs g3n_probe builds itself) | 5.24.0 | `attention_implementation`, `set_attention_implementation` |
| transformers | ``from_pretrained(None, config=..., state_dict=...)`` with lazy safetensors slices | 5.24.0 | `loading` |
| transformers | a KV cache: ``DynamicCache(ddp_cache_data=...)`` without a config (every layer a full-length ``DynamicLayer``), a layer's ``keys`` / ``values`` / ``is_initialized``, the forward keyword ``cache`` (``past_key_values`` is its deprecated alias), Gemma 3n's store layers handing ``cache.update``'s full keys to the KV-reuse layers | 5.24.0 | `kv_cache`, `cached_kv` (`patching_cache`) |
| transformers | how ``Gemma3nTextModel`` calls a decoder layer: ``(hidden_states [S,B,t,D], (cos, sin) [B|1,t,Dh], per_layer_input [B,t,P])`` and keywords ``attention_mask`` ([B|1,1,t,kv], or None when sdpa may take is_causal) and ``position_ids`` | 5.24.0 | `keep_last_positions` (`patching_cache`) |
| transformers | a decoder layer's keyword ``shared_kv_states`` (the forward's ``KVSharingDict``: a KV 'store' layer puts its (keys, values) there under its layer type, the KV-reuse layers read them) | 5.24.0 | `share_kv_before` (`patching_cache`) |
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from nnsight.intervention.batching import Batcher, SkipParts
from nnsight.intervention.envoy import Envoy
from nnsight.intervention.source import STATE
from nnsight.modeling.transformers import TransformersModel
from torch._subclasses.fake_tensor import FakeTensor

# ---- nnsight ---------------------------------------------------------------------------------------


def is_traced(module: torch.nn.Module) -> bool:
    """Whether an nnsight trace is running on a model that wraps ``module``."""
    state = module.__dict__.get(STATE)
    return state is not None and state.active()[0] is not None


def module_of(envoy: Envoy) -> Any:
    """The torch module an nnsight envoy stands for."""
    return envoy._module


def add_envoy(envoy: Envoy, name: str, module: torch.nn.Module) -> Envoy:
    """Register ``module`` as child ``name`` of ``envoy``'s module and give it an envoy."""
    return envoy._add_envoy(name, module)


def remove_envoy(parent: Envoy, name: str) -> None:
    """Undo `add_envoy`: child ``name`` leaves ``parent``'s module, and its envoys (its subtree's) leave the
    tree and the interleaver, each module losing what nnsight put on it."""
    envoy = parent._child_map.pop(name, None)
    parent._module._modules.pop(name, None)
    if envoy is None:
        return
    parent._children[:] = [child for child in parent._children if child is not envoy]
    if parent.__dict__.get(name) is envoy:
        del parent.__dict__[name]
    for sub in envoy.modules():
        if parent.interleaver.envoys.get(id(sub._module)) is sub:
            del parent.interleaver.envoys[id(sub._module)]
        unwrap_module(sub._module)


def base_envoy_value(envoy: Envoy, side: str) -> Any:
    """nnsight's own ``envoy.input`` / ``envoy.output`` (for an envoy subclass that checks before it)."""
    return getattr(Envoy, side).__get__(envoy)


def set_base_envoy_value(envoy: Envoy, side: str, value: Any) -> None:
    getattr(Envoy, side).__set__(envoy, value)


def base_skip(envoy: Envoy, replacement: Any) -> None:
    """nnsight's own ``Envoy.skip``, past an envoy subclass's checks (a sweep skipping a KV 'store' layer while
    it hands on the layer's keys and values itself: `share_kv_before`)."""
    Envoy.skip(envoy, replacement)


#: What nnsight adds to a module's ``__dict__`` when it wraps it (its controller and its state).
NNSIGHT_MODULE_ATTRIBUTES = ("forward", STATE)


def unwrap_module(module: torch.nn.Module) -> None:
    """Take off what nnsight put on ``module`` when it was wrapped (nothing if it was not)."""
    for name in NNSIGHT_MODULE_ATTRIBUTES:
        module.__dict__.pop(name, None)


class AxisBatcher(Batcher):
    """nnsight's batcher with the batch axis of each tensor asked of ``batch_dim`` (0 unless marked).

    nnsight narrows and widens every served tensor on dimension 0, through private methods; this class
    is the one place that overrides them. Subclasses provide ``batch_dim(tensor)`` and ``remark(tensor, dim)``.
    """

    def batch_dim(self, tensor: torch.Tensor) -> int:
        return 0

    def remark(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return tensor

    def _narrow_tensor(self, tensor: torch.Tensor, group: list) -> torch.Tensor:
        dim = self.batch_dim(tensor)
        if dim == 0:
            return super()._narrow_tensor(tensor, group)
        start, size = group
        if tensor.dim() <= dim or tensor.shape[dim] != self.total:
            return tensor
        view = tensor.narrow(dim, start, size)
        view._nnsight_batch = True
        return self.remark(view, dim)

    def _widen_tensor(self, full: torch.Tensor, group: list, edited: torch.Tensor) -> torch.Tensor:
        dim = self.batch_dim(full)
        if full.dim() <= dim or full.shape[dim] != self.total:
            return edited
        start, size = group
        self.check_rows(full, dim, size, edited)
        pre = full.narrow(dim, 0, start)
        post = full.narrow(dim, start + size, self.total - start - size)
        return self.remark(torch.cat([pre, edited, post], dim=dim), dim)

    def check_rows(self, full: torch.Tensor, dim: int, size: int, edited: Any) -> None:
        """Called before an invoke's rows are widened back; raise if ``edited`` does not fit."""

    def assemble_skip(self, running: Any) -> Any:
        if not isinstance(running, SkipParts):
            return running
        parts = sorted(running.parts, key=lambda part: part[0][0])
        if sum(size for (_, size), _ in parts) != self.total:
            return super().assemble_skip(running)  # raises nnsight's "skip in every invoke" error
        first = parts[0][1]
        if isinstance(first, torch.Tensor):
            dim = self.batch_dim(first)
            return self.remark(torch.cat([replacement for _, replacement in parts], dim=dim), dim)
        return super().assemble_skip(running)


@dataclass
class ModelOnlyPipeline:
    """What nnsight reads off its transformers pipeline (``.model``, ``.task`` and the Pipeline API's
    ``_sanitize_parameters``, checked on nnsight 0.8 / transformers 5.24), without one: token ids need no
    tokenizer, and nnsight's pipeline cannot be built without one."""

    model: torch.nn.Module
    task: str
    tokenizer: Any = None   # a model that does not generate still tokenizes its texts

    @staticmethod
    def _sanitize_parameters(**kwargs: Any) -> tuple[dict, dict, dict]:
        return {}, kwargs, {}  # every keyword goes to the model's forward

    def preprocess(self, text: Any, **params: Any) -> Any:
        """One text's model inputs (``input_ids``, ``attention_mask``), as the text-generation pipeline makes them."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it takes token ids, not text")
        return self.tokenizer(text, return_tensors="pt", **params)


class ProbeModelBase(TransformersModel):
    """nnsight's ``TransformersModel`` with its private steps renamed to hooks a subclass overrides:
    ``_check_inputs`` (before the batch is sized), ``_prepare_call`` (the forward's arguments), ``_run_call`` (around it),
    ``_wrap_without_tokenizer`` (nnsight insists on a tokenizer for its pipeline), ``batcher_class``; and
    ``_stock_generate``, nnsight's own ``generate``. Private: they are the probe's plumbing, not its API."""

    batcher_class: type = Batcher

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._batcher_class = cls.batcher_class

    def _check_inputs(self, inputs: tuple, kwargs: dict) -> None:
        """Raise for inputs nnsight would otherwise fail on deep inside."""

    def _prepare_call(self, inputs: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return inputs, kwargs

    def _run_call(self, call: Callable[[], Any]) -> Any:
        return call()

    def _wrap_without_tokenizer(self, module: torch.nn.Module) -> torch.nn.Module | None:
        """Return the module to skip nnsight's pipeline (no tokenizer), or None to build it."""
        return None

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        self._check_inputs(inputs, kwargs)
        return super()._batch_size(*inputs, **kwargs)

    def _wrap(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        bare = self._wrap_without_tokenizer(module)
        return bare if bare is not None else super()._wrap(module, *args, **kwargs)

    def _call(self, *inputs: Any, **kwargs: Any) -> Any:
        inputs, kwargs = self._prepare_call(inputs, kwargs)
        return self._run_call(lambda: super(ProbeModelBase, self)._call(*inputs, **kwargs))

    def _stock_generate(self, *inputs: Any, **kwargs: Any) -> Any:
        """nnsight's ``generate`` body, without its ``@traceable`` wrapper (the subclass's own carries it)."""
        return TransformersModel.generate.__wrapped__(self, *inputs, **kwargs)


# ---- torch -----------------------------------------------------------------------------------------


def is_fake(tensor: torch.Tensor) -> bool:
    """A fake (shape-only) tensor, as nnsight's scan runs on, or a meta tensor."""
    return isinstance(tensor, FakeTensor) or tensor.is_meta


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether any torch forward hook or pre-hook is registered on ``module``."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def interleaving(envoy: Envoy) -> bool:
    """Whether ``envoy``'s model is running a trace now (the caller is inside its body)."""
    return bool(envoy.interleaver.interleaving)


def forward_hooks(module: torch.nn.Module) -> list[tuple[int, Callable, str]]:
    """``(handle id, function, "forward hook" | "forward pre-hook")`` for every torch forward hook on ``module``."""
    return [(key, fn, "forward hook") for key, fn in module._forward_hooks.items()] + \
        [(key, fn, "forward pre-hook") for key, fn in module._forward_pre_hooks.items()]


def global_forward_hooks() -> list[Callable]:
    """The process-wide forward hooks and pre-hooks (``register_module_forward_hook`` and friends)."""
    from torch.nn.modules import module as torch_module
    return [*torch_module._global_forward_hooks.values(), *torch_module._global_forward_pre_hooks.values()]


def hook_functions(module: torch.nn.Module) -> list[Callable]:
    """The forward hooks registered on ``module``, in order."""
    return list(module._forward_hooks.values())


def child_modules(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``module``'s registered children by name (the live dict: for membership tests)."""
    return module._modules


def remove_child(parent: torch.nn.Module, name: str) -> None:
    parent._modules.pop(name, None)


def tensor_version(tensor: torch.Tensor) -> int:
    """A counter torch bumps on every in-place write to ``tensor``."""
    return tensor._version


# ---- transformers ----------------------------------------------------------------------------------

_builder_lock = threading.RLock()


@contextmanager
def gemma3n_builds_submodels_with(builder: Any) -> Iterator[Any]:
    """While active, ``modeling_gemma3n`` builds its sub-models (text model, towers) with ``builder``
    instead of ``AutoModel``; yields the real ``AutoModel``. Restored on exit, under a lock."""
    from transformers.models.gemma3n import modeling_gemma3n

    with _builder_lock:
        real = modeling_gemma3n.AutoModel
        modeling_gemma3n.AutoModel = builder
        try:
            yield real
        finally:
            modeling_gemma3n.AutoModel = real


def attention_implementation(config: Any) -> str | None:
    return getattr(config, "_attn_implementation", None)


def set_attention_implementation(config: Any, name: str | None) -> None:
    """Only for configs g3n_probe builds itself (synthetic models): a user's config is never changed."""
    config._attn_implementation = name


#: The keyword a Gemma 3n forward takes a KV cache by (5.24.0; ``past_key_values`` is a deprecated alias, and
#: nnsight adds no attention mask beside it only under that old name, so callers pass the mask themselves).
CACHE_KEYWORD = "cache"


def kv_cache(layers: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]] = ()) -> Any:
    """A transformers ``DynamicCache`` holding ``layers[i]`` = (keys, values) ``[B, Hkv, t, Dh]`` for layer i
    (None, None: left empty, as a KV-reuse layer's is). Built without a config, so every layer is a full-length
    ``DynamicLayer``: a sliding-window layer keeps all its keys (``DynamicSlidingWindowLayer`` would keep the last
    window − 1 only) and the sliding-window mask does the windowing, so key axes keep the full sequence length.
    Checked on 5.24.0: the mask sizes come from layer 0 (no layer is sliding), its offset is the cached length."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(layers)) if layers else DynamicCache()


def cached_kv(cache: Any) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Each layer's (keys, values) in a `kv_cache` after a forward, (None, None) for a layer never written."""
    return [(layer.keys, layer.values) if layer.is_initialized and layer.keys.numel() else (None, None)
            for layer in cache.layers]


def share_kv_before(layer: torch.nn.Module, layer_type: str, keys: torch.Tensor, values: torch.Tensor) -> Any:
    """Until the returned handle is removed, every call of decoder ``layer`` (a KV 'store' layer) first puts
    (``keys``, ``values``) into the forward's ``shared_kv_states`` under ``layer_type``, as its attention would:
    a torch forward pre-hook, so it runs even when nnsight skips the layer's body (checked on 5.24.0, where
    the text model passes the dict as a keyword to every decoder layer)."""
    hook = functools.partial(_share_kv, layer_type, keys, values)
    return layer.register_forward_pre_hook(hook, with_kwargs=True)


def _share_kv(layer_type: str, keys: torch.Tensor, values: torch.Tensor, module: torch.nn.Module, args: tuple,
              kwargs: dict) -> None:
    kwargs["shared_kv_states"][layer_type] = (keys, values)


def keep_last_positions(layer: torch.nn.Module, keep: int, total: int, first: bool) -> Any:
    """Until the returned handle is removed, decoder ``layer`` runs its last ``keep`` query positions only: a
    torch forward pre-hook (prepended, so the points' own pre-hooks see the same arguments) cuts the
    per-position arguments the text model hands every layer (the rotary (cos, sin), the per-layer input,
    the mask's query rows, ``position_ids``) and, where ``first``, the stack entering it. The keys stay
    whole (``total`` of them). Where sdpa was to use ``is_causal`` (no mask) a boolean causal mask for those
    rows is built, since fewer queries than keys must align to the end (checked on 5.24.0)."""
    hook = functools.partial(_last_positions, keep, total, first)
    return layer.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)


def _last_positions(keep: int, total: int, first: bool, module: torch.nn.Module, args: tuple,
                    kwargs: dict) -> tuple:
    hidden, (cos, sin), per_layer, *rest = args
    if first:
        hidden = hidden[:, :, -keep:].contiguous()
    mask = kwargs.get("attention_mask")
    if mask is None:
        queries = torch.arange(total - keep, total, device=hidden.device)
        mask = (torch.arange(total, device=hidden.device)[None, :] <= queries[:, None])[None, None]
    else:
        mask = mask[..., -keep:, :]
    kwargs["attention_mask"] = mask
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"][..., -keep:]
    cut = (cos[:, -keep:].contiguous(), sin[:, -keep:].contiguous())
    return (hidden, cut, per_layer[:, -keep:].contiguous(), *rest), kwargs
