"""Cost of `g3n.decompose` against a traced forward, measured side by side in one run.

    python benchmarks/decompose_bench.py                              # CPU, the `mid` preset, B1×T128
    python benchmarks/decompose_bench.py --device cuda --preset e2b --tokens 512

Both run on the same random-weight model and prompt: ``trace`` is one ``model.trace`` saving the
logits; ``decompose`` is `g3n.decompose` of a logit difference at every position (its own trace plus
the backward pass through the frozen maps). Time is the median of ``--repeats``; peak memory is the
highest RSS seen above the RSS before the call (CPU) or the peak allocated device memory (CUDA).
Figures go to benchmarks/results/decompose_<device>_<preset>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def measure(fn, device: torch.device, repeats: int) -> tuple[float, int]:
    from g3n_probe.cli.bench import sync
    from g3n_probe.cli.gpu_check import PeakRSS

    fn()   # warm-up
    times, peaks = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        with PeakRSS() as rss:
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        peaks.append(torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else rss.peak - rss.before)
    return statistics.median(times), max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="mid", choices=["tiny", "mid", "e2b", "e4b"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from g3n_probe.checkpoint.synthetic import build_tokenizer, random_model
    from g3n_probe.cli.gpu_check import measure_decompose
    from g3n_probe.probe import Gemma3nProbe

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    module = random_model(args.preset, device=device, dtype=dtype)
    model = Gemma3nProbe(module, tokenizer=build_tokenizer(module.config))
    figures = measure_decompose(model, args.tokens, args.repeats, measure)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = ["| way | median (ms) | peak memory above start (MiB) |", "|---|---|---|"]
    for way in ("trace", "decompose"):
        lines.append(f"| {way} | {figures[way]['seconds'] * 1e3:.1f} | {figures[way]['peak_bytes'] / 1024**2:.1f} |")
    text = "\n".join(lines) + (f"\n\ndecompose / trace: {figures['time_ratio']:.2f}× time, "
                               f"{figures['memory_ratio']:.2f}× peak memory ({args.preset}, B1×T{args.tokens}, "
                               f"{figures['components']} components × {args.tokens} positions)")
    print(f"\n{name}, {dtype}\n{text}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"decompose_{device.type}_{args.preset}.json").write_text(json.dumps(
        {"device": name, "dtype": str(dtype), "preset": args.preset, "tokens": args.tokens, **figures}, indent=2))
    (out / f"decompose_{device.type}_{args.preset}.md").write_text(f"{name}, {dtype}\n\n{text}\n")


if __name__ == "__main__":
    main()
