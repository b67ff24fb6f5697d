"""MatFormer sub-models: the smaller Gemma 3n nested inside a larger one.

Gemma 3n E4B contains E2B: skip layers 20–24 and cut every FFN to its first 8192 units. A sub-model
here is a new stock model whose weights are *slices* of the parent's:

* FFN weights are sliced (gate/up rows, down columns). Layers 0–9 are sparse (gaussian top-k over
  the FFN width), and their statistics depend on the width, so slicing is the only honest way —
  masking the extra units would change the cut-off;
* the per-layer table and the per-layer projection keep only the kept layers' slots;
* the KV-sharing layout is recomputed for the kept layers and must keep every reuse layer reading
  the same store layer as in the parent; a KV 'store' layer cannot be skipped.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ..checkpoint import module_tree
from ..checkpoint.ple import host_resident, is_host_resident
from ..checkpoint.reading import component_of
from ..checkpoint.towers import build_text_only
from ..probe.gemma3n_probe import Gemma3nProbe

PRESETS: dict[str, dict[str, Any]] = {"e2b": {"layers_to_skip": list(range(20, 25)), "ffn_width": 8192, "parent_layers": 35}}


def submodel_config(config: Any, layers_to_skip: Sequence[int] = (), ffn_widths: int | Sequence[int] | None = None):
    """(sub-model config, kept parent layer indices) for skipping layers and cutting FFN widths."""
    text = config.get_text_config()
    n = text.num_hidden_layers
    skip = sorted(set(int(i) for i in layers_to_skip))
    bad = [i for i in skip if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers_to_skip {bad} out of range: the parent has layers 0..{n - 1}")
    kept = [i for i in range(n) if i not in skip]
    if not kept:
        raise ValueError("a sub-model needs at least one layer")
    stores = [i for i in skip if module_tree.is_kv_store(text, i)]
    if stores:
        readers = {s: module_tree.kv_readers(text, s) for s in stores}
        raise ValueError(f"layers {stores} are KV 'store' layers (read by {readers}); a sub-model cannot skip them")
    if ffn_widths is None:
        widths = [text.intermediate_size[i] for i in kept]
    elif isinstance(ffn_widths, int):
        widths = [ffn_widths] * len(kept)
    else:
        widths = [int(w) for w in ffn_widths]
        if len(widths) != len(kept):
            raise ValueError(f"ffn_widths has {len(widths)} entries for {len(kept)} kept layers")
    for layer, width in zip(kept, widths):
        if not 0 < width <= text.intermediate_size[layer]:
            raise ValueError(f"layer {layer}: FFN width {width} must be in 1..{text.intermediate_size[layer]}")

    sub = copy.deepcopy(config)
    sub_text = sub.get_text_config()
    sub_text.num_hidden_layers = len(kept)
    sub_text.layer_types = [text.layer_types[i] for i in kept]
    sub_text.intermediate_size = widths
    sub_text.activation_sparsity_pattern = [text.activation_sparsity_pattern[i] for i in kept]
    sub_text.num_kv_shared_layers = len(set(module_tree.kv_sources(text)) & set(kept))
    position = {parent: child for child, parent in enumerate(kept)}
    parent_sources = module_tree.kv_sources(text)
    for child, source in module_tree.kv_sources(sub_text).items():
        if position.get(parent_sources.get(kept[child], -1)) != source:
            raise ValueError(f"skipping {skip} would make layer {kept[child]} read K/V from parent layer "
                             f"{kept[source]} instead of {parent_sources.get(kept[child])}")
    return sub, kept


def sliced_state_dict(state: dict[str, torch.Tensor], config: Any, kept: list[int], widths: list[int]) -> dict[str, torch.Tensor]:
    """The parent's text tensors, sliced to a sub-model (keys renumbered to the kept layers).

    Values may be views of the parent's tensors; loading them into a new model copies them.
    """
    text = config.get_text_config()
    n, per_layer = text.num_hidden_layers, text.hidden_size_per_layer_input
    position = {parent: child for child, parent in enumerate(kept)}
    out: dict[str, torch.Tensor] = {}
    prefix = "model.language_model.layers."
    for key, value in state.items():
        if key.startswith(prefix):
            index_text, rest = key[len(prefix):].split(".", 1)
            parent = int(index_text)
            if parent not in position:
                continue
            width = widths[position[parent]]
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                value = value[:width]
            elif rest == "mlp.down_proj.weight":
                value = value[:, :width]
            out[f"{prefix}{position[parent]}.{rest}"] = value
        elif key == "model.language_model.embed_tokens_per_layer.weight":
            out[key] = value.view(value.shape[0], n, per_layer)[:, kept].reshape(value.shape[0], -1)
        elif key == "model.language_model.per_layer_model_projection.weight":
            out[key] = value.view(n, per_layer, value.shape[-1])[kept].reshape(-1, value.shape[-1])
        else:
            out[key] = value
    return out


def submodel(model: Gemma3nProbe, layers_to_skip: Sequence[int] = (), ffn_widths: int | Sequence[int] | None = None,
             preset: str | None = None) -> Any:
    """A new `Gemma3nProbe` whose weights are slices of ``model``'s (see the module docstring).

    ``preset="e2b"`` is the official E2B-inside-E4B configuration (layers 20–24 skipped, every
    FFN 8192) and needs an E4B-shaped parent.
    """
    parent = model.hf_model
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown MatFormer preset {preset!r}; choose one of {', '.join(PRESETS)}")
        spec = PRESETS[preset]
        if parent.config.get_text_config().num_hidden_layers != spec["parent_layers"]:
            raise ValueError(f"preset {preset!r} needs an E4B-shaped parent with {spec['parent_layers']} layers")
        layers_to_skip, ffn_widths = spec["layers_to_skip"], spec["ffn_width"]
    config, kept = submodel_config(parent.config, layers_to_skip, ffn_widths)
    state = {k: v for k, v in parent.state_dict().items() if k != "lm_head.weight" and component_of(k) not in ("vision tower", "audio tower")}
    state = sliced_state_dict(state, parent.config, kept, config.get_text_config().intermediate_size)
    device = module_tree.text_model(parent).embed_tokens.weight.device
    table = module_tree.per_layer_table(parent)
    child = build_text_only(config, device, table.weight.dtype)
    missing, unexpected = child.load_state_dict(state, strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise RuntimeError(f"sub-model weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    child.tie_weights()
    for kind in ("vision", "audio"):
        stub, source = getattr(child.model, f"{kind}_tower"), getattr(parent.model, f"{kind}_tower")
        for attr in ("checkpoint_dir", "tensor_files"):
            if hasattr(source, attr):
                setattr(stub, attr, getattr(source, attr))
    child_table = module_tree.per_layer_table(child)
    if table.weight.device != device:
        child_table.to(table.weight.device)
    if is_host_resident(table):
        host_resident(child_table, device)
    child.eval()
    return Gemma3nProbe(child, tokenizer=model.tokenizer)


def save(sub: Gemma3nProbe, path: str | os.PathLike) -> Path:
    """Write a sub-model as a text-only checkpoint `g3n_probe.load` reads (towers are not included)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    module = sub.hf_model
    module.config.save_pretrained(out)
    if sub.tokenizer is not None:
        sub.tokenizer.save_pretrained(out)
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
