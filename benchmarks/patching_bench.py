"""Patches per second of a patching sweep, four ways, interleaved in one run (`gpu_check.measure_patching`):

(a) one forward of a stock model per patch with a plain torch hook (what a user writes without g3n_probe),
(b) a loop of one-patch traces, (c) `g3n.patching.sweep(..., reuse="layers")` (the target's layers before a
chunk's first patch reused), (d) `g3n.patching.sweep` (its layers and its keys and values before a chunk's
first position reused). Beside each: the work it does, as a fraction of one whole forward per patch, and the
floor Σ (L − l)(T − p) / (L·T) of the swept cells.

    python benchmarks/patching_bench.py                         # CPU, the `mid` preset, one thread
    python benchmarks/patching_bench.py --device cuda --preset e2b

Random weights (the cost is what matters); the stock model of (a) is a second model with the same weights,
never injected. ``resid_mid`` at every layer × every position of a B1×T prompt pair, a last-position metric
(``logits_to_keep=1`` for every way); figures go to benchmarks/results/patching_<device>_<preset>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WAYS = (("plain_hooks", "(a) stock forward per patch, plain torch hook"), ("one_per_trace", "(b) one-patch traces"),
        ("sweep_layers", "(c) sweep, layers reused"), ("sweep", "(d) sweep, layers and tokens reused"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default=None, choices=[None, "tiny", "mid", "e2b", "e4b"])
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads); default 1")
    args = parser.parse_args()
    from g3n_probe.checkpoint.synthetic import build_tokenizer, random_model
    from g3n_probe.cli.gpu_check import measure_patching
    from g3n_probe.probe import Gemma3nProbe

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    preset = args.preset or ("e2b" if device.type == "cuda" else "mid")
    tokens = args.tokens or (128 if device.type == "cuda" else 16)
    chunk = args.chunk or (64 if device.type == "cuda" else 32)   # CPU: sweep's default, as the CPU check uses
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    stock = random_model(preset, device=device, dtype=dtype)
    module = random_model(preset, device=device, dtype=dtype)
    model = Gemma3nProbe(module, tokenizer=build_tokenizer(module.config))
    measured = measure_patching(model, tokens=tokens, chunk=chunk, rounds=args.rounds, stock=stock)
    layers = len(measured["layers"])
    base = measured["plain_hooks"]["patches_per_second"]
    lines = ["| way | forwards | seconds (median round) | patches/s | × (a) | work (1 = a forward per patch) |",
             "|---|---|---|---|---|---|"]
    for key, label in WAYS:
        way = measured[key]
        lines.append(f"| {label} | {way['forwards']} | {way['seconds']:.2f} | {way['patches_per_second']:.1f} | "
                     f"{way['patches_per_second'] / base:.2f} | {way['work']:.3f} |")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    text = "\n".join(lines) + (
        f"\n\nfloor of the work: {measured['floor']:.3f}; {measured['rounds']} interleaved rounds; chunk {chunk}; "
        f"{preset}, B1×T{tokens}, resid_mid at {layers} layers × {tokens} positions ({layers * tokens} patches); "
        f"speed-up (d)/(a): {measured['speedup']:.2f}×")
    print(f"\n{name}, {dtype}\n{text}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"patching_{device.type}_{preset}.json").write_text(json.dumps(
        {"device": name, "dtype": str(dtype), "preset": preset, "tokens": tokens, "chunk": chunk,
         "results": {key: measured[key] for key, _ in WAYS}, "floor": measured["floor"],
         "speedup": measured["speedup"], "speedup_vs_traces": measured["speedup_vs_traces"],
         "speedup_layers": measured["speedup_layers"]}, indent=2))
    (out / f"patching_{device.type}_{preset}.md").write_text(f"{name}, {dtype}\n\n{text}\n")


if __name__ == "__main__":
    main()
