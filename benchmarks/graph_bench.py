"""Cost of `g3n.attribute` (an attribution graph) against a traced forward and against the hand-written way,
measured side by side in one run.

    python benchmarks/graph_bench.py                          # CPU, the bundled default and `mid`, T=32
    python benchmarks/graph_bench.py --device cuda --preset e2b --tokens 64 --width 16384

Transcoders (random, TopK with ``--k`` active latents per position, ``--width`` latents; default 4·D) sit at
every layer. Ways: ``trace`` is one ``model.trace`` saving the logits; ``batched`` is `g3n.attribute` with
its default batch (one forward of ``batch`` copies, one backward per batch of targets); ``per-row`` is the same
graph with one backward pass per target row on a batch-1 forward (``batch_size=1``: what a hand-written graph
with detach hooks does). Time is the median of ``--repeats``; peak memory is the highest RSS seen above the RSS
before the call (CPU) or the peak allocated device memory (CUDA). Figures go to
benchmarks/results/graph_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from decompose_bench import measure  # the same timing and peak-memory sampling (this folder is on sys.path)

HERE = Path(__file__).resolve().parent


def measure_once(fn, device: torch.device) -> tuple[float, int]:
    """One timed run with no warm-up (the per-row way, after the batched one has warmed the model up)."""
    from g3n_probe.cli.bench import sync
    from g3n_probe.cli.gpu_check import PeakRSS

    with PeakRSS() as rss:
        start = time.perf_counter()
        fn()
        sync(device)
        seconds = time.perf_counter() - start
    return seconds, rss.peak - rss.before


def random_transcoders(config, width: int, k: int, device: torch.device) -> dict:
    from g3n_probe.sae.transcoders import Transcoder

    gen = torch.Generator().manual_seed(0)
    d = config.hidden_size
    return {layer: Transcoder(torch.randn(width, d, generator=gen) / d ** 0.5, torch.randn(width, d, generator=gen) * 0.02,
                              torch.zeros(width), torch.zeros(d), k=k, layer=layer).to(device)
            for layer in range(config.num_hidden_layers)}


def build(preset: str, device: torch.device):
    import g3n_probe as g3n
    from g3n_probe.checkpoint.synthetic import build_tokenizer, random_model
    from g3n_probe.probe import Gemma3nProbe

    if preset == "default":
        return g3n.load(g3n.synthetic.default_checkpoint(), device=str(device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    module = random_model(preset, device=device, dtype=dtype)
    return Gemma3nProbe(module, tokenizer=build_tokenizer(module.config))


def run(preset: str, args: argparse.Namespace, device: torch.device) -> dict:
    from g3n_probe.circuits import attribute

    model = build(preset, device)
    config = model.text_config
    width = args.width or 4 * config.hidden_size
    transcoders = random_transcoders(config, width, args.k, device)
    ids = torch.randint(3, min(config.vocab_size_per_layer_input, 4000), (1, args.tokens), generator=torch.Generator().manual_seed(1))
    ids[0, 0] = 2

    def trace():
        with torch.no_grad(), model.trace(ids):
            model.logits.output.save()

    graph = attribute(model, ids, transcoders)
    rows = len(graph.of_kind("feature")) + len(graph.of_kind("logit"))
    figures = {"preset": preset, "tokens": args.tokens, "width": width, "k": args.k, "nodes": len(graph.nodes),
               "rows": rows}
    ways = {"trace": trace, "batched": lambda: attribute(model, ids, transcoders),
            "per-row": lambda: attribute(model, ids, transcoders, batch_size=1)}
    for way, fn in ways.items():
        # the per-row way runs once, after the others have warmed the model up: it is the slow one
        seconds, peak = measure(fn, device, args.repeats) if way != "per-row" else measure_once(fn, device)
        figures[way] = {"seconds": seconds, "peak_bytes": peak}
    figures["speedup"] = figures["per-row"]["seconds"] / figures["batched"]["seconds"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", nargs="+", default=["default", "mid"], choices=["default", "tiny", "mid", "e2b", "e4b"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--width", type=int, default=0)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    results = [run(preset, args, device) for preset in args.preset]
    lines = ["| model | nodes | rows | trace (s) | batched (s) | per-row (s) | batched speed-up | peak MiB trace / batched / per-row |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        peaks = " / ".join(f"{r[w]['peak_bytes'] / 2**20:.0f}" for w in ("trace", "batched", "per-row"))
        lines.append(f"| {r['preset']} T{r['tokens']} | {r['nodes']} | {r['rows']} | {r['trace']['seconds']:.3f} | "
                     f"{r['batched']['seconds']:.2f} | {r['per-row']['seconds']:.2f} | {r['speedup']:.1f}× | {peaks} |")
    text = "\n".join(lines)
    print(f"\n{name}\n{text}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"graph_{device.type}.json").write_text(json.dumps({"device": name, "results": results}, indent=2))
    (out / f"graph_{device.type}.md").write_text(f"{name}, transcoders at every layer (TopK k={args.k})\n\n{text}\n")


if __name__ == "__main__":
    main()
