"""Transcoders on Gemma 3n's MLPs, in the files the field uses: read, checked against a model, written.

A per-layer transcoder (PLT) reads an MLP's input and predicts its output through sparse features:

    pre = W_enc · x + b_enc          x: the MLP's input (``pre_feedforward_layernorm``'s output), [D]
    f   = activation(pre)            ReLU, JumpReLU (``pre · [pre > threshold]``) or TopK
    y   = f · W_dec + b_dec (+ W_skip · x, a skip transcoder's affine path)

``y`` stands in for the MLP's output at one of two sites, named as circuit-tracer names them:
``"hook_mlp_out"`` (default: ``post_feedforward_layernorm``'s output, the point ``mlp_out``, the convention of
circuit-tracer's Gemma 3 configs) or ``"mlp.hook_out"`` (the MLP module's own output, before that norm).

Two layouts are read by `load_transcoders` (never a pickle; every key checked, shapes against the model
before any forward):

- **circuit-tracer's** (also what `save_transcoders` writes, so our transcoders load in its
  ``load_transcoder_set`` unchanged, given the files; its ``load_transcoders(config)`` resolves the listed file
  names from its working directory, so run it from this one): ``config.yaml`` (``model_kind: transcoder_set``, ``feature_input_hook``,
  ``feature_output_hook``, ``transcoders: [files]``, ``activation``/``k``) beside ``layer_{i}.safetensors`` with
  ``W_enc [F, D]``, ``W_dec [F, D]``, ``b_enc [F]``, ``b_dec [D]`` and optionally
  ``activation_function.threshold [F]`` (JumpReLU) and ``W_skip [D, D]``. ReLU when neither a threshold nor
  ``k`` is given, as there.
- **sparsify's** checkpoints: one folder per hookpoint (``…layers.{i}…``), each with ``cfg.json`` and
  ``sae.safetensors`` (``encoder.weight``, ``encoder.bias``, ``W_dec``, ``b_dec``, optional ``W_skip``).

TopK: sparsify keeps the k largest of ``relu(pre)``; circuit-tracer's TopK keeps the k largest of ``pre``
(negative ones too). They agree whenever at least k pre-activations are positive. Files we write say which
(``topk_relu: true``, a key circuit-tracer ignores); a foreign file without it is read with circuit-tracer's rule.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

INPUT_HOOK = "mlp.hook_in"
OUTPUT_HOOKS = {"hook_mlp_out": "mlp_out", "mlp.hook_out": "mlp"}
_LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors$")
_LAYER_NAME = re.compile(r"layers\.(\d+)(?:\.|$)")


class TranscoderError(ValueError):
    """A transcoder file or set that cannot be used here; the message names the file and key."""


class Transcoder(nn.Module):
    """One layer's transcoder: ``encode`` (dense features ``[N, F]``), ``decode``, ``skip`` (see the module doc).

    Built from tensors: ``Transcoder(W_enc, W_dec, b_enc, b_dec, threshold=None, W_skip=None, k=None)``.
    ``topk_relu`` picks sparsify's TopK rule (k largest of ``relu(pre)``) over circuit-tracer's (k largest of
    ``pre``)."""

    def __init__(self, W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor, *,
                 threshold: torch.Tensor | None = None, W_skip: torch.Tensor | None = None, k: int | None = None,
                 topk_relu: bool = True, layer: int | None = None) -> None:
        super().__init__()
        _check_shapes(W_enc, W_dec, b_enc, b_dec, threshold, W_skip, k, where="Transcoder")
        self.W_enc = nn.Parameter(W_enc.detach(), requires_grad=False)
        self.W_dec = nn.Parameter(W_dec.detach(), requires_grad=False)
        self.b_enc = nn.Parameter(b_enc.detach(), requires_grad=False)
        self.b_dec = nn.Parameter(b_dec.detach(), requires_grad=False)
        self.threshold = None if threshold is None else nn.Parameter(threshold.detach(), requires_grad=False)
        self.W_skip = None if W_skip is None else nn.Parameter(W_skip.detach(), requires_grad=False)
        self.k = k
        self.topk_relu = topk_relu
        self.layer = layer

    @property
    def width(self) -> int:
        """F, the number of latents."""
        return self.W_enc.shape[0]

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[1]

    @property
    def activation(self) -> str:
        """``"jumprelu"``, ``"topk"`` or ``"relu"``."""
        return "jumprelu" if self.threshold is not None else "topk" if self.k is not None else "relu"

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """``W_enc · x + b_enc``, ``[..., F]``."""
        return nn.functional.linear(x.to(self.W_enc.dtype), self.W_enc, self.b_enc)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The activation function on pre-activations ``[..., F]``."""
        if self.threshold is not None:
            return pre * (pre > self.threshold)
        if self.k is None:
            return torch.relu(pre)
        ranked = torch.relu(pre) if self.topk_relu else pre
        top = ranked.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense features ``[..., F]`` of MLP inputs ``x [..., D]``."""
        return self.activate(self.pre_activation(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """``f · W_dec + b_dec`` (the skip path is `skip`)."""
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x · W_skipᵀ`` for a skip transcoder, else None."""
        return None if self.W_skip is None else x.to(self.W_skip.dtype) @ self.W_skip.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.decode(self.encode(x))
        skip = self.skip(x)
        return y if skip is None else y + skip

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as circuit-tracer's ``layer_{i}.safetensors`` holds them."""
        out = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["activation_function.threshold"] = self.threshold
        if self.W_skip is not None:
            out["W_skip"] = self.W_skip
        return {name: value.detach().contiguous().cpu() for name, value in out.items()}

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        skip = ", skip" if self.W_skip is not None else ""
        return f"layer={self.layer}, d_model={self.d_model}, width={self.width}, {self.activation}{k}{skip}"


