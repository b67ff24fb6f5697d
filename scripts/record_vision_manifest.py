"""Record the name -> shape manifest of Gemma 3n's vision tower (MobileNetV5-300M).

The synthetic e2b/e4b checkpoints must carry the real vision-tower tensors, but building that tower
needs timm, and timm needs torchvision, which has no wheel matching this project's CPU torch. The
shapes were therefore recorded once, with timm installed without dependencies and a stand-in
`torchvision` module that only lets timm import (nothing from it is used to build MobileNetV5):

    python -m venv /tmp/timmvenv --system-site-packages && /tmp/timmvenv/bin/pip install --no-deps timm
    /tmp/timmvenv/bin/python scripts/record_vision_manifest.py

The result is src/g3n_probe/data/mobilenetv5_300m_enc.json (294,126,912 parameters).
"""

import importlib.abc
import importlib.machinery
import json
import math
import sys
import types
from pathlib import Path

import torch


class _StandIn(types.ModuleType):
    __path__: list = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        class _Meta(type):
            def __getattr__(cls, attr):
                if attr.startswith("__"):
                    raise AttributeError(attr)
                return f"{name}.{attr}"

        return _Meta(name, (torch.nn.Module,), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StandIn(spec.name)

    def exec_module(self, module):
        pass


def main() -> None:
    sys.meta_path.insert(0, _Finder())
    import timm
    from transformers import Gemma3nVisionConfig

    config = Gemma3nVisionConfig()
    with torch.device("meta"):
        model = timm.create_model(config.architecture, pretrained=False, num_classes=0, global_pool="")
    tensors = {f"model.vision_tower.timm_model.{k}": list(v.shape) for k, v in model.state_dict().items()}
    total = sum(math.prod(shape) for shape in tensors.values())
    out = Path(__file__).resolve().parents[1] / "src/g3n_probe/data/mobilenetv5_300m_enc.json"
    manifest = {
        "architecture": config.architecture,
        "recorded_with": f"timm {timm.__version__} on the meta device",
        "parameters": total,
        "tensors": tensors,
    }
    out.write_text(json.dumps(manifest, indent=0))
    print(f"{len(tensors)} tensors, {total:,} parameters -> {out}")


if __name__ == "__main__":
    main()
