"""Patches per second: `g3n.patching.sweep` (many variants per forward) vs one trace per patch.

    python benchmarks/patching_bench.py                         # CPU, the `mid` preset
    python benchmarks/patching_bench.py --device cuda --preset e2b

Random weights (the cost is what matters). Both ways patch ``resid_mid`` at every layer and every
position of a B1×T prompt pair, with a last-position metric (``logits_to_keep=1``), in the same run; figures go to
benchmarks/results/patching_<device>_<preset>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default=None, choices=[None, "tiny", "mid", "e2b", "e4b"])
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=None)
    args = parser.parse_args()
    from g3n_probe.gpu_check import measure_patching
    from g3n_probe.probe import Gemma3nProbe
    from g3n_probe.synthetic import build_tokenizer, random_model

    device = torch.device(args.device)
    preset = args.preset or ("e2b" if device.type == "cuda" else "mid")
    tokens = args.tokens or (128 if device.type == "cuda" else 16)
    chunk = args.chunk or (64 if device.type == "cuda" else 32)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    module = random_model(preset, device=device, dtype=dtype)
    model = Gemma3nProbe(module, tokenizer=build_tokenizer(module.config))
    measured = measure_patching(model, tokens=tokens, chunk=chunk)
    layers, speedup = len(measured["layers"]), measured["speedup"]
    results = {"one trace per patch": measured["one_per_trace"], f"sweep, {chunk} per forward": measured["sweep"]}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = ["| way | forwards | seconds | patches/s |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['forwards']} | {v['seconds']:.2f} | {v['patches_per_second']:.1f} |" for k, v in results.items()]
    text = "\n".join(lines) + f"\n\nspeed-up: {speedup:.2f}× ({preset}, B1×T{tokens}, resid_mid at {layers} layers × {tokens} positions)"
    print(f"\n{name}, {dtype}\n{text}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"patching_{device.type}_{preset}.json").write_text(json.dumps(
        {"device": name, "dtype": str(dtype), "preset": preset, "tokens": tokens, "results": results,
         "speedup": speedup}, indent=2))
    (out / f"patching_{device.type}_{preset}.md").write_text(f"{name}, {dtype}\n\n{text}\n")


if __name__ == "__main__":
    main()
