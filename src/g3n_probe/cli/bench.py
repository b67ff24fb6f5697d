"""``g3n-probe bench``: memory and speed of the per-layer-table placements, side by side.

Variants, each built with random weights directly in memory, measured one after another in the
same process (one model resident at a time):

* ``stock_multimodal``   stock with real towers (only when timm is installed);
* ``stock_text``         stock with the towers stubbed, everything on the device;
* ``g3n_table_device``   g3n_probe, points injected, per-layer table on the device;
* ``g3n_table_host``     g3n_probe, per-layer table in host memory (`g3n_probe.checkpoint.ple`).

Figures: resident device memory after load; for each shape, peak device memory and the median
forward time with last-position logits (``logits_to_keep=1``, no KV cache); for the g3n variants
also a trace saving nothing and a trace saving every point; host RSS; and a leak check (N traces
with saves and writes: device memory and RSS after trace N/10 and after trace N).

On CPU it runs the small presets so it fits a CI-sized budget; ``--device cuda`` runs the real
E2B/E4B shapes. Results go to ``benchmarks/results/bench_<device>_<preset>.{json,md}``.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import module_tree
from ..checkpoint.ple import host_resident, move_except_table
from ..checkpoint.synthetic import build_tokenizer, preset_config, random_model
from ..checkpoint.towers import build_text_only
from ..points import TABLE, in_execution_order
from ..probe.gemma3n_probe import Gemma3nProbe


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_bytes(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> tuple[float, int | None]:
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return statistics.median(times), peak


def trace_every_point(probe: Any, ids: torch.Tensor, **trace_kwargs: Any) -> None:
    """One trace that saves every row of the table for every layer (the layer stacks included), in
    execution order; rows that never fire in this model are left out."""
    layers = range(probe.text_config.num_hidden_layers)
    rows = [(point, layer) for point in TABLE for layer in (layers if point.scope == "layer" else [None])
            if probe.injection.unavailable(point, layer) is None]
    with torch.no_grad(), probe.trace(ids, **trace_kwargs):
        for point, layer in in_execution_order(rows):
            point.read(probe, layer).save()


def _build(variant: str, preset: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(module, probe or None) for one variant."""
    if variant == "stock_multimodal":   # the towers built for real (timm installed)
        return build_text_only(preset_config(preset), device, dtype, stub_vision=False, stub_audio=False).eval(), None
    if variant == "g3n_table_host":
        module = random_model(preset, device="cpu", dtype=dtype)
        move_except_table(module, device)
        host_resident(module_tree.per_layer_table(module), device)
    else:
        module = random_model(preset, device=device, dtype=dtype)
    if variant == "stock_text":
        return module, None
    return module, Gemma3nProbe(module, tokenizer=build_tokenizer(module.config))


