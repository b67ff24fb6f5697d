"""Files on disk → a text-only stock model: what a checkpoint holds, how its bytes cross, the tower stubs,
the host-resident per-layer table and synthetic checkpoints.

Inside the package, bottom up:

- `module_tree`: facts about the stock module tree (where the text model sits, the per-layer table, KV sharing,
  the AltUp coefficient clip); read by nearly every other part of g3n_probe.
- `reading`: what a checkpoint directory holds, read without building a model (config, index, safetensors
  headers, which keys are text); `CheckpointError`.
- `staging`: weights from the file to an accelerator through bounded host buffers.
- `towers`: parameter-free stand-ins for the vision and audio towers; the one text-only skeleton builder.
- `ple`: the host-resident per-layer-embedding table (ids to the host, rows back).
- `synthetic`: checkpoints in the real layout with random weights (`g3n.synthetic.save_checkpoint`).
"""

from .reading import CheckpointError
from .towers import TowerNotLoadedError

__all__ = ["CheckpointError", "TowerNotLoadedError"]
