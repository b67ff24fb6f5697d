"""Bytes a text-only fetch of each preset reads, against its full snapshot (no network, no weights).

Computed from the real checkpoint layout (`g3n_probe.synthetic` writes it: text, KV-shared layers'
k/v, the vision tower's recorded tensors, the audio tower built on the meta device), in the
checkpoints' dtype (bfloat16); `g3n_probe.hub.fetch` fetches exactly the tensors `loading.keys_read`
selects (tests/test_hub.py checks this byte for byte against a local server). Writes
``benchmarks/results/fetch_bytes.md``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from g3n_probe.checkpoint import synthetic
from g3n_probe.checkpoint.reading import keys_read


def figures(preset: str) -> dict[str, float]:
    config = synthetic.preset_config(preset)
    shapes = synthetic._checkpoint_shapes(config, preset)
    nbytes = {k: math.prod(shape) * torch.bfloat16.itemsize for k, (shape, _) in shapes.items()}
    read, skipped = keys_read(shapes, config)
    return {"full": sum(nbytes.values()), "text": sum(nbytes[k] for k in read),
            "kv_skipped": sum(nbytes[k] for k in skipped)}


def main() -> None:
    lines = ["| preset | full snapshot (weights) | fetched text-only | share | not fetched: towers | not fetched: KV-shared k/v |",
             "|---|---|---|---|---|---|"]
    for preset in ("e2b", "e4b"):
        f = figures(preset)
        towers = f["full"] - f["text"] - f["kv_skipped"]
        lines.append(f"| {preset} | {f['full'] / 1e9:.2f} GB | {f['text'] / 1e9:.2f} GB | {f['text'] / f['full']:.1%} "
                     f"| {towers / 1e9:.2f} GB | {f['kv_skipped'] / 1e6:.1f} MB |")
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).parent / "results" / "fetch_bytes.md"
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
