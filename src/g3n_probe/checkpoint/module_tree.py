"""Facts about the stock Gemma 3n module tree that several parts of g3n_probe rely on.

Kept in one place so that a change in transformers is fixed once: where the text model sits under
each of the four stock classes, where the per-layer-embedding table lives, which layers store and
which reuse keys and values (KV sharing).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: The stock classes g3n_probe accepts, and where each keeps its ``Gemma3nTextModel``.
TEXT_MODEL_PATHS = {
    "Gemma3nForConditionalGeneration": "model.language_model",
    "Gemma3nModel": "language_model",
    "Gemma3nForCausalLM": "model",
    "Gemma3nTextModel": "",
}

#: The per-layer-embedding table, relative to the text model.
PER_LAYER_TABLE = "embed_tokens_per_layer"


def text_model_path(root: nn.Module) -> str:
    """Dotted path of the ``Gemma3nTextModel`` inside ``root`` ('' when ``root`` is one).

    Raises TypeError naming the class for anything that is not one of the four stock Gemma 3n classes.
    """
    from transformers.models.gemma3n import modeling_gemma3n

    for name, path in TEXT_MODEL_PATHS.items():
        if isinstance(root, getattr(modeling_gemma3n, name)):
            return path
    raise TypeError(
        f"{type(root).__name__} is not a stock Gemma 3n model: g3n_probe injects into "
        + ", ".join(TEXT_MODEL_PATHS) + " (transformers.models.gemma3n)"
    )


def text_model(root: nn.Module) -> Any:
    """The ``Gemma3nTextModel`` of any of the four stock classes."""
    path = text_model_path(root)
    return root.get_submodule(path) if path else root


def per_layer_table(root: nn.Module) -> Any:
    """The per-layer-embedding module (``Gemma3nTextScaledWordEmbedding``, [vocab, L·P])."""
    return text_model(root).get_submodule(PER_LAYER_TABLE)


def kv_sources(text_config: Any) -> dict[int, int]:
    """KV-reuse layer -> the 'store' layer whose keys and values it reads (same attention type)."""
    modes, kinds = text_config.kv_sharing_modes, text_config.layer_types
    sources = {}
    for i, mode in enumerate(modes):
        if mode == "reuse":
            sources[i] = max(j for j in range(i) if modes[j] == "store" and kinds[j] == kinds[i])
    return sources


def kv_readers(text_config: Any, store: int) -> list[int]:
    """The layers that reuse the keys and values of ``store`` (empty if it is not a store layer)."""
    return [reader for reader, source in kv_sources(text_config).items() if source == store]


def is_kv_store(text_config: Any, layer: int) -> bool:
    return text_config.kv_sharing_modes[layer] == "store"


def clip_coefficients(module: Any) -> int:
    """Clamp every AltUp coefficient to ±altup_coef_clip in place; returns how many changed."""
    clip = module.config.get_text_config().altup_coef_clip
    if clip is None:
        return 0
    changed = 0
    with torch.no_grad():
        for layer in text_model(module).layers:
            for matrix in (layer.altup.prediction_coefs, layer.altup.correction_coefs):
                changed += int((matrix.weight.abs() > clip).sum())
                matrix.weight.clamp_(-clip, clip)
    return changed
