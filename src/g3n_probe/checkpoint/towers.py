"""Lazy stand-ins for Gemma 3n's vision and audio towers, and the one text-only skeleton builder.

``Gemma3nModel.__init__`` builds both towers through ``AutoModel.from_config``; the vision tower is
timm's MobileNetV5 (294M parameters, and building it imports timm and PIL), the audio tower a 681M
Conformer. Neither runs on a text forward. `tower_stubs` makes that ``from_config`` call return a
`TowerStub` instead: a parameter-free module that remembers the tower's config and where each of
its tensors lives in the checkpoint, and raises a clear error if anything calls it.
`build_text_only` builds the stock model with stubs (on any device, the meta device included);
`materialize` builds the real tower later, from the checkpoint, when a user asks for it.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .._compat import gemma3n_builds_submodels_with
from .reading import TOWER_PREFIXES, by_file, fetched_text_only, is_text_key, open_safetensors

TOWERS = tuple(TOWER_PREFIXES)


class TowerNotLoadedError(RuntimeError):
    """A tower was called, or asked for, on a text-only model."""


class TowerStub(nn.Module):
    """Parameter-free placeholder for a tower that was not loaded.

    Attributes:
        kind: ``"vision"`` or ``"audio"``.
        config: the tower's config, exactly as the checkpoint's config.json gives it.
        checkpoint_dir: the checkpoint the tower's tensors can be read from (set by the loader).
        tensor_files: checkpoint key -> shard file name, for every tensor of this tower.
    """

    def __init__(self, kind: str, config: Any) -> None:
        super().__init__()
        self.kind = kind
        self.config = config
        self.checkpoint_dir: Path | None = None
        self.tensor_files: dict[str, str] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TowerNotLoadedError(
            f"the {self.kind} tower is not loaded: g3n_probe loads Gemma 3n text-only. "
            f"Call model.load_tower({self.kind!r}) to materialise it from the checkpoint"
            + (" (needs the 'towers' extra: pip install 'g3n_probe[towers]')." if self.kind == "vision" else ".")
        )

    def extra_repr(self) -> str:
        where = f", {len(self.tensor_files)} tensors in {self.checkpoint_dir}" if self.checkpoint_dir else ""
        return f"kind={self.kind!r}, not loaded{where}"


def _stub_kind(config: Any) -> str | None:
    model_type = getattr(config, "model_type", None)
    return {"gemma3n_vision": "vision", "gemma3n_audio": "audio"}.get(model_type)


class _StubbingAutoModel:
    """What ``modeling_gemma3n`` builds sub-models with while `tower_stubs` is active: stubs for the
    chosen towers, the real ``AutoModel`` for everything else (the text model)."""

    def __init__(self, wanted: set[str]) -> None:
        self.wanted = wanted
        self.real: Any = None

    def __getattr__(self, name: str) -> Any:   # anything else modeling_gemma3n asks of AutoModel
        return getattr(self.__dict__["real"], name)

    def from_config(self, *args: Any, **kwargs: Any) -> nn.Module:
        # transformers passes the config positionally in some versions and as config= in others
        config = kwargs["config"] if "config" in kwargs else args[0]
        kind = _stub_kind(config)
        if kind in self.wanted:
            return TowerStub(kind, config)
        return self.real.from_config(*args, **kwargs)


@contextmanager
def tower_stubs(stub_vision: bool = True, stub_audio: bool = True) -> Iterator[None]:
    """While active, building a ``Gemma3nModel`` puts `TowerStub`s where the chosen towers go (the others are
    built for real, which needs timm for vision)."""
    shim = _StubbingAutoModel({kind for kind, on in (("vision", stub_vision), ("audio", stub_audio)) if on})
    with gemma3n_builds_submodels_with(shim) as real:
        shim.real = real
        yield


def build_text_only(config: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    stub_vision: bool = True, stub_audio: bool = True) -> Any:
    """A stock ``Gemma3nForConditionalGeneration`` built (initialised) on ``device`` in ``dtype``, with
    the chosen towers stubbed (both by default: text only): the starting point for in-memory models,
    sub-models and (on the meta device) every plan of shapes and bytes."""
    from transformers import Gemma3nForConditionalGeneration

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with tower_stubs(stub_vision, stub_audio), torch.device(device):
            return Gemma3nForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)


def expected_text_shapes(config: Any) -> dict[str, torch.Size]:
    """The text-path tensors a checkpoint of ``config`` must hold (built on the meta device)."""
    skeleton = build_text_only(config, "meta")
    return {k: v.shape for k, v in skeleton.state_dict().items() if is_text_key(k)}


def _why_no_tower(stub: TowerStub) -> str:
    left_out = fetched_text_only(stub.checkpoint_dir) if stub.checkpoint_dir is not None else None
    if left_out is not None:
        return (f"{stub.checkpoint_dir} is a {left_out}. Download the full snapshot (`hf download <hub id>`; "
                "g3n_probe then uses it from the Hugging Face cache) and load that to run a tower")
    return f"this checkpoint holds no {stub.kind} tower tensors; there is no {stub.kind} tower to load"


def materialize(stub: TowerStub, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Build the stock tower for ``stub`` and fill it from the checkpoint's safetensors."""
    from transformers import AutoModel

    if not stub.tensor_files or stub.checkpoint_dir is None:
        raise TowerNotLoadedError(_why_no_tower(stub))
    if stub.kind == "vision" and importlib.util.find_spec("timm") is None:
        raise TowerNotLoadedError(
            "the vision tower is timm's MobileNetV5: install the 'towers' extra "
            "(pip install 'g3n_probe[towers]', which brings timm and pillow) to load it"
        )
    prefix = TOWER_PREFIXES[stub.kind]
    # Built for real (not on meta) so transformers' own __init__ fills the non-persistent buffers.
    tower = AutoModel.from_config(stub.config)
    state: dict[str, torch.Tensor] = {}
    for filename, keys in by_file(stub.tensor_files).items():
        path = stub.checkpoint_dir / filename
        if not path.exists():
            raise FileNotFoundError(f"the {stub.kind} tower's shard {path} is missing")
        with open_safetensors(path) as handle:
            for key in keys:
                state[key[len(prefix):]] = handle.get_tensor(key)
    expected = set(tower.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint's {stub.kind} tower does not match its config: "
            f"missing {sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}"
        )
    tower.load_state_dict(state, strict=True)
    return tower.to(device=device, dtype=dtype).eval()
