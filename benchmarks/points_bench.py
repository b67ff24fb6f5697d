"""Cost of the intervention points: stock forward vs the probe, measured side by side in one run.

Modes, timed in interleaved rounds (each round every mode once, the order rotated from round to round) so
drift hits all alike; each figure is the median over the rounds of a mode's time over the stock forward's
in the same round:

* ``stock``            the stock model, plain call (a separate copy with no points injected);
* ``stock_twin``       a second stock copy (a deepcopy, never injected), plain call: the ratio two identical
                       models show on this machine, i.e. the noise and memory-placement floor of the others;
* ``injected``         the injected model, plain call, outside any trace (always-on hooks only);
* ``trace``            ``with model.trace(ids)`` saving nothing;
* ``trace_all_saved``  a trace saving every point of every layer and the layer stacks (the pattern under eager).

Minor page faults per forward (``getrusage``) show how much fresh memory each mode asks the kernel for.

    python benchmarks/points_bench.py                                # CPU: mid, B1×T32, B4×T128, B8×T256, one
                                                                     # thread, glibc's default allocator beside
                                                                     # a raised mmap threshold (two processes)
    python benchmarks/points_bench.py --device cuda --preset e2b     # E2B shapes, B1xT128 and B8xT512

Weights are random (the shapes are what matter for cost). Figures are written to
benchmarks/results/points_<label>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from g3n_probe.checkpoint.synthetic import build_tokenizer, random_model
from g3n_probe.cli.bench import sync, trace_every_point
from g3n_probe.probe import Gemma3nProbe

HERE = Path(__file__).resolve().parent
#: glibc's malloc, told to serve blocks up to 32 MiB from its heap and keep freed memory (what a user can
#: set in the environment before Python starts; g3n_probe sets nothing process-wide).
RAISED = {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024**2), "MALLOC_TRIM_THRESHOLD_": str(512 * 1024**2)}
MODES = ("stock", "stock_twin", "injected", "trace", "trace_all_saved")


def faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def rotated(modes: Sequence[str], round_: int) -> list[str]:
    """``modes`` in round ``round_``'s order: rotated by one each round, so no mode always runs first or after
    the same one."""
    shift = round_ % len(modes)
    return [*modes[shift:], *modes[:shift]]


def build_models(preset: str, device: torch.device, dtype: torch.dtype,
                 attention: str = "sdpa") -> tuple[torch.nn.Module, torch.nn.Module, Gemma3nProbe]:
    """The stock model, its never-injected twin (a deepcopy) and a probe over a third copy, same weights."""
    stock = random_model(preset, device=device, dtype=dtype, attn_implementation=attention)
    twin = copy.deepcopy(stock)
    probe = Gemma3nProbe(copy.deepcopy(stock), tokenizer=build_tokenizer(stock.config))
    return stock, twin, probe


def mode_runs(stock: torch.nn.Module, twin: torch.nn.Module, probe: Gemma3nProbe,
              ids: torch.Tensor) -> dict[str, Callable[[], None]]:
    """One forward of ``ids`` per mode of `MODES`."""
    mask = torch.ones_like(ids)

    def plain(model: torch.nn.Module) -> None:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    def trace() -> None:
        with torch.no_grad(), probe.trace(ids):
            pass

    return {"stock": lambda: plain(stock), "stock_twin": lambda: plain(twin), "injected": lambda: plain(probe.hf_model),
            "trace": trace, "trace_all_saved": lambda: trace_every_point(probe, ids)}


def bench(preset: str, device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int]], rounds: int,
          attention: str = "sdpa") -> list[dict]:
    stock, twin, probe = build_models(preset, device, dtype, attention)
    text = stock.config.get_text_config()
    rows = []
    for batch, tokens in shapes:
        ids = torch.randint(3, text.vocab_size_per_layer_input, (batch, tokens), device=device)
        runs = mode_runs(stock, twin, probe, ids)
        seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
        counts: dict[str, list[int]] = {mode: [] for mode in MODES}
        for round_ in range(rounds + 1):   # round 0 warms up
            for mode in rotated(MODES, round_):
                before, start = faults(), time.perf_counter()
                runs[mode]()
                sync(device)
                if round_:
                    seconds[mode].append(time.perf_counter() - start)
                    counts[mode].append(faults() - before)
        paired = {m: [t / s for t, s in zip(seconds[m], seconds["stock"])] for m in MODES[1:]}
        row = {"model": preset, "attention": attention, "batch": batch, "tokens": tokens,
               "seconds": {mode: statistics.median(values) for mode, values in seconds.items()},
               "ratios": {m: statistics.median(r) for m, r in paired.items()}, "round_ratios": paired,
               "minor_faults": {m: statistics.median(v) for m, v in counts.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _table(by_allocator: dict[str, list[dict]]) -> str:
    lines = ["| allocator | B×T | stock (ms) | stock twin | injected, no trace | trace saving nothing | every point saved | "
             "minor faults per forward: stock / twin / injected / trace / all saved |", "|---|---|---|---|---|---|---|---|"]
    for allocator, rows in by_allocator.items():
        for r in rows:
            f = r["minor_faults"]
            ratios = " | ".join(f"{r['ratios'][mode]:.3f}×" for mode in MODES[1:])
            counts = " / ".join(f"{f[mode]:.0f}" for mode in MODES)
            lines.append(f"| {allocator} | {r['batch']}×{r['tokens']} | {r['seconds']['stock'] * 1e3:.1f} | {ratios} | {counts} |")
    return "\n".join(lines)


def _child(args: argparse.Namespace, allocator: str) -> list[dict]:
    """One allocator setting in a fresh process (glibc reads its settings at start)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(RAISED if allocator == "raised" else {})}
    command = [sys.executable, __file__, "--child", "--preset", args.preset, "--rounds", str(args.rounds),
               "--attention", args.attention, "--shapes", *args.shapes]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default=None, choices=[None, "tiny", "mid", "e2b", "e4b"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"],
                        help="attention implementation (eager: every point saved includes attn_pattern, as TransformerLens' "
                             "full cache keeps its patterns)")
    parser.add_argument("--shapes", nargs="+", default=None, help="BxT shapes, e.g. 8x256 (default: per device)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.shapes = args.shapes or (["1x128", "8x512"] if device.type == "cuda" else ["1x32", "4x128", "8x256"])
    shapes = [tuple(int(n) for n in shape.lower().split("x")) for shape in args.shapes]
    if args.child:   # one allocator setting, one thread
        torch.set_num_threads(1)
        bench(args.preset, device, torch.float32, shapes, args.rounds, args.attention)
        return
    if device.type == "cuda":
        args.preset = args.preset or "e2b"
        by_allocator = {"CUDA caching allocator": bench(args.preset, device, torch.bfloat16, shapes, args.rounds,
                                                        args.attention)}
    else:
        args.preset = args.preset or "mid"
        by_allocator = {"glibc default": _child(args, "default"),
                        "MALLOC_MMAP_THRESHOLD_=32 MiB, trim 512 MiB": _child(args, "raised")}
    text = _table(by_allocator)
    label = f"{device.type}_{args.preset}" + ("" if args.attention == "sdpa" else f"_{args.attention}")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU, one thread"
    heading = f"{device_name}, preset {args.preset}, {args.attention} attention"
    print(f"\n{heading}\n{text}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"points_{label}.json").write_text(json.dumps({"device": device_name, "attention": args.attention,
                                                          "rows": by_allocator}, indent=2))
    (out / f"points_{label}.md").write_text(f"{heading}\n\n{text}\n")


if __name__ == "__main__":
    main()