@dataclass
class TranscoderSet(Mapping):
    """Transcoders by layer (a mapping ``layer -> Transcoder``) and the sites they read and write."""

    transcoders: dict[int, Transcoder]
    input_hook: str = INPUT_HOOK
    output_hook: str = "hook_mlp_out"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_hook != INPUT_HOOK:
            raise TranscoderError(f"feature_input_hook {self.input_hook!r}: Gemma 3n transcoders read the MLP's input "
                                  f"({INPUT_HOOK!r}, pre_feedforward_layernorm's output)")
        if self.output_hook not in OUTPUT_HOOKS:
            raise TranscoderError(f"feature_output_hook {self.output_hook!r} is not a site of Gemma 3n's MLP: "
                                  f"use one of {sorted(OUTPUT_HOOKS)}")

    @property
    def output_point(self) -> str:
        """``"mlp_out"`` (post-feedforward norm's output) or ``"mlp"`` (the MLP module's output)."""
        return OUTPUT_HOOKS[self.output_hook]

    def __getitem__(self, layer: int) -> Transcoder:
        return self.transcoders[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.transcoders))

    def __len__(self) -> int:
        return len(self.transcoders)

    def to(self, *args: Any, **kwargs: Any) -> TranscoderSet:
        """Every transcoder moved (``.to(device, dtype)``), in place; returns the set."""
        for transcoder in self.transcoders.values():
            transcoder.to(*args, **kwargs)
        return self

    def check(self, model: Any) -> None:
        """Refuse, naming the layer, a set that does not fit ``model`` (layers, width, dtype, device)."""
        text = model.text_config
        layers = text.num_hidden_layers
        for layer, transcoder in self.transcoders.items():
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layers:
                raise TranscoderError(f"transcoder for layer {layer!r}: this model has layers 0..{layers - 1}")
            if transcoder.d_model != text.hidden_size:
                raise TranscoderError(f"layer {layer}'s transcoder reads d_model={transcoder.d_model}; this model's "
                                      f"hidden size is {text.hidden_size}")
            if transcoder.k is not None and not 1 <= transcoder.k <= transcoder.width:
                raise TranscoderError(f"layer {layer}'s transcoder has k={transcoder.k}: it must be in 1..{transcoder.width}")


