"""Cost of the intervention points: stock forward vs the probe, measured side by side in one run.

Modes, each the median of ``--repeats`` timed runs after warm-up (CUDA synchronised):

* ``stock``            the stock model, plain call (a separate copy with no points injected);
* ``injected``         the injected model, plain call, outside any trace (always-on hooks only);
* ``trace``            ``with model.trace(ids)`` saving only the logits;
* ``trace_all_saved``  a trace saving every point of every layer (and the layer stacks).

    python benchmarks/points_bench.py                                # CPU: tiny and a mid-size config
    python benchmarks/points_bench.py --device cuda --preset e2b     # E2B shapes, B1xT128 and B8xT512

Weights are random (the shapes are what matter for cost). Figures are written to
benchmarks/results/points_<label>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def bench(label: str, config, device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int]],
          repeats: int, warmup: int) -> list[dict]:
    from g3n_probe.bench import median_time, trace_every_point
    from g3n_probe.probe import Gemma3nProbe
    from g3n_probe.synthetic import build_tokenizer, random_model

    stock = random_model(config, device=device, dtype=dtype)
    injected = copy.deepcopy(stock)
    probe = Gemma3nProbe(injected, tokenizer=build_tokenizer(stock.config))
    text = stock.config.get_text_config()
    rows = []
    for batch, tokens in shapes:
        ids = torch.randint(3, text.vocab_size_per_layer_input, (batch, tokens), device=device)
        mask = torch.ones_like(ids)

        def run_stock():
            with torch.no_grad():
                stock(input_ids=ids, attention_mask=mask, use_cache=False)

        def run_injected():
            with torch.no_grad():
                injected(input_ids=ids, attention_mask=mask, use_cache=False)

        def run_trace():
            with torch.no_grad(), probe.trace(ids, use_cache=False):
                probe.logits.output.save()

        def run_all_saved():
            trace_every_point(probe, ids)

        times = {}
        for mode, fn in (("stock", run_stock), ("injected", run_injected), ("trace", run_trace),
                         ("trace_all_saved", run_all_saved)):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            times[mode], peak = median_time(fn, device, repeats, warmup)
            if peak is not None:
                times[f"{mode}_peak_gib"] = peak / 1024**3
        row = {"model": label, "batch": batch, "tokens": tokens, "seconds": times,
               "ratios": {m: times[m] / times["stock"] for m in ("injected", "trace", "trace_all_saved")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    del probe, injected, stock
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default=None, choices=[None, "tiny", "mid", "e2b", "e4b"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    from g3n_probe.synthetic import preset_config

    if device.type == "cuda":
        presets = [args.preset or "e2b"]
        shapes = [(1, 128), (8, 512)]
        dtype = torch.bfloat16
        repeats = args.repeats or 10
    else:
        presets = [args.preset] if args.preset else ["tiny", "mid"]
        shapes = [(1, 32), (4, 128)]
        dtype = torch.float32
        repeats = args.repeats or 10
    rows = []
    for preset in presets:
        config = preset_config(preset)
        rows += bench(preset, config, device, dtype, shapes, repeats, args.warmup)
    lines = ["| model | B×T | stock (ms) | injected, no trace | trace | trace, every point saved |", "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {r['model']} | {r['batch']}×{r['tokens']} | {s['stock'] * 1e3:.2f} | "
                     f"{r['ratios']['injected']:.3f}× | {r['ratios']['trace']:.3f}× | {r['ratios']['trace_all_saved']:.3f}× |")
    text = "\n".join(lines)
    label = f"{device.type}_{'_'.join(presets)}"
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{device_name}, {dtype}\n{text}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"points_{label}.json").write_text(json.dumps({"device": device_name, "dtype": str(dtype), "rows": rows}, indent=2))
    (out / f"points_{label}.md").write_text(f"{device_name}, {dtype}\n\n{text}\n")


if __name__ == "__main__":
    main()
