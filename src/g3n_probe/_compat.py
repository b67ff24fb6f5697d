"""Every private touchpoint g3n_probe has in nnsight, torch and transformers, in one place.

Each entry names what it relies on and the version it was checked against. When a pinned version
moves (pyproject pins transformers 5.24.x and nnsight 0.8.x), this file is the list to re-check.

| library | touchpoint | checked on | used by |
|---|---|---|---|
| nnsight | ``nnsight.intervention.source.STATE``: a module's ``__dict__`` entry whose ``active()`` says whether a trace runs | 0.8.1 | `is_traced` (points skip work when nobody can see them) |
| nnsight | ``Batcher._narrow_tensor`` / ``_widen_tensor`` / ``assemble_skip`` and ``SkipParts`` | 0.8.1 | `probe.StreamBatcher` (stream stacks batched on dim 1) |
| nnsight | ``TransformersModel._call`` / ``_batch_size`` / ``_wrap`` / ``interleave``, ``generate.__wrapped__``, ``_batcher_class``, ``envoys=``, ``Envoy._add_envoy`` | 0.8.1 | `probe.Gemma3nProbe` |
| nnsight | ``Envoy.trace(tracer_cls=...)`` and ``InterleavingTracer.execute`` (workers are registered on the model's one interleaver before it runs) | 0.8.1 | `probe.ExclusiveTracer` |
| nnsight | ``eproperty`` with ``postprocess`` for a layer's ``inputs`` | 0.8.1 | `probe.LayerEnvoy` |
| nnsight | ``self.pipeline`` is read only for ``.model``, ``.task`` and ``_sanitize_parameters`` on token-id input | 0.8.1 | `probe._ModelOnly` (a model without a tokenizer) |
| nnsight | ``OutOfOrderError`` names a ``.grad`` location ``f"{id(tensor)}.grad"`` | 0.8.1 | `points.Injection.explain` |
| nnsight | a module's ``__dict__["forward"]`` is nnsight's controller; hooks and method routes live elsewhere | 0.8.1 | `points` (never touches ``forward``) |
| torch | ``torch._subclasses.fake_tensor.FakeTensor`` (nnsight's scan runs on fake tensors) | 2.13 | input validation |
| torch | ``Tensor._version`` (detects an in-place write to attention probabilities) | 2.13 | `points` |
| transformers | ``modeling_gemma3n.AutoModel`` is the name ``Gemma3nModel.__init__`` builds towers with | 5.24.0 | `towers.tower_stubs` |
| transformers | ``modeling_gemma3n.eager_attention_forward`` / ``repeat_kv`` (called, never replaced) | 5.24.0 | `eager_with_pattern` |
| transformers | ``AttentionInterface`` / ``AttentionMaskInterface`` ``.register`` and a config's ``_attn_implementation`` | 5.24.0 | the ``attn_pattern`` route |
| transformers | ``from_pretrained(None, config=..., state_dict=...)`` with lazy safetensors slices | 5.24.0 | `loading` |
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from nnsight.intervention.source import STATE
from torch._subclasses.fake_tensor import FakeTensor  # noqa: F401  (re-exported for input validation)

#: The attention implementation name under which eager attention serves ``attn_pattern``.
PATTERN_ATTENTION = "g3n_probe_eager"


def is_traced(module: torch.nn.Module) -> bool:
    """Whether an nnsight trace is running on a model that wraps ``module``."""
    state = module.__dict__.get(STATE)
    return state is not None and state.active()[0] is not None


def stock_eager_attention() -> Callable:
    from transformers.models.gemma3n import modeling_gemma3n

    return modeling_gemma3n.eager_attention_forward


def repeat_kv(value: torch.Tensor, groups: int) -> torch.Tensor:
    from transformers.models.gemma3n import modeling_gemma3n

    return modeling_gemma3n.repeat_kv(value, groups)


def register_attention(name: str, function: Callable) -> None:
    """Add ``function`` to transformers' attention registry under a new name, with eager's masks.

    Additive only: no existing entry (``eager``, ``sdpa``, …) and no module global is replaced, so
    models that do not select ``name`` never call it.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def attention_implementation(config: Any) -> str | None:
    return getattr(config, "_attn_implementation", None)


def set_attention_implementation(config: Any, name: str | None) -> None:
    # The config's own setter (it recurses into sub-configs; a text config has none).
    config._attn_implementation = name