def as_transcoder_set(transcoders: Any, model: Any | None = None) -> TranscoderSet:
    """A `TranscoderSet` from a directory, a set, or a mapping ``layer -> Transcoder`` (checked against
    ``model`` when given)."""
    if isinstance(transcoders, (str, Path)):
        result = load_transcoders(transcoders)
    elif isinstance(transcoders, TranscoderSet):
        result = transcoders
    elif isinstance(transcoders, Mapping):
        _refuse_mislabelled(transcoders)
        bad = [layer for layer, t in transcoders.items() if not isinstance(t, Transcoder)]
        if bad:
            raise TypeError(f"transcoders for layers {bad} are not g3n_probe.sae.Transcoder objects (load them with "
                            "g3n.sae.load_transcoders, or build one from its tensors)")
        result = TranscoderSet(dict(transcoders))
    else:
        raise TypeError(f"transcoders are a directory, a TranscoderSet or a mapping layer -> Transcoder; got "
                        f"{type(transcoders).__name__}")
    if not result.transcoders:
        raise TranscoderError("no transcoders given")
    if model is not None:
        result.check(model)
    return result


def _refuse_mislabelled(transcoders: Mapping) -> None:
    """A transcoder that says it belongs to another layer than the key it is given under is a mix-up."""
    for key, transcoder in transcoders.items():
        own = getattr(transcoder, "layer", None)
        if own is not None and own != key:
            raise TranscoderError(f"the transcoder given for layer {key!r} was made for layer {own}")


# ---- reading -------------------------------------------------------------------------------------------


def load_transcoders(directory: str | Path, model: Any | None = None, device: Any = "cpu",
                     dtype: torch.dtype | None = None) -> TranscoderSet:
    """Transcoders from ``directory``, in circuit-tracer's layout or sparsify's (see the module doc), checked
    key by key (and against ``model`` when given) before any forward. Never unpickles."""
    root = Path(directory)
    if not root.is_dir():
        raise TranscoderError(f"{root}: not a directory of transcoders")
    if (root / "config.yaml").is_file():
        result = _load_circuit_tracer(root)
    else:
        result = _load_sparsify(root)
    result.to(device=device, **({} if dtype is None else {"dtype": dtype}))
    if model is not None:
        result.check(model)
    return result


def _load_circuit_tracer(root: Path) -> TranscoderSet:
    config_path = root / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as error:
        raise TranscoderError(f"{config_path}: not valid YAML ({error})") from error
    if not isinstance(config, dict):
        raise TranscoderError(f"{config_path}: expected a mapping of settings")
    if config.get("model_kind", "transcoder_set") != "transcoder_set":
        raise TranscoderError(f"{config_path}: model_kind {config.get('model_kind')!r} is not supported (only "
                              "'transcoder_set', per-layer transcoders)")
    for key in ("feature_input_hook", "feature_output_hook"):
        if key not in config:
            raise TranscoderError(f"{config_path}: key {key!r} is missing")
    activation = config.get("activation")
    if activation not in (None, "relu", "jumprelu", "topk"):
        raise TranscoderError(f"{config_path}: activation {activation!r} is not one of relu, jumprelu, topk")
    k = config.get("k") if activation == "topk" else None
    if activation == "topk" and (isinstance(k, bool) or not isinstance(k, int)):
        raise TranscoderError(f"{config_path}: activation 'topk' needs an integer 'k'; got {k!r}")
    files = _layer_files(root, config, config_path)
    transcoders = {}
    for layer, path in files.items():
        transcoders[layer] = _read_layer(path, layer, k, bool(config.get("topk_relu", False)), activation)
    return TranscoderSet(transcoders, config["feature_input_hook"], config["feature_output_hook"],
                         {key: value for key, value in config.items() if key != "transcoders"})


