"""Memory and speed of the per-layer-table placements (see `g3n_probe.cli.bench`).

    python benchmarks/memory_bench.py                          # CPU, tiny and mid presets
    python benchmarks/memory_bench.py --device cuda            # E2B and E4B shapes on a GPU
"""

from __future__ import annotations

import argparse
from pathlib import Path

from g3n_probe.cli.bench import run_bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--presets", nargs="*", default=None)
    parser.add_argument("--leak-traces", type=int, default=500)
    args = parser.parse_args()
    presets = args.presets or (["e2b", "e4b"] if args.device.startswith("cuda") else ["tiny", "mid"])
    for preset in presets:
        run_bench(preset, device=args.device, leak_traces=args.leak_traces, out_dir=Path(__file__).parent / "results")