def run_bench(preset: str, device: str = "cpu", shapes: list[tuple[int, int]] | None = None, repeats: int = 5,
              warmup: int = 2, leak_traces: int = 500, out_dir: Path | None = None, print_fn: Callable = print) -> dict:
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = shapes or ([(1, 128), (8, 512), (1, 2048)] if dev.type == "cuda" else [(1, 32), (4, 128), (1, 512)])
    variants = ["stock_text", "g3n_table_device", "g3n_table_host"]
    if importlib.util.find_spec("timm") is not None:
        variants.insert(0, "stock_multimodal")
    results: dict[str, Any] = {"preset": preset, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
                               "dtype": str(dtype), "variants": {}}
    for variant in variants:
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rss_before = rss()
        start = time.perf_counter()
        module, probe = _build(variant, preset, dev, dtype)
        sync(dev)
        entry: dict[str, Any] = {
            "build_seconds": time.perf_counter() - start,
            "resident_device_bytes": _device_bytes(dev),
            "host_rss_bytes": rss(), "host_rss_growth_bytes": rss() - rss_before, "shapes": {},
        }
        text = module.config.get_text_config()
        for batch, tokens in shapes:
            ids = torch.randint(3, text.vocab_size_per_layer_input, (batch, tokens), device=dev)
            mask = torch.ones_like(ids)

            def forward() -> None:
                with torch.no_grad():
                    module(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

            seconds, peak = median_time(forward, dev, repeats, warmup)
            shape_entry = {"forward_seconds": seconds, "forward_peak_device_bytes": peak}
            if probe is not None:
                def trace() -> None:
                    with torch.no_grad(), probe.trace(ids, logits_to_keep=1):
                        probe.logits.output.save()

                def trace_all() -> None:
                    trace_every_point(probe, ids, logits_to_keep=1)

                shape_entry["trace_seconds"], shape_entry["trace_peak_device_bytes"] = median_time(trace, dev, repeats, 1)
                shape_entry["trace_all_seconds"], shape_entry["trace_all_peak_device_bytes"] = median_time(
                    trace_all, dev, max(1, repeats // 2), 1)
            entry["shapes"][f"{batch}x{tokens}"] = shape_entry
            print_fn(json.dumps({"variant": variant, "shape": f"{batch}x{tokens}", **shape_entry}))
        if probe is not None and variant == "g3n_table_host" and leak_traces:
            entry["leak_check"] = _leak_check(probe, dev, text, leak_traces)
            print_fn(json.dumps({"variant": variant, "leak_check": entry["leak_check"]}))
        results["variants"][variant] = entry
        module = probe = None   # one model resident at a time
    results["markdown"] = _markdown(results)
    print_fn(results["markdown"])
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"bench_{dev.type}_{preset}"
        (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
        (out_dir / f"{stem}.md").write_text(results["markdown"] + "\n")
    return results


def _leak_check(probe: Any, device: torch.device, text: Any, traces: int) -> dict:
    ids = torch.randint(3, text.vocab_size_per_layer_input, (1, 16), device=device)
    marks: dict[str, Any] = {}
    checkpoint = max(1, traces // 10)
    for n in range(1, traces + 1):
        with torch.no_grad(), probe.trace(ids, logits_to_keep=1):
            probe.ple_tokens.output.save()
            probe.layers[0].altup_predict.output.save()
            probe.layers[1].ple_out.output[:] = 0
            probe.logits.output.save()
        if n in (checkpoint, traces):
            gc.collect()
            sync(device)
            marks[f"after_{n}"] = {"device_bytes": _device_bytes(device), "host_rss_bytes": rss()}
    return marks


def _fmt_bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024**3:.3f} GiB"


def _markdown(results: dict) -> str:
    variants = results["variants"]
    lines = [f"{results['device']}, {results['dtype']}, preset {results['preset']}", "",
             "| variant | resident device memory | host RSS | build (s) |", "|---|---|---|---|"]
    for name, entry in variants.items():
        lines.append(f"| {name} | {_fmt_bytes(entry['resident_device_bytes'])} | {_fmt_bytes(entry['host_rss_bytes'])} | "
                     f"{entry['build_seconds']:.1f} |")
    lines += ["", "| variant | B×T | forward (ms) | vs stock_text | peak device | trace (ms) | trace, all saved (ms) |",
              "|---|---|---|---|---|---|---|"]
    base = variants.get("stock_text", {}).get("shapes", {})
    for name, entry in variants.items():
        for shape, s in entry["shapes"].items():
            ratio = s["forward_seconds"] / base[shape]["forward_seconds"] if shape in base else float("nan")
            trace = f"{s['trace_seconds'] * 1e3:.2f}" if "trace_seconds" in s else "-"
            trace_all = f"{s['trace_all_seconds'] * 1e3:.2f}" if "trace_all_seconds" in s else "-"
            lines.append(f"| {name} | {shape} | {s['forward_seconds'] * 1e3:.2f} | {ratio:.3f}× | "
                         f"{_fmt_bytes(s['forward_peak_device_bytes'])} | {trace} | {trace_all} |")
    for name, entry in variants.items():
        if "leak_check" in entry:
            marks = entry["leak_check"]
            keys = list(marks)
            lines += ["", f"Leak check ({name}): " + "; ".join(
                f"{k}: device {_fmt_bytes(v['device_bytes'])}, RSS {_fmt_bytes(v['host_rss_bytes'])}" for k, v in marks.items())]
            first, last = marks[keys[0]], marks[keys[-1]]
            lines.append(f"RSS growth {keys[0]} → {keys[-1]}: {(last['host_rss_bytes'] - first['host_rss_bytes']) / 1024**2:.1f} MiB")
    return "\n".join(lines)