def _layer_files(root: Path, config: dict, config_path: Path) -> dict[int, Path]:
    listed = config.get("transcoders")
    if listed is None:
        found = {int(m.group(1)): p for p in root.iterdir() if (m := _LAYER_FILE.search(p.name))}
        if not found:
            raise TranscoderError(f"{root}: no layer_{{i}}.safetensors files and no 'transcoders' list in config.yaml")
        return dict(sorted(found.items()))
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise TranscoderError(f"{config_path}: 'transcoders' must be a list of file paths")
    # circuit-tracer reads the list's i-th file as layer i; a set that skips layers says which with 'layers'
    # (written by save_transcoders; circuit-tracer itself cannot hold such a set)
    layers = config.get("layers", list(range(len(listed))))
    if (not isinstance(layers, list) or len(layers) != len(listed) or len(set(layers)) != len(layers)
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
        raise TranscoderError(f"{config_path}: key 'layers' must list one distinct layer index per file in "
                              f"'transcoders'; got {layers!r}")
    files = {}
    for layer, name in zip(layers, listed):
        path = (root / name) if not Path(name).is_absolute() else Path(name)
        if name.startswith("hf://"):
            raise TranscoderError(f"{config_path}: {name!r} is a hub path; fetch the files and list local ones")
        if path.is_symlink() or not path.is_file():
            raise TranscoderError(f"{config_path}: transcoder file {name!r} for layer {layer} is missing (or a link)")
        files[layer] = path
    return files


_CT_KEYS = {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold", "W_skip", "k"}


def _read_layer(path: Path, layer: int, k: int | None, topk_relu: bool, activation: str | None) -> Transcoder:
    tensors = _read_safetensors(path, _CT_KEYS, required={"W_enc", "W_dec", "b_enc", "b_dec"})
    tensors.pop("k", None)  # circuit-tracer's own writer stores TopK's k here too; config.yaml's k rules
    threshold = tensors.get("activation_function.threshold")
    if activation == "jumprelu" and threshold is None:
        raise TranscoderError(f"{path}: activation 'jumprelu' needs the key 'activation_function.threshold'")
    if activation in ("relu", "topk") and threshold is not None:
        raise TranscoderError(f"{path}: key 'activation_function.threshold' with activation {activation!r}")
    try:
        return Transcoder(tensors["W_enc"], tensors["W_dec"], tensors["b_enc"], tensors["b_dec"], threshold=threshold,
                          W_skip=tensors.get("W_skip"), k=k, topk_relu=topk_relu, layer=layer)
    except TranscoderError as error:
        raise TranscoderError(f"{path}: {error}") from None


def _read_safetensors(path: Path, allowed: set[str], required: set[str]) -> dict[str, torch.Tensor]:
    if path.is_symlink() or not path.is_file():
        raise TranscoderError(f"{path}: missing (or a link)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = set(handle.keys())
            unknown = sorted(keys - allowed)
            if unknown:
                raise TranscoderError(f"{path}: unexpected key {unknown[0]!r} (expected {sorted(allowed)})")
            missing = sorted(required - keys)
            if missing:
                raise TranscoderError(f"{path}: key {missing[0]!r} is missing")
            return {key: handle.get_tensor(key) for key in keys}
    except TranscoderError:
        raise
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise TranscoderError(f"{path}: not a readable safetensors file ({error})") from error


_SPARSIFY_KEYS = {"encoder.weight", "encoder.bias", "W_dec", "b_dec", "W_skip"}


def _load_sparsify(root: Path) -> TranscoderSet:
    folders = [root] if (root / "cfg.json").is_file() else sorted(p for p in root.iterdir() if (p / "cfg.json").is_file())
    if not folders:
        raise TranscoderError(f"{root}: neither circuit-tracer's config.yaml nor sparsify checkpoints (cfg.json + "
                              "sae.safetensors per hookpoint)")
    transcoders: dict[int, Transcoder] = {}
    output_hook = None
    for folder in folders:
        match = _LAYER_NAME.search(folder.name)
        if match is None:
            raise TranscoderError(f"{folder}: a sparsify folder names its hookpoint; no 'layers.<i>' in {folder.name!r}")
        layer = int(match.group(1))
        if layer in transcoders:
            raise TranscoderError(f"{folder}: layer {layer} is given twice")
        transcoders[layer], hook = _read_sparsify(folder, layer)
        output_hook = output_hook or hook
    return TranscoderSet(dict(sorted(transcoders.items())), INPUT_HOOK, output_hook or "hook_mlp_out")


def _read_sparsify(folder: Path, layer: int) -> tuple[Transcoder, str]:
    cfg_path = folder / "cfg.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as error:
        raise TranscoderError(f"{cfg_path}: not valid JSON ({error})") from error
    if not cfg.get("transcode", False):
        raise TranscoderError(f"{cfg_path}: key 'transcode' is false: this is an SAE, not a transcoder")
    if cfg.get("activation", "topk") != "topk":
        raise TranscoderError(f"{cfg_path}: key 'activation' is {cfg.get('activation')!r}; only 'topk' is supported")
    tensors = _read_safetensors(folder / "sae.safetensors", _SPARSIFY_KEYS,
                                required={"encoder.weight", "encoder.bias", "W_dec", "b_dec"})
    k = cfg.get("k")
    try:
        transcoder = Transcoder(tensors["encoder.weight"], tensors["W_dec"], tensors["encoder.bias"], tensors["b_dec"],
                                W_skip=tensors.get("W_skip"), k=k, topk_relu=True, layer=layer)
    except TranscoderError as error:
        raise TranscoderError(f"{folder / 'sae.safetensors'}: {error}") from None
    hook = "mlp.hook_out" if folder.name.endswith(".mlp") else "hook_mlp_out"
    return transcoder, hook


def _check_shapes(W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                  threshold: torch.Tensor | None, W_skip: torch.Tensor | None, k: Any, where: str) -> None:
    if W_enc.dim() != 2:
        raise TranscoderError(f"key 'W_enc' must be [F, D]; got {tuple(W_enc.shape)}")
    width, d_model = W_enc.shape
    expected = {"W_dec": (W_dec, (width, d_model)), "b_enc": (b_enc, (width,)), "b_dec": (b_dec, (d_model,)),
                "activation_function.threshold": (threshold, (width,)), "W_skip": (W_skip, (d_model, d_model))}
    for key, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise TranscoderError(f"key {key!r} has shape {tuple(tensor.shape)}; with W_enc [F={width}, D={d_model}] "
                                  f"it must be {shape}")
        if tensor is not None and not tensor.is_floating_point():
            raise TranscoderError(f"key {key!r} is {tensor.dtype}; transcoder weights are floating point")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= width):
        raise TranscoderError(f"k={k!r} is out of range: it must be an integer in 1..{width} (the latents)")


# ---- writing -------------------------------------------------------------------------------------------


_STRUCTURAL = {"model_kind", "transcoders", "layers", "activation", "k", "topk_relu", "feature_input_hook",
               "feature_output_hook", "repo_id", "revision", "subfolder"}


def save_transcoders(directory: str | Path, transcoders: Any, scan: str = "g3n_probe") -> Path:
    """Write ``transcoders`` (a set or a mapping ``layer -> Transcoder``) in circuit-tracer's layout:
    ``layer_{i}.safetensors`` and ``config.yaml``. Returns the directory."""
    result = as_transcoder_set(transcoders)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    activations = {t.activation for t in result.transcoders.values()}
    ks = {t.k for t in result.transcoders.values()}
    if len(activations) > 1 or len(ks) > 1:
        raise TranscoderError(f"one config.yaml holds one activation for every layer; got {sorted(activations)} "
                              f"with k in {sorted(k for k in ks if k is not None)}")
    files = []
    for layer in result:
        name = f"layer_{layer}.safetensors"
        save_file(result[layer].tensors(), str(root / name))
        files.append(name)
    activation = activations.pop()
    config: dict[str, Any] = {
        "model_kind": "transcoder_set", "scan": scan, "feature_input_hook": result.input_hook,
        "feature_output_hook": result.output_hook, "transcoders": files, "activation": activation,
    }
    if list(result) != list(range(len(result))):
        # circuit-tracer reads the i-th listed file as layer i and ignores this key: only we read such a set right
        config["layers"] = list(result)
        warnings.warn(f"transcoders for layers {list(result)} (not 0..{len(result) - 1}): g3n_probe reads them back "
                      "by the 'layers' key, circuit-tracer would take the i-th file for layer i", stacklevel=2)
    if activation == "topk":
        config["k"] = ks.pop()
        config["topk_relu"] = bool(next(iter(result.transcoders.values())).topk_relu)
    # other settings a loaded set carried come along; nothing that says what the files are, or where from
    config.update({key: value for key, value in result.metadata.items() if key not in config and key not in _STRUCTURAL})
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def from_sparsify(coder: Any, layer: int | None = None) -> Transcoder:
    """A `Transcoder` holding a sparsify ``SparseCoder`` (trained with ``transcode=True``)'s weights."""
    cfg = getattr(coder, "cfg", None)
    if cfg is None or not getattr(cfg, "transcode", False):
        raise TranscoderError("from_sparsify takes a sparsify SparseCoder trained as a transcoder (transcode=True)")
    skip = getattr(coder, "W_skip", None)
    return Transcoder(coder.encoder.weight.float(), coder.W_dec.float(), coder.encoder.bias.float(),
                      coder.b_dec.float(), W_skip=None if skip is None else skip.float(), k=cfg.k, topk_relu=True,
                      layer=layer)
